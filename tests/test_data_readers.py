"""Readers: each real layout reads back exactly what was written; bad files say what is wrong."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _align_fixtures import (
    synthetic_episodes,
    write_aloha,
    write_lerobot,
    write_npz,
    write_robomimic,
)

from ate_fast.data import DataFormatError, UnknownFileFormatError, read_episodes
from ate_fast.errors import SingleEpisodeWarning


@pytest.fixture
def episodes():
    return synthetic_episodes(5, 4, length=(10, 30), seed=3)


def _same(read, written):
    assert len(read) == len(written)
    for ep, ref in zip(read, written):
        np.testing.assert_array_equal(ep.actions, ref)


def test_robomimic(tmp_path, episodes):
    path = write_robomimic(tmp_path / "demo.hdf5", episodes)
    _same(read_episodes(path), episodes)
    _same(read_episodes(path, format="robomimic"), episodes)


def test_robomimic_numeric_order_and_filter_key(tmp_path):
    eps = synthetic_episodes(12, 2, length=(5, 8), seed=0)
    path = write_robomimic(tmp_path / "demo.hdf5", eps)
    read = read_episodes(path)
    # demo_10 and demo_11 come after demo_9, not after demo_1
    assert [e.name.split("/")[-2] for e in read][9:] == ["demo_9", "demo_10", "demo_11"]
    _same(read, eps)
    _same(read_episodes(path, filter_key="valid"), eps[-1:])
    _same(read_episodes(path, filter_key="train"), eps[:-1])


def test_aloha_directory_and_single_file(tmp_path, episodes):
    directory = write_aloha(tmp_path / "aloha", episodes)
    _same(read_episodes(directory), episodes)
    _same(read_episodes(directory / "episode_3.hdf5"), episodes[3:4])


def test_lerobot_dataset_directory(tmp_path, episodes):
    root = write_lerobot(tmp_path / "lerobot", episodes)
    _same(read_episodes(root), episodes)
    _same(read_episodes(root / "data" / "chunk-000" / "episode_000002.parquet"), episodes[2:3])


def test_lerobot_v3_multi_episode_file_out_of_order(tmp_path, episodes):
    # v3 keeps several episodes per file; rows are grouped by episode_index and ordered by
    # frame_index even when the file's rows are shuffled.
    rows_a, rows_e, rows_f = [], [], []
    for e, ep in enumerate(episodes):
        rows_a += ep.tolist()
        rows_e += [e] * len(ep)
        rows_f += list(range(len(ep)))
    perm = np.random.default_rng(0).permutation(len(rows_a))
    table = pa.table(
        {
            "action": pa.array([rows_a[i] for i in perm], type=pa.list_(pa.float32())),
            "episode_index": pa.array([rows_e[i] for i in perm], type=pa.int64()),
            "frame_index": pa.array([rows_f[i] for i in perm], type=pa.int64()),
        }
    )
    (tmp_path / "ds" / "data" / "chunk-000").mkdir(parents=True)
    pq.write_table(table, tmp_path / "ds" / "data" / "chunk-000" / "file-000.parquet")
    _same(read_episodes(tmp_path / "ds"), episodes)


def test_npz_layouts(tmp_path, episodes):
    _same(read_episodes(write_npz(tmp_path / "a.npz", episodes)), episodes)
    # per-step episode_index (LeRobot convention)
    idx = np.concatenate([np.full(len(e), i) for i, e in enumerate(episodes)])
    np.savez(tmp_path / "b.npz", action=np.concatenate(episodes), episode_index=idx)
    _same(read_episodes(tmp_path / "b.npz"), episodes)
    # [N, T, D] equal-length episodes, custom key
    stacked = np.stack([e[:10] for e in episodes])
    np.savez(tmp_path / "c.npz", acts=stacked)
    _same(read_episodes(tmp_path / "c.npz", key="acts"), list(stacked))


def test_npy_and_multiple_paths(tmp_path, episodes):
    np.save(tmp_path / "one.npy", episodes[0])
    np.save(tmp_path / "many.npy", np.stack([e[:10] for e in episodes]))
    read = read_episodes([tmp_path / "one.npy", tmp_path / "many.npy"])
    _same(read, [episodes[0]] + [e[:10] for e in episodes])


def test_missing_keys(tmp_path, episodes):
    np.savez(tmp_path / "x.npz", positions=np.zeros((5, 2)))
    with pytest.raises(
        DataFormatError, match=r"expected one of \['actions', 'action'\].*positions"
    ):
        read_episodes(tmp_path / "x.npz")
    with pytest.raises(DataFormatError, match="missing key 'acts'"):
        read_episodes(tmp_path / "x.npz", key="acts")
    rm = write_robomimic(tmp_path / "rm.hdf5", episodes, key="actions")
    with pytest.raises(DataFormatError, match="missing key 'data/demo_0/joint_actions'"):
        read_episodes(rm, key="joint_actions")
    with pytest.raises(DataFormatError, match="filter_key 'test' not in /mask"):
        read_episodes(rm, filter_key="test")
    with h5py.File(tmp_path / "odd.hdf5", "w") as f:
        f.create_dataset("qpos", data=np.zeros((5, 2)))
    with pytest.raises(DataFormatError, match=r"unknown HDF5 layout.*\['qpos'\]"):
        read_episodes(tmp_path / "odd.hdf5")
    with pytest.raises(DataFormatError, match="robomimic layout needs a /data group"):
        read_episodes(tmp_path / "odd.hdf5", format="robomimic")
    root = write_lerobot(tmp_path / "lr", episodes)
    with pytest.raises(DataFormatError, match="missing column 'actions'"):
        read_episodes(root, key="actions")
    pq.write_table(pa.table({"action": pa.array([[0.0]])}), tmp_path / "noep.parquet")
    with pytest.raises(DataFormatError, match="missing column 'episode_index'"):
        read_episodes(tmp_path / "noep.parquet")
    with pytest.raises(DataFormatError, match="no such file"):
        read_episodes(tmp_path / "nothing.hdf5")


def test_wrong_rank(tmp_path):
    np.save(tmp_path / "r4.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(DataFormatError, match=r"rank 2 \[T, D\] or 3 \[N, T, D\].*\(2, 3, 4, 5\)"):
        read_episodes(tmp_path / "r4.npy")
    with h5py.File(tmp_path / "ep.hdf5", "w") as f:
        f.create_dataset("action", data=np.zeros((4, 3, 2)))
    with pytest.raises(DataFormatError, match=r"rank 2 \[T, D\].*\(4, 3, 2\)"):
        read_episodes(tmp_path / "ep.hdf5")
    rows = pa.array([[0.0, 1.0], [2.0]], type=pa.list_(pa.float32()))
    table = pa.table({"action": rows, "episode_index": pa.array([0, 0], type=pa.int64())})
    pq.write_table(table, tmp_path / "ragged.parquet")
    with pytest.raises(DataFormatError, match="rows of different lengths"):
        read_episodes(tmp_path / "ragged.parquet")


def test_nan_actions_name_the_step(tmp_path, episodes):
    bad = [e.copy() for e in episodes]
    bad[2][7, 1] = np.nan
    path = write_robomimic(tmp_path / "nan.hdf5", bad)
    with pytest.raises(
        DataFormatError, match=r"demo_2/actions: non-finite action nan at step 7, dim 1"
    ):
        read_episodes(path)
    bad[2][7, 1] = np.inf
    with pytest.raises(DataFormatError, match="non-finite action inf"):
        read_episodes(write_lerobot(tmp_path / "lr", bad))


def test_mixed_action_dims_and_bad_episode_ends(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((5, 3)))
    np.save(tmp_path / "b.npy", np.zeros((5, 4)))
    with pytest.raises(DataFormatError, match="different action dims"):
        read_episodes([tmp_path / "a.npy", tmp_path / "b.npy"])
    np.savez(tmp_path / "ends.npz", actions=np.zeros((10, 2)), episode_ends=np.array([4, 9]))
    with pytest.raises(DataFormatError, match="episode_ends must be strictly increasing"):
        read_episodes(tmp_path / "ends.npz")


@pytest.mark.parametrize("marker", ["episode_ends", "episode_index"])
def test_npz_one_dimensional_actions_are_split_by_their_markers(tmp_path, marker):
    """A [T] action array (one action dimension) is read as [T, 1] and split like [T, D]
    (it was one episode, without the warning, its chunks crossing the boundaries)."""
    markers = {"episode_ends": np.array([4, 10]), "episode_index": np.repeat([0, 1], [4, 6])}
    np.savez(tmp_path / "flat.npz", actions=np.arange(10.0), **{marker: markers[marker]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        episodes = read_episodes(tmp_path / "flat.npz")
    assert [tuple(e.actions.shape) for e in episodes] == [(4, 1), (6, 1)]
    assert episodes[1].actions[:, 0].tolist() == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]


def test_unknown_suffix_and_format(tmp_path):
    (tmp_path / "x.csv").write_text("1,2\n")
    # told by content (issue 15), not by the suffix
    with pytest.raises(UnknownFileFormatError, match=r"x\.csv: expected a NumPy \.npz archive"):
        read_episodes(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="format must be one of"):
        read_episodes(tmp_path / "x.csv", format="zarr")
    (tmp_path / "corrupt.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(DataFormatError, match="cannot open as HDF5"):
        read_episodes(tmp_path / "corrupt.hdf5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="directory has no action files"):
        read_episodes(tmp_path / "empty")


# ------------------------------------------------------------ what a real dataset folder holds
def test_lerobot_repeated_frames_are_refused(tmp_path, episodes):
    """A copy of an episode's file beside it (or two versions of the dataset in one folder)
    was read as one episode twice as long, its frames interleaved (a0, a0, a1, a1, ...)."""
    root = write_lerobot(tmp_path / "ds", episodes)
    chunk = root / "data" / "chunk-000"
    (chunk / "episode_000001 (copy).parquet").write_bytes(
        (chunk / "episode_000001.parquet").read_bytes()
    )
    with pytest.raises(DataFormatError, match=r"episode 1 has frame 0 more than once"):
        read_episodes(root)


def test_lerobot_frame_count_differs_from_info_json(tmp_path, episodes):
    root = write_lerobot(tmp_path / "ds", episodes)
    (root / "data" / "chunk-000" / "episode_000004.parquet").unlink()
    with pytest.warns(UserWarning, match=r"read \d+ frames, but meta/info.json says"):
        _same(read_episodes(root), episodes[:4])


def test_lerobot_data_folder_itself_and_float32_kept(tmp_path, episodes):
    """The dataset's data/ folder (parquet files in chunk-*/) reads as the dataset (it was
    'no action files'); float32 actions stay float32 through the reader (an up-cast to
    float64 doubled a large dataset's memory)."""
    root = write_lerobot(tmp_path / "ds", episodes)
    _same(read_episodes(root / "data"), episodes)
    read = read_episodes(root)
    assert all(e.actions.dtype == np.float32 for e in read)
    assert all(e.actions.flags.writeable for e in read)  # not views of Arrow's buffers


def test_filter_key_applies_to_robomimic_only(tmp_path, episodes):
    """--filter-key on ALOHA / LeRobot / npz data was ignored: every episode was read."""
    aloha = write_aloha(tmp_path / "aloha", episodes)
    lerobot = write_lerobot(tmp_path / "ds", episodes)
    npz = write_npz(tmp_path / "a.npz", episodes)
    for path in (aloha, aloha / "episode_0.hdf5", lerobot, npz):
        with pytest.raises(DataFormatError, match=r"filter_key .*robomimic HDF5 files only"):
            read_episodes(path, filter_key="train")


def test_robomimic_mask_listing_an_absent_demo(tmp_path, episodes):
    path = write_robomimic(tmp_path / "demo.hdf5", episodes)
    with h5py.File(path, "a") as f:
        f["mask"].create_dataset("bad", data=np.array([b"demo_0", b"demo_99"]))
    with pytest.raises(
        DataFormatError, match=r"/mask/bad lists demos that /data lacks: \['demo_99'\]"
    ):
        read_episodes(path, filter_key="bad")


def test_values_float32_cannot_hold_are_refused(tmp_path):
    """float64 beyond float32's range became inf and was blamed on the file as non-finite;
    integers beyond 2**24 were rounded without a word."""
    np.save(tmp_path / "huge.npy", np.array([[1e39, 0.0], [1.0, 2.0]]))
    np.save(tmp_path / "big.npy", np.array([[16_777_217, 0], [1, 2]], dtype=np.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the single-episode warning
        with pytest.raises(DataFormatError, match=r"1e\+39 at step 0, dim 0 is beyond float32"):
            read_episodes(tmp_path / "huge.npy")
        with pytest.raises(DataFormatError, match=r"16777217 at step 0, dim 0 is beyond ±2\*\*24"):
            read_episodes(tmp_path / "big.npy")
    np.save(tmp_path / "fine.npy", np.array([[16_777_216, -3], [1, 2]], dtype=np.int64))
    with pytest.warns(SingleEpisodeWarning):
        assert read_episodes(tmp_path / "fine.npy")[0].actions[0, 0] == 16_777_216


def test_flat_npy_warns_unless_one_file_per_episode(tmp_path, episodes):
    """A flat [T, D] .npy is read as one episode, which the .npz reader warned about and the
    .npy reader did not; a folder of such files (one per episode) gives no warning."""
    np.save(tmp_path / "log.npy", np.concatenate(episodes))
    with pytest.warns(SingleEpisodeWarning, match=r"log\.npy: the array .* read as ONE episode"):
        read_episodes(tmp_path / "log.npy")
    folder = tmp_path / "per_episode"
    folder.mkdir()
    for i, ep in enumerate(episodes):
        np.save(folder / f"episode_{i}.npy", ep)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SingleEpisodeWarning)
        _same(read_episodes(folder), episodes)
    # the warning is the caller's, filterable by category and module as any other
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_episodes(tmp_path / "log.npy")
    assert [w.filename for w in caught] == [__file__]
