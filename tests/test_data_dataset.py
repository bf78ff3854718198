"""ActionChunkDataset: chunk placement, padding, normalisation, unified dims, splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _align_fixtures import synthetic_episodes, write_aloha, write_lerobot, write_robomimic
from torch.utils.data import DataLoader

from ate_fast.data import ActionChunkDataset, Normalizer, chunk_starts, train_val_split


def test_chunk_starts_every_step_stride_and_max_pad():
    ep, off = chunk_starts([5, 3], horizon=3)
    assert ep.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert off.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    ep, off = chunk_starts([5, 3], horizon=3, max_pad=0)
    assert list(zip(ep.tolist(), off.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    ep, off = chunk_starts([7], horizon=3, stride=3)
    assert off.tolist() == [0, 3, 6]
    ep, off = chunk_starts([7, 2], horizon=4, max_pad=1)  # short episode gives no chunk
    assert ep.tolist() == [0] * 5 and off.tolist() == [0, 1, 2, 3, 4]


def test_horizon_longer_than_every_episode():
    with pytest.raises(
        ValueError, match=r"horizon=50 is longer than every episode \(the longest has 30"
    ):
        chunk_starts([20, 30], horizon=50)
    with pytest.raises(ValueError, match="horizon=50 is longer than every episode"):
        ActionChunkDataset([np.zeros((30, 2)), np.ones((20, 2))], horizon=50)
    with pytest.raises(ValueError, match="max_pad: expected 0 <= max_pad < horizon=4, got 4"):
        chunk_starts([5], horizon=4, max_pad=4)
    with pytest.raises(ValueError, match="stride"):
        chunk_starts([5], horizon=2, stride=0)


def test_chunks_never_cross_episodes_and_pad_like_the_policy():
    a = np.arange(10, dtype=np.float32).reshape(5, 2)  # episode 0: rows 0..4
    b = 100 + np.arange(6, dtype=np.float32).reshape(3, 2)  # episode 1
    ds = ActionChunkDataset([a, b], horizon=3, normalization="none")
    assert len(ds) == 8
    chunk, mask = ds[3]  # episode 0, start 3: steps 3, 4, then pad
    np.testing.assert_array_equal(chunk.numpy(), a[[3, 4, 4]])
    assert mask.tolist() == [1.0, 1.0]
    np.testing.assert_array_equal(ds[5][0].numpy(), b[[0, 1, 2]])
    np.testing.assert_array_equal(ds[7][0].numpy(), b[[2, 2, 2]])
    zero = ActionChunkDataset([a, b], horizon=3, normalization="none", pad="zero")
    np.testing.assert_array_equal(zero[3][0].numpy(), np.stack([a[3], a[4], [0, 0]]))
    assert ds.episode_of_chunk.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def test_normalisation_meanstd_minmax_and_reuse():
    eps = synthetic_episodes(4, 3, length=(20, 30), seed=1)
    frames = np.concatenate(eps).astype(np.float64)
    ds = ActionChunkDataset(eps, horizon=1)
    x = torch.stack([ds[i][0][0] for i in range(len(ds))]).double().numpy()
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1.0, atol=1e-5)
    mm = ActionChunkDataset(eps, horizon=1, normalization="minmax")
    y = torch.stack([mm[i][0][0] for i in range(len(mm))]).numpy()
    np.testing.assert_allclose(y.min(0), -1.0, atol=1e-6)
    np.testing.assert_allclose(y.max(0), 1.0, atol=1e-6)
    # round trip, and statistics reused from a saved dict (what a checkpoint stores)
    norm = Normalizer.from_dict(ds.normalizer.to_dict())
    np.testing.assert_allclose(norm.unnormalize(norm.normalize(frames)), frames, atol=1e-9)
    again = ActionChunkDataset(eps[:1], horizon=1, stats=ds.normalizer.to_dict())
    np.testing.assert_allclose(again[0][0].numpy(), x[:1], atol=1e-6)
    np.testing.assert_allclose(ds.normalizer.stats["mean"], frames.mean(0))
    with pytest.raises(ValueError, match="statistics are for 3 action dims, the data has 2"):
        ActionChunkDataset([np.zeros((4, 2))], horizon=2, stats=ds.normalizer)


def test_constant_dim_is_centred_not_blown_up():
    ep = np.stack([np.linspace(0, 1, 20), np.full(20, 0.3)], axis=1)
    ds = ActionChunkDataset([ep], horizon=4)
    assert torch.isfinite(ds.gather(range(len(ds)))[0]).all()
    assert ds.gather(range(len(ds)))[0][..., 1].abs().max() < 1e-5


def test_unified_action_space_and_mask(tmp_path):
    eps = synthetic_episodes(3, 3, length=(12, 12), seed=2)
    ds = ActionChunkDataset(eps, horizon=4, action_dim=8, dim_index=[5, 0, 2])
    chunk, mask = ds[0]
    assert chunk.shape == (4, 8)
    assert mask.tolist() == [1, 0, 1, 0, 0, 1, 0, 0]
    assert (chunk[:, mask == 0] == 0).all()
    raw = ds.normalizer.normalize(eps[0][:4])
    np.testing.assert_allclose(chunk[:, [5, 0, 2]].numpy(), raw, atol=1e-6)
    np.testing.assert_allclose(ds.action_space.extract(chunk).numpy(), raw, atol=1e-6)
    with pytest.raises(ValueError, match="dim_index: expected 3 distinct indices in \\[0, 8\\)"):
        ActionChunkDataset(eps, horizon=4, action_dim=8, dim_index=[0, 0, 1])
    with pytest.raises(ValueError, match="unified dim 2 is smaller than the data's action dim 3"):
        ActionChunkDataset(eps, horizon=4, action_dim=2)


def test_batched_gather_matches_items_and_loader():
    eps = synthetic_episodes(4, 2, length=(8, 15), seed=5)
    ds = ActionChunkDataset(eps, horizon=6, stride=2, action_dim=3)
    idx = [0, 5, len(ds) - 1, 3]
    chunks, masks = ds.gather(idx)
    assert masks.tolist() == [[1.0, 1.0, 0.0]] * 4
    for row, i in enumerate(idx):
        torch.testing.assert_close(chunks[row], ds[i][0], rtol=0, atol=0)
    loader = DataLoader(ds, batch_size=4, shuffle=False)
    a, m = next(iter(loader))
    assert a.shape == (4, 6, 3) and m.shape == (4, 3)
    torch.testing.assert_close(a, ds.gather([0, 1, 2, 3])[0], rtol=0, atol=0)
    with pytest.raises(IndexError):
        ds.gather([len(ds)])


@pytest.mark.parametrize("fmt", ["robomimic", "aloha", "lerobot"])
def test_dataset_from_each_format(tmp_path, fmt):
    eps = synthetic_episodes(4, 5, length=(20, 25), seed=7)
    writer = {"robomimic": write_robomimic, "aloha": write_aloha, "lerobot": write_lerobot}[fmt]
    path = writer(tmp_path / ("d.hdf5" if fmt == "robomimic" else "d"), eps)
    ds = ActionChunkDataset(path, horizon=8)
    ref = ActionChunkDataset(eps, horizon=8)
    assert len(ds) == sum(len(e) for e in eps)
    torch.testing.assert_close(ds.gather(range(len(ds)))[0], ref.gather(range(len(ref)))[0])


def test_split_keeps_episodes_whole():
    eps = synthetic_episodes(10, 2, length=(10, 20), seed=0)
    ds = ActionChunkDataset(eps, horizon=4)
    train, val = train_val_split(ds, 0.2, seed=0)
    tr_eps = set(ds.episode_of_chunk[train.indices].tolist())
    va_eps = set(ds.episode_of_chunk[val.indices].tolist())
    assert len(va_eps) == 2 and not tr_eps & va_eps and len(train) + len(val) == len(ds)
    assert train_val_split(ds, 0.0)[1] is None
    # a tiny adaptation set still keeps one episode for training
    small = ActionChunkDataset(eps[:2], horizon=4)
    tr, va = train_val_split(small, 0.9)
    assert len(set(small.episode_of_chunk[tr.indices].tolist())) == 1
    assert len(set(small.episode_of_chunk[va.indices].tolist())) == 1


def test_a_single_episode_split_warns_that_validation_is_not_held_out():
    """With one episode the split falls back to random chunks, which overlap training
    chunks almost entirely (stride 1): it did so without a word."""
    ds = ActionChunkDataset([np.random.default_rng(0).normal(size=(60, 2))], horizon=8)
    with pytest.warns(UserWarning, match="one episode, so validation takes random chunks"):
        train, val = train_val_split(ds, 0.1)
    assert len(train) + len(val) == len(ds) and len(val) > 0


def test_describe_counts_episodes_too_short_for_a_chunk():
    """With max_pad = 0 an episode shorter than H gives no chunk; the log line counted it
    among the episodes with nothing to say it was left out."""
    rng = np.random.default_rng(0)
    ds = ActionChunkDataset([rng.normal(size=(n, 2)) for n in (20, 5, 30)], horizon=8, max_pad=0)
    assert "3 episodes (5-30 steps) (1 shorter than H - max_pad = 8 steps give no chunk)" in (
        ds.describe()
    )
    assert "shorter" not in ActionChunkDataset([rng.normal(size=(20, 2))], horizon=8).describe()


def test_normaliser_in_blocks_matches_float64(monkeypatch):
    """Fitting and normalising go a block of rows at a time (no float64 copy of a large
    dataset): the same statistics and values as float64 over the whole array, across
    block edges, and [..., D] inputs keep their shape."""
    import ate_fast.data.normalization as normalization

    monkeypatch.setattr(normalization, "BLOCK_ELEMENTS", 7)  # 2 rows of 3 dims per block
    x = (np.random.default_rng(1).normal(size=(101, 3)) * [1.0, 50.0, 1e-3] + [0, 1e3, 5]).astype(
        np.float32
    )
    ref = x.astype(np.float64)
    norm = Normalizer.fit(x, "meanstd")
    np.testing.assert_allclose(norm.shift, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(norm.scale, ref.std(0), rtol=1e-12)
    out = norm.normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, ((ref - ref.mean(0)) / ref.std(0)).astype(np.float32))
    np.testing.assert_array_equal(norm.normalize(x.reshape(1, 101, 3)), out.reshape(1, 101, 3))


@pytest.mark.parametrize("pad", ["edge", "zero"])
def test_step_mask_marks_exactly_the_padded_steps(pad):
    """``step_mask=True``: items gain ``steps [H]``, 0 exactly where a chunk runs past its
    episode's end (whatever the fill), through items, batched gathers and a loader."""
    a = np.arange(10, dtype=np.float32).reshape(5, 2)  # 5 steps
    b = 100 + np.arange(6, dtype=np.float32).reshape(3, 2)  # 3 steps
    ds = ActionChunkDataset([a, b], horizon=3, normalization="none", pad=pad, step_mask=True)
    plain = ActionChunkDataset([a, b], horizon=3, normalization="none", pad=pad)
    want = [[1, 1, 1]] * 3 + [[1, 1, 0], [1, 0, 0]] + [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert [ds[i][2].tolist() for i in range(len(ds))] == want
    for i in range(len(ds)):  # chunk and mask as without step_mask
        chunk, mask, steps = ds[i]
        assert torch.equal(chunk, plain[i][0]) and torch.equal(mask, plain[i][1])
        assert steps.dtype == torch.float32 and steps.shape == (3,)
    _, masks, steps = ds.gather([4, 0, 7])
    assert steps.tolist() == [want[4], want[0], want[7]] and masks.shape == (3, 2)
    batch = next(iter(DataLoader(ds, batch_size=8, shuffle=False)))
    assert len(batch) == 3 and batch[2].tolist() == want
    assert ds.padded_chunks == plain.padded_chunks == 4
    assert ds.chunking["step_mask"] is True and "step_mask" not in plain.chunking
    assert "4 chunks padded, padding left out of the loss" in ds.describe()
    assert "4 chunks padded)" in plain.describe()
    with pytest.raises(TypeError, match="step_mask: expected a bool, got str"):
        ActionChunkDataset([a], horizon=3, step_mask="yes")
