"""The pretext tasks: permutation classes, transforms that cannot be read from the border, the batch maker."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sonossl.pretext.batch import MODES, PretextBatchMaker, clip_starts
from sonossl.pretext.permutations import class_distance, permutation_set
from sonossl.pretext.transforms import TransformSet, sampling_grid, warp_clips


def test_k4_has_12_classes_covering_every_permutation_once_with_its_reverse():
    perms = permutation_set(4)
    assert perms.shape == (12, 4)
    members = {tuple(p) for p in perms} | {tuple(p[::-1]) for p in perms}
    assert members == set(itertools.permutations(range(4)))


def test_larger_k_uses_a_fixed_hamming_distant_subset():
    assert permutation_set(6).shape == (24, 6)  # the default class count past K=4
    a, b = permutation_set(6, 20, seed=0), permutation_set(6, 20, seed=0)
    assert a.shape == (20, 6) and (a == b).all()
    dmin = min(class_distance(p, np.delete(a, i, 0)).min() for i, p in enumerate(a))
    assert dmin >= 4  # far apart, also from each other's reverses
    with pytest.raises(ValueError, match="n_classes"):
        permutation_set(4, 13)


def _maker(mode="both-sequential", source=48, crop=32):
    return PretextBatchMaker(mode, permutation_set(4), TransformSet(), source=source, crop=crop, max_shift=2.0)


def test_constant_clips_look_the_same_under_every_transform():
    """The border cannot give the transform away: a constant frame gives the same crop under all 27 transforms,
    so no network can do better than chance on it."""
    tset = TransformSet()
    idx = torch.tensor(list(itertools.product(range(3), range(3), range(3))))
    frames = torch.full((len(idx), 4, 48, 48), 0.6)
    maker = _maker()
    shift = torch.full((len(idx), 2), maker.shift)  # the largest jitter, towards a corner
    out = warp_clips(frames, tset.matrices(idx[:, 0], idx[:, 1], idx[:, 2]), shift, 32)
    assert torch.allclose(out, torch.full_like(out, 0.6), atol=1e-5)
    # and every sample point lies on or inside the outermost pixel centres of the frame
    grid = sampling_grid(tset.matrices(idx[:, 0], idx[:, 1], idx[:, 2]), shift, 48, 32)
    assert grid.abs().max() <= 1 - 1 / 48 + 1e-5


@pytest.mark.parametrize("mode", ["transform", "both-sequential", "both-parallel"])
def test_the_batch_maker_samples_inside_the_frame_so_constant_clips_carry_no_transform(mode, monkeypatch):
    """What the network sees: every grid the batch maker hands to grid_sample stays within the outermost pixel
    centres (the border padding, which makes a constant frame constant whatever the grid, never decides a pixel),
    and constant clips come out identical whatever their transform targets: the heads can only guess."""
    import sonossl.pretext.transforms as transforms

    grids, sample = [], transforms.F.grid_sample

    def spy(x, grid, **kw):
        grids.append(grid)
        return sample(x, grid, **kw)

    monkeypatch.setattr(transforms.F, "grid_sample", spy)
    maker = PretextBatchMaker(mode, permutation_set(4), TransformSet(), source=48, crop=32, max_shift=2.0, gain=0.0,
                              offset=0.0)
    batch = maker(torch.full((256, 4, 48, 48), 150, dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert grids and max(float(g.abs().max()) for g in grids) <= 1 - 1 / 48 + 1e-5
    assert len({tuple(t) for t in torch.stack([batch.targets[n] for n in TransformSet().sizes], 1).tolist()}) == 27
    assert torch.allclose(batch.transform_clips, torch.full_like(batch.transform_clips, 150 / 255), atol=1e-5)


def _plain(mode: str) -> PretextBatchMaker:
    """A maker whose only perturbations are the targets' (no crop jitter, gain or offset)."""
    return PretextBatchMaker(mode, permutation_set(4), TransformSet(), 48, 32, max_shift=0.0, gain=0.0, offset=0.0)


def _shuffled_by_target(shuffled: torch.Tensor, plain: torch.Tensor, cls: torch.Tensor) -> list[bool]:
    """Per clip: whether ``shuffled`` is ``plain`` with its frames in the order of class ``cls`` or its reverse."""
    perms = torch.as_tensor(permutation_set(4))
    return [any(torch.allclose(shuffled[i], plain[i][p], atol=1e-6) for p in (perms[c], perms[c].flip(0)))
            for i, c in enumerate(cls.tolist())]


@pytest.mark.parametrize("mode", MODES)
def test_each_branch_carries_exactly_its_targets_perturbation(mode):
    """The transform targets name the transform each clip got, and the order target its shuffle; in both-parallel
    the order branch is only shuffled and the transform branch only transformed (a clip given its neighbour's
    transform, or a branch given both perturbations, would train the heads on labels that say nothing)."""
    gen = torch.Generator().manual_seed(2)
    clips = torch.randint(0, 256, (32, 4, 48, 48), dtype=torch.uint8, generator=gen)
    batch = _plain(mode)(clips, torch.Generator().manual_seed(5))
    x, tset, zero = clips.float(), TransformSet(), torch.zeros(32, 2)
    ident = torch.tensor(tset.identity).expand(32, 3)
    plain = warp_clips(x, tset.matrices(ident[:, 0], ident[:, 1], ident[:, 2]), zero, 32).div(255).clamp(0, 1)
    if mode != "order":
        t = [batch.targets[n] for n in tset.sizes]
        warped = warp_clips(x, tset.matrices(*t), zero, 32).div(255).clamp(0, 1)
    if mode == "transform" or mode == "both-parallel":
        assert torch.allclose(batch.transform_clips[:, :, 0], warped, atol=1e-6)
    if mode == "order" or mode == "both-parallel":
        assert all(_shuffled_by_target(batch.order_clips[:, :, 0], plain, batch.targets["order"]))
    if mode == "both-sequential":  # one clip, transformed and shuffled
        assert all(_shuffled_by_target(batch.order_clips[:, :, 0], warped, batch.targets["order"]))


def test_about_half_the_shuffles_are_reversed():
    """A permutation and its reverse are one class: the maker shows either, about equally often (a maker that
    never reversed would teach the head half of each class, and a sweep played backwards would be a new class)."""
    levels = torch.tensor([20, 80, 140, 200], dtype=torch.uint8)
    clips = levels[None, :, None, None].expand(512, 4, 48, 48).contiguous()
    batch = _plain("order")(clips, torch.Generator().manual_seed(1))
    shown = (batch.order_clips[:, :, 0, 16, 16] * 255).argsort(dim=1).argsort(dim=1)
    perms = permutation_set(4)
    reversed_ = [tuple(s) != tuple(perms[c]) for s, c in zip(shown.tolist(), batch.targets["order"].tolist())]
    assert 0.4 < sum(reversed_) / len(reversed_) < 0.6


def test_a_clip_warps_its_frames_together_exactly_as_each_alone():
    """warp_clips samples the K frames as channels of one image with one grid per clip: every frame must come out
    bit for bit as if it had been warped on its own (the batch maker's speed-up changes no number)."""
    tset = TransformSet()
    gen = torch.Generator().manual_seed(3)
    frames = torch.rand(6, 4, 48, 48, generator=gen)
    idx = torch.stack([torch.randint(n, (6,), generator=gen) for n in tset.sizes.values()], 1)
    a, shift = tset.matrices(idx[:, 0], idx[:, 1], idx[:, 2]), 2 * torch.rand(6, 2, generator=gen) - 1
    together = warp_clips(frames, a, shift, 32)
    assert together.shape == (6, 4, 32, 32)
    for j in range(4):
        assert torch.equal(together[:, j], warp_clips(frames[:, j:j + 1], a, shift, 32)[:, 0])
    for i in range(6):  # and a clip's frames do not depend on the other clips of the batch
        assert torch.equal(together[i], warp_clips(frames[i:i + 1], a[i:i + 1], shift[i:i + 1], 32)[0])


def test_a_crop_that_would_show_padding_is_refused():
    with pytest.raises(ValueError, match="too large"):
        TransformSet().max_shift(source=48, crop=40)


@pytest.mark.parametrize("mode", MODES)
def test_batch_maker_shapes_and_targets(mode):
    gen = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 255, (5, 4, 48, 48), dtype=torch.uint8)
    batch = _maker(mode)(clips, gen)
    assert len(batch) == 5
    assert ("order" in batch.targets) == (mode != "transform")
    assert ("rotation" in batch.targets) == (mode != "order")
    for clip in (batch.order_clips, batch.transform_clips):
        if clip is not None:
            assert clip.shape == (5, 4, 1, 32, 32) and 0 <= clip.min() and clip.max() <= 1
    assert batch.same_clips == (mode == "both-sequential")


def test_order_target_names_the_shuffle():
    """Frames whose grey level is their time: after shuffling, the levels spell the permutation of the class."""
    levels = torch.tensor([20, 80, 140, 200], dtype=torch.uint8)
    clips = levels[None, :, None, None].expand(64, 4, 48, 48).contiguous()
    maker = PretextBatchMaker("order", permutation_set(4), TransformSet(), 48, 32, max_shift=0.0, gain=0.0,
                              offset=0.0)
    batch = maker(clips, torch.Generator().manual_seed(1))
    seen = batch.order_clips[:, :, 0, 16, 16] * 255
    order = seen.argsort(dim=1).argsort(dim=1)  # rank of each position = the frame it shows
    perms = permutation_set(4)
    for shown, cls in zip(order.numpy(), batch.targets["order"].numpy()):
        assert tuple(shown) in {tuple(perms[cls]), tuple(perms[cls][::-1])}


def test_clip_starts_stay_inside_one_video():
    video_idx = np.array([0] * 5 + [1] * 2 + [2] * 7)
    starts = clip_starts(video_idx, k=3, stride=2)
    assert starts.tolist() == [0, 7, 8, 9]


def test_a_shift_larger_than_the_crop_allows_is_cut_with_a_warning(caplog):
    import logging

    tset = TransformSet()
    room = tset.max_shift(160, 112)
    with caplog.at_level(logging.WARNING, logger="sonossl.pretext.batch"):
        maker = PretextBatchMaker("transform", permutation_set(4, 12, 0), tset, source=160, crop=112, max_shift=8.0)
    assert maker.shift == room < 4
    assert any(f"pretrain.max_shift=8 px: only {room:.2f} px fit a 112 px crop of 160 px frames" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sonossl.pretext.batch"):
        PretextBatchMaker("transform", permutation_set(4, 12, 0), tset, source=160, crop=112, max_shift=3.9)
    assert not caplog.records


def test_small_cnn_refuses_maxpool_false_which_it_would_ignore():
    from sonossl.models.encoder import build_encoder

    with pytest.raises(ValueError, match="small_cnn has no max-pool"):
        build_encoder({"name": "small_cnn", "width": 8, "maxpool": False})
    assert build_encoder({"name": "small_cnn", "width": 8}).spec["maxpool"] is True
