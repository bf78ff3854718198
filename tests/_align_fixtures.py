"""Small real-format action datasets written in a test's tmp_path (never downloaded).

Every writer produces the on-disk layout the real tools produce: robomimic's single HDF5
file, ALOHA's one-HDF5-per-episode directory, a LeRobot v2 dataset directory (parquet
per episode + ``meta/info.json``), and a Diffusion-Policy-style ``.npz`` with
``episode_ends``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def synthetic_episodes(
    n_episodes: int, action_dim: int, length: tuple[int, int] = (40, 70), seed: int = 0
) -> list[np.ndarray]:
    """Smooth trajectories of a few distinct motion types (so latents have modes)."""
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(n_episodes):
        t_len = int(rng.integers(length[0], length[1] + 1))
        t = np.linspace(0.0, 1.0, t_len)[:, None]
        kind = i % 3
        freq = 1.0 + kind + 0.1 * rng.normal(size=(1, action_dim))
        phase = rng.uniform(0, 2 * np.pi, size=(1, action_dim))
        amp = (1.0 + kind) * (0.8 + 0.4 * rng.random((1, action_dim)))
        offset = 3.0 * kind + rng.normal(size=(1, action_dim))
        episodes.append((offset + amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32))
    return episodes


def write_robomimic(path: Path, episodes: list[np.ndarray], key: str = "actions") -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = sum(len(e) for e in episodes)
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1})
        for i, ep in enumerate(episodes):
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = len(ep)
            demo.create_dataset(key, data=ep)
            demo.create_dataset("rewards", data=np.zeros(len(ep)))
            demo.create_dataset("dones", data=np.zeros(len(ep), dtype=np.int64))
            obs = demo.create_group("obs")
            obs.create_dataset("robot0_eef_pos", data=np.zeros((len(ep), 3), np.float32))
        names = [f"demo_{i}".encode() for i in range(len(episodes))]
        mask = f.create_group("mask")
        mask.create_dataset("train", data=np.array(names[:-1]))
        mask.create_dataset("valid", data=np.array(names[-1:]))
    return path


def write_aloha(directory: Path, episodes: list[np.ndarray]) -> Path:
    import h5py

    directory.mkdir(parents=True, exist_ok=True)
    for i, ep in enumerate(episodes):
        with h5py.File(directory / f"episode_{i}.hdf5", "w") as f:
            f.attrs["sim"] = True
            f.create_dataset("action", data=ep)
            obs = f.create_group("observations")
            obs.create_dataset("qpos", data=ep.copy())
            obs.create_dataset("qvel", data=np.zeros_like(ep))
    return directory


def write_lerobot(directory: Path, episodes: list[np.ndarray], fps: int = 50) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = episodes[0].shape[1]
    chunk = directory / "data" / "chunk-000"
    chunk.mkdir(parents=True, exist_ok=True)
    index = 0
    for e, ep in enumerate(episodes):
        n = len(ep)
        vec = pa.list_(pa.float32(), dim)
        table = pa.table(
            {
                "action": pa.array(ep.tolist(), type=vec),
                "observation.state": pa.array(ep.tolist(), type=vec),
                "timestamp": pa.array(np.arange(n, dtype=np.float32) / fps),
                "frame_index": pa.array(np.arange(n, dtype=np.int64)),
                "episode_index": pa.array(np.full(n, e, dtype=np.int64)),
                "index": pa.array(np.arange(index, index + n, dtype=np.int64)),
                "task_index": pa.array(np.zeros(n, dtype=np.int64)),
            }
        )
        index += n
        pq.write_table(table, chunk / f"episode_{e:06d}.parquet")
    meta = directory / "meta"
    meta.mkdir(exist_ok=True)
    info = {
        "codebase_version": "v2.1",
        "robot_type": "synthetic",
        "total_episodes": len(episodes),
        "total_frames": index,
        "fps": fps,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "features": {
            "action": {"dtype": "float32", "shape": [dim], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }
    (meta / "info.json").write_text(json.dumps(info, indent=2))
    return directory


def write_npz(path: Path, episodes: list[np.ndarray]) -> Path:
    ends = np.cumsum([len(e) for e in episodes])
    np.savez(path, actions=np.concatenate(episodes), episode_ends=ends)
    return path
