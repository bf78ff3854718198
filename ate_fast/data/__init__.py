"""Action data: readers for npz/npy, HDF5 (robomimic, ALOHA), LeRobot parquet; chunking,
normalisation and the unified action space."""

from ate_fast.data.action_space import ActionSpaceMap
from ate_fast.data.chunking import chunk_starts
from ate_fast.data.dataset import ActionChunkDataset
from ate_fast.data.episodes import Episode
from ate_fast.data.errors import DataFormatError, UnknownFileFormatError
from ate_fast.data.file_format import sniff_format
from ate_fast.data.normalization import NORMALIZATIONS, Normalizer
from ate_fast.data.readers import FORMATS, read_episodes
from ate_fast.data.split import train_val_split

__all__ = [
    "FORMATS",
    "NORMALIZATIONS",
    "ActionChunkDataset",
    "ActionSpaceMap",
    "DataFormatError",
    "Episode",
    "Normalizer",
    "UnknownFileFormatError",
    "chunk_starts",
    "read_episodes",
    "sniff_format",
    "train_val_split",
]
