"""Merge schedules, token counts and the FLOP count of a ViT under a schedule."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tome_train.tome import (
    ScheduleError, ViTDims, apply_tome, flop_bound, parse_schedule, remove_tome, tome_state, token_counts, vit_flops,
)
from tome_train.tome.schedule import check_fits, schedule_from_text, schedule_text

pytestmark = pytest.mark.usefixtures("one_thread")


# The published architectures (224 px, 1000 classes), written out by hand.
VIT_S = ViTDims(embed_dim=384, depth=12, num_patches=196, num_protected=1, patch_size=256)
VIT_B = ViTDims(embed_dim=768, depth=12, num_patches=196, num_protected=1, patch_size=256)
VIT_L = ViTDims(embed_dim=1024, depth=24, num_patches=196, num_protected=1, patch_size=256)


# --------------------------------------------------------------------------------------
# parse_schedule
# --------------------------------------------------------------------------------------
def test_constant_schedule():
    assert parse_schedule(16, 12) == [16] * 12
    assert parse_schedule(0, 3) == [0, 0, 0]
    assert parse_schedule(np.int64(5), 2) == [5, 5]
    assert all(type(v) is int for v in parse_schedule(np.int64(5), 2))


def test_decreasing_schedule_is_2r_down_to_0():
    # public formula: int(2r + (0 - 2r) / (L - 1) * i), truncated toward zero
    assert parse_schedule((8, -1), 12) == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]
    assert parse_schedule((4, -1.0), 5) == [8, 6, 4, 2, 0]
    assert parse_schedule((4, 1), 5) == [0, 2, 4, 6, 8]  # increasing
    assert parse_schedule((6, 0), 4) == [6, 6, 6, 6]  # inflect 0 = constant
    assert parse_schedule((3, -1), 1) == [6]


def test_list_schedule_is_padded():
    assert parse_schedule([4, 3, 2], 5) == [4, 3, 2, 0, 0]
    assert parse_schedule([1, 2], 2) == [1, 2]
    assert parse_schedule([], 3) == [0, 0, 0]
    assert parse_schedule(OmegaConf.create({"r": [2, 1]}).r, 3) == [2, 1, 0]  # a ListConfig


@pytest.mark.parametrize(
    "bad, match",
    [
        (-1, r"r=-1"),
        (2.5, r"r=2\.5"),
        (16.0, r"r=16\.0"),
        (True, r"r=True"),
        ("8", r"r='8'"),
        ([1, -2], r"r\[1\]=-2"),
        ([1, 0.5], r"r\[1\]=0\.5"),
        ((4, -2), r"inflect=-2"),
        ((4, "x"), r"inflect='x'"),
        ((4, -1, 0), r"\(r, inflect\)"),
        ((-4, -1), r"r=-4"),
        ([1, 1, 1, 1, 1], r"length 5.*4 blocks"),
    ],
)
def test_bad_schedules_raise(bad, match):
    with pytest.raises(ScheduleError, match=match):
        parse_schedule(bad, 4)


def test_schedule_error_is_a_value_error():
    assert issubclass(ScheduleError, ValueError)


# --------------------------------------------------------------------------------------
# schedule_from_text, schedule_text: the command line's and the messages' forms
# --------------------------------------------------------------------------------------
def test_schedule_text_forms():
    """``[8,8,4]``, the form of a config and of README's list of ``export --r`` schedules, was refused as text."""
    assert schedule_from_text("13") == 13
    assert schedule_from_text("16@-1") == (16, -1.0)
    assert schedule_from_text("8,8,4") == schedule_from_text("[8,8,4]") == schedule_from_text(" [8, 8, 4] ") == [8, 8, 4]
    assert schedule_from_text("[8]") == [8] and schedule_from_text("[]") == []
    for bad in ("[8,8", "8]", "[8;8]", "(16, -1.0)"):
        with pytest.raises(ScheduleError, match="is not allowed"):
            schedule_from_text(bad)


@pytest.mark.parametrize("r, text", [(13, "13"), ((16, -1.0), "16@-1"), ((8, 0.25), "8@0.25"), ((8, -1 / 3), None),
                                     ([8, 8, 4], "[8, 8, 4]"), (OmegaConf.create([2, 1]), "[2, 1]")])
def test_schedule_text_reads_back(r, text):
    assert schedule_from_text(schedule_text(r)) == (r if isinstance(r, (int, tuple)) else list(r))
    assert text is None or schedule_text(r) == text


def test_too_many_merges_are_named_as_the_user_writes_them():
    """A decreasing schedule was named by its tuple, ``r=(32, -1.0)``, which no config or ``--r`` takes."""
    dims = ViTDims(embed_dim=64, depth=6, num_patches=64, num_protected=1, patch_size=16)
    with pytest.raises(ScheduleError, match=r"^r=32@-1 is not possible for this model: it asks a layer for 64 merges"):
        check_fits((32, -1.0), dims)


# --------------------------------------------------------------------------------------
# token_counts
# --------------------------------------------------------------------------------------
def test_token_counts_vit_b_r16():
    counts = token_counts(parse_schedule(16, 12), 197, 1)
    # 197 - 16 k while the cap allows it; 21 tokens hold 20 unprotected: the cap is 10
    assert counts == [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]


def test_token_counts_cap_and_protected():
    assert token_counts([100, 100, 100], 17, 1) == [17, 9, 5, 3]
    assert token_counts([100, 100, 100], 18, 2) == [18, 10, 6, 4]
    assert token_counts([100, 100], 21, 5) == [21, 13, 9]
    assert token_counts([100, 100], 16, 0) == [16, 8, 4]
    assert token_counts([0, 3, 0], 10, 1) == [10, 10, 7, 7]
    assert token_counts([5], 3, 3) == [3, 3]  # nothing unprotected


def test_decreasing_schedule_removes_more_early():
    const = token_counts(parse_schedule(8, 12), 197, 1)
    decr = token_counts(parse_schedule((8, -1), 12), 197, 1)
    assert all(d <= c for d, c in zip(decr[1:-1], const[1:-1]))
    assert decr[1] == 197 - 16


# --------------------------------------------------------------------------------------
# FLOPs (paper convention: one multiply-add = one FLOP, as fvcore counts)
# --------------------------------------------------------------------------------------
def test_baseline_flops_match_published():
    assert vit_flops(VIT_B) / 1e9 == pytest.approx(17.6, abs=0.05)  # ViT-B/16: 17.6 GFLOPs
    assert vit_flops(VIT_S) / 1e9 == pytest.approx(4.6, abs=0.05)  # DeiT-S: 4.6 GFLOPs
    assert vit_flops(VIT_L) / 1e9 == pytest.approx(61.6, abs=0.1)  # ViT-L/16: 61.6 GFLOPs


def test_deit_s_tome_flops_match_published():
    # DeiT-S trained with r8 / r16: 3.4 / 2.3 GFLOPs
    assert vit_flops(VIT_S, parse_schedule(8, 12)) / 1e9 == pytest.approx(3.4, abs=0.05)
    assert vit_flops(VIT_S, parse_schedule(16, 12)) / 1e9 == pytest.approx(2.3, abs=0.05)


@pytest.mark.parametrize("dims, r, bound", [(VIT_B, 16, 2.02), (VIT_L, 8, 1.99), (VIT_S, 13, 1.72)])
def test_flop_bound_ratios(dims, r, bound):
    sched = parse_schedule(r, dims.depth)
    blocks = vit_flops(dims, blocks_only=True) / vit_flops(dims, sched, blocks_only=True)
    assert blocks == pytest.approx(bound, abs=0.005) and flop_bound(dims, sched) == blocks
    assert dims.tokens_per_layer(sched) == token_counts(sched, dims.num_patches + dims.num_protected, dims.num_protected)
    whole = vit_flops(dims) / vit_flops(dims, sched)  # patch embedding and head do not shrink
    assert bound - 0.03 < whole < blocks


def test_flops_take_every_schedule_form():
    """An (r, inflect) tuple was read as the per-layer list [r, inflect, 0, ...] (DeiT-S (8, 0): 1.04x for 1.35x)."""
    for r in (8, (8, 0.0), (16, -1.0), (16, 1.0), [8, 8, 4]):
        layers = parse_schedule(r, VIT_S.depth)
        assert vit_flops(VIT_S, r) == vit_flops(VIT_S, layers) and flop_bound(VIT_S, r) == flop_bound(VIT_S, layers)
    assert flop_bound(VIT_S, (8, 0.0)) == flop_bound(VIT_S, 8) == pytest.approx(1.352, abs=0.001)


def test_flops_by_hand_one_block():
    dims = ViTDims(embed_dim=8, depth=1, num_patches=4, num_protected=1, patch_size=4, in_chans=3,
                   mlp_ratio=2.0, num_classes=5)
    # 5 tokens in, r=2 -> 3 tokens into the MLP
    attn = 4 * 5 * 8 * 8 + 2 * 5 * 5 * 8
    mlp = 2 * 3 * 8 * 16
    embed, head = 4 * 4 * 3 * 8, 8 * 5
    assert vit_flops(dims, [2]) == attn + mlp + embed + head
    assert vit_flops(dims, [2], blocks_only=True) == attn + mlp
    assert vit_flops(dims, [2]) == vit_flops(dims, 2) == vit_flops(dims, [100])  # capped at 2
    assert vit_flops(dims) == vit_flops(dims, [0]) == 4 * 5 * 64 + 2 * 25 * 8 + 2 * 5 * 8 * 16 + embed + head
    with pytest.raises(ScheduleError):
        vit_flops(dims, [1, 1])


def _tiny(name="vit_tiny_patch16_224", **kw):
    args = dict(pretrained=False, img_size=32, patch_size=8, depth=3, embed_dim=64, num_heads=4, num_classes=10)
    args.update(kw)
    return timm.create_model(name, **args).eval()


def test_dims_from_timm():
    dims = ViTDims.from_timm(_tiny())
    assert dims == ViTDims(embed_dim=64, depth=3, num_patches=16, num_protected=1, patch_size=64,
                           in_chans=3, mlp_ratio=4.0, num_classes=10)
    assert ViTDims.from_timm(_tiny("deit_tiny_distilled_patch16_224")).num_protected == 2
    assert ViTDims.from_timm(_tiny("vit_small_patch16_224", reg_tokens=4)).num_protected == 5
    assert ViTDims.from_timm(_tiny(num_classes=0)).num_classes == 0
    apply_tome(m := _tiny(), r=2)
    assert ViTDims.from_timm(m) == dims


@pytest.mark.parametrize("r", [0, 3, [5, 0, 2], (2, -1)])
def test_flops_equal_counted_flops_of_the_model(r):
    """vit_flops against torch's FLOP counter on a real model (which counts 2 per multiply-add);
    ToMe adds only the matching products ``a @ b^T`` on top of the bound."""
    torch.manual_seed(0)
    model = _tiny()
    dims = ViTDims.from_timm(model)
    images = torch.randn(2, 3, 32, 32)
    apply_tome(model, r=r)
    schedule = tome_state(model).schedule
    counts = token_counts(schedule, 17, 1)
    matching = 0
    for n, r_l in zip(counts[:-1], schedule):
        if min(r_l, (n - 1) // 2) > 0:
            unprotected = n - 1
            matching += (unprotected - unprotected // 2) * (unprotected // 2) * 16  # head_dim 16
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    assert counter.get_total_flops() == 2 * 2 * (vit_flops(dims, schedule) + matching)
    remove_tome(model)
