"""The ToMe patch of timm ViTs: parity at r=0, an explicit float64 reference forward at r>0,
the timm entry points, masks, training, autocast, bad input, remove/re-apply/deepcopy."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from tome_train.tome import (
    ScheduleError, UnsupportedModelError, apply_tome, is_patched, parse_schedule, remove_tome, set_r,
    token_counts, tome_state, unmerge_tokens,
)
from tome_train.tome.attention import ToMeAttention
from tome_train.tome.timm_patch import ToMeBlock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_merge import ref_bipartite_soft_matching  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


IMG, PATCH, DEPTH, DIM, HEADS = 32, 8, 3, 64, 4
NUM_PATCHES = (IMG // PATCH) ** 2

# key: (timm name, overrides, number of protected prefix tokens)
MODELS = {
    "vit": ("vit_tiny_patch16_224", {}, 1),
    "deit": ("deit_tiny_patch16_224", {}, 1),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, 2),
    "deit3_layerscale": ("deit3_small_patch16_224", {"init_values": 1.0}, 1),
    "qk_norm": ("vit_small_patch16_224", {"qk_norm": True}, 1),
    "registers": ("vit_small_patch16_224", {"reg_tokens": 4, "no_embed_class": True}, 5),
    "mae_avg_pool": ("vit_base_patch16_224", {"global_pool": "avg", "fc_norm": True}, 1),
    "no_class_token": ("vit_medium_patch16_gap_240", {}, 0),
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Well-spread random weights (timm's init leaves tokens nearly identical)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "token" in name or "pos_embed" in name:
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif ("norm" in name and name.endswith("weight")) or name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def make(key: str, seed: int = 0, **extra) -> VisionTransformer:
    name, overrides, _ = MODELS[key]
    args = dict(pretrained=False, img_size=IMG, patch_size=PATCH, depth=DEPTH, embed_dim=DIM, num_heads=HEADS,
                num_classes=10)
    args.update(overrides)
    args.update(extra)
    return randomize(timm.create_model(name, **args), seed).eval()


def images(batch: int = 2, seed: int = 1, dtype=torch.float32, size: tuple[int, int] = (IMG, IMG)) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def random_bool_mask(num_tokens: int, seed: int = 3) -> torch.Tensor:
    """``[2, 1, N, N]``: each query may attend to about 60% of the keys, itself always."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 1, num_tokens, num_tokens, generator=g) > 0.4) | torch.eye(num_tokens, dtype=torch.bool)


# --------------------------------------------------------------------------------------
# Explicit reference forward (float64): softmax attention + log(size), merge via reference
# --------------------------------------------------------------------------------------
def ref_merge_mask(merge, mask):
    """Merge an additive mask ``[B, 1, N, N]`` along queries and keys (a group may attend
    where any member may, and may be attended where any member may)."""
    m = merge(mask[:, 0], mode="amax")
    m = merge(m.transpose(1, 2), mode="amax").transpose(1, 2)
    return m[:, None]


def ref_forward(model, x, schedule, prop_attn=True, mask=None):
    """Returns logits, final features, and per block (output tokens, sizes, sources)."""
    p = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    B, N, C = x.shape
    size = torch.ones(B, N, 1, dtype=x.dtype)
    source = torch.eye(N, dtype=x.dtype).expand(B, N, N)
    if mask is not None:
        mask = mask.expand(B, 1, N, N)
    layers = []
    for blk, r in zip(model.blocks, schedule):
        attn = blk.attn
        H, hd = attn.num_heads, attn.head_dim
        N = x.shape[1]
        qkv = F.linear(blk.norm1(x), attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
        logits = (q @ k.transpose(-1, -2)) * hd ** -0.5
        if prop_attn:
            logits = logits + size.log()[:, None, None, :, 0]
        if mask is not None:
            logits = logits + mask
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, H * hd)
        x = x + blk.ls1(attn.proj(attn.norm(out)))
        merge = ref_bipartite_soft_matching(k.mean(dim=1), r, p)
        x = merge(x * size) / merge(size)
        size, source = merge(size), merge(source, mode="amax")
        if mask is not None:
            mask = ref_merge_mask(merge, mask)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        layers.append((x, size, source))
    feats = model.norm(x)
    if isinstance(model, VisionTransformerDistilled):
        logits = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
    else:
        if model.global_pool == "token":
            pooled = feats[:, 0]
        else:
            w = size[:, p:]
            pooled = (feats[:, p:] * w).sum(dim=1) / w.sum(dim=1)
        logits = model.head(model.fc_norm(pooled))
    return logits, feats, layers


class BlockRecorder:
    """Forward hooks collecting what every block returns."""

    def __init__(self, model):
        self.outputs = []
        self.handles = [blk.register_forward_hook(lambda m, i, o: self.outputs.append(o)) for blk in model.blocks]

    def close(self):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------
# r = 0: identical to timm
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(MODELS))
def test_parity_at_r0(key):
    ref = make(key)
    model = apply_tome(copy.deepcopy(ref), r=0)
    assert is_patched(model) and not is_patched(ref)
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = images()
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-5
        feats = model.forward_features(x)
        assert max_diff(feats, ref.forward_features(x)) <= 1e-5
        assert max_diff(model.forward_head(feats, pre_logits=True), ref.forward_head(feats, pre_logits=True)) <= 1e-5
        for kwargs in [
            dict(output_fmt="NCHW"),
            dict(output_fmt="NLC", norm=True),
            dict(indices=[0, 2], output_fmt="NLC", return_prefix_tokens=True),
            dict(indices=2, output_fmt="NCHW", intermediates_only=True),
            dict(indices=[1], stop_early=True, output_fmt="NLC", intermediates_only=True),
            dict(output_fmt="NCHW", output_dict=True, return_prefix_tokens=True),
        ]:
            ours, theirs = model.forward_intermediates(x, **kwargs), ref.forward_intermediates(x, **kwargs)
            flat_ours, flat_theirs = _flatten(ours), _flatten(theirs)
            assert len(flat_ours) == len(flat_theirs) > 0, kwargs
            for a, b in zip(flat_ours, flat_theirs):
                assert a.shape == b.shape, kwargs
                assert max_diff(a, b) <= 1e-5, kwargs


def _flatten(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _flatten(obj[k])]
    return [t for item in obj for t in _flatten(item)]


@pytest.mark.parametrize("key", ["vit", "deit_distilled", "registers"])
def test_parity_at_r0_with_masks(key):
    ref = make(key)
    model = apply_tome(copy.deepcopy(ref), r=0)
    x = images()
    n = NUM_PATCHES + MODELS[key][2]
    g = torch.Generator().manual_seed(4)
    bool_mask = (torch.rand(2, 1, n, n, generator=g) > 0.4) | torch.eye(n, dtype=torch.bool)
    float_mask = torch.randn(1, 1, n, n, generator=g)
    with torch.no_grad():
        for mask in (bool_mask, float_mask, bool_mask[0, 0]):
            expected = ref(x, attn_mask=mask)
            assert max_diff(model(x, attn_mask=mask), expected) <= 1e-5
            assert max_diff(model.forward_features(x, attn_mask=mask), ref.forward_features(x, attn_mask=mask)) <= 1e-5
            ours = model.forward_intermediates(x, attn_mask=mask, output_fmt="NLC")
            theirs = ref.forward_intermediates(x, attn_mask=mask, output_fmt="NLC")
            for a, b in zip(_flatten(ours), _flatten(theirs)):
                assert max_diff(a, b) <= 1e-5
        assert max_diff(model(x), ref(x)) <= 1e-5  # the mask does not stick to the next call
        assert max_diff(model(x, is_causal=True), ref(x, is_causal=True)) <= 1e-5
        assert max_diff(model(x, is_causal=True), model(x)) > 1e-3


def test_parity_at_r0_train_mode_with_drop_path():
    ref = make("deit3_layerscale", drop_path_rate=0.3).train()
    model = apply_tome(copy.deepcopy(ref), r=0).train()
    x = images(batch=4)
    torch.manual_seed(123)
    expected = ref(x)
    torch.manual_seed(123)
    got = model(x)
    assert max_diff(got, expected) <= 1e-5
    torch.manual_seed(124)
    assert max_diff(model(x), expected) > 1e-4  # drop path is really active


# --------------------------------------------------------------------------------------
# r > 0: the explicit float64 reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("r", [3, [8, 0, 2], (3, -1), 100])
def test_forward_equals_float64_reference(key, r):
    model = make(key).double()
    schedule = parse_schedule(r, DEPTH)
    x = images(dtype=torch.float64)
    with torch.no_grad():
        expected, ref_feats, ref_layers = ref_forward(model, x, schedule)
        apply_tome(model, r=r, trace_source=True)
        rec = BlockRecorder(model)
        logits = model(x)
        rec.close()
    state = tome_state(model)
    assert max_diff(logits, expected) <= 1e-10
    p = MODELS[key][2]
    counts = token_counts(schedule, NUM_PATCHES + p, p)
    assert [y.shape[1] for y in rec.outputs] == counts[1:]
    for out, (ref_x, _, _) in zip(rec.outputs, ref_layers):
        assert max_diff(out, ref_x) <= 1e-10
    assert torch.equal(state.size, ref_layers[-1][1])
    assert torch.equal(state.source, ref_layers[-1][2])
    assert max_diff(model.forward_features(x), ref_feats) <= 1e-10


@pytest.mark.parametrize("key", ["vit", "deit_distilled", "registers", "mae_avg_pool"])
def test_prop_attn_off_equals_reference(key):
    model = make(key).double()
    x = images(dtype=torch.float64)
    with torch.no_grad():
        expected, _, _ = ref_forward(model, x, [4] * DEPTH, prop_attn=False)
        with_prop, _, _ = ref_forward(model, x, [4] * DEPTH, prop_attn=True)
        apply_tome(model, r=4, prop_attn=False)
        assert max_diff(model(x), expected) <= 1e-10
    assert max_diff(expected, with_prop) > 1e-4  # the two really differ


@pytest.mark.parametrize("key", ["vit", "deit_distilled", "deit3_layerscale", "registers", "mae_avg_pool"])
def test_gradients_equal_reference(key):
    """Gradients through merges, sizes and proportional attention, to every parameter."""
    model = make(key).double()
    x = images(dtype=torch.float64)
    w = torch.randn(2, 10, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (ref_forward(model, x, [4, 3, 5])[0] * w).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    apply_tome(model, r=[4, 3, 5])
    (model(x) * w).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize("key", ["vit", "deit_distilled", "registers"])
def test_masks_at_r_above_0(key):
    p = MODELS[key][2]
    n = NUM_PATCHES + p
    model = make(key).double()
    x = images(dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    bool_mask = (torch.rand(2, 1, n, n, generator=g) > 0.3) | torch.eye(n, dtype=torch.bool)
    additive = torch.zeros(bool_mask.shape, dtype=torch.float64).masked_fill(~bool_mask, -math.inf)
    float_mask = torch.randn(2, 1, n, n, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref_bool, _, _ = ref_forward(model, x, [4] * DEPTH, mask=additive)
        ref_float, _, _ = ref_forward(model, x, [4] * DEPTH, mask=float_mask)
        ref_plain, _, _ = ref_forward(model, x, [4] * DEPTH)
        apply_tome(model, r=4)
        no_mask = model(x)
        assert max_diff(no_mask, ref_plain) <= 1e-10
        assert max_diff(model(x, attn_mask=bool_mask), ref_bool) <= 1e-10
        assert max_diff(model(x, attn_mask=float_mask), ref_float) <= 1e-10
        assert max_diff(ref_bool, ref_plain) > 1e-4
        all_true = torch.ones(n, n, dtype=torch.bool)
        assert max_diff(model(x, attn_mask=all_true), no_mask) <= 1e-12
        assert max_diff(model(x, attn_mask=torch.zeros(1, 1, n, n, dtype=torch.float64)), no_mask) <= 1e-12
        assert max_diff(model.forward_features(x, attn_mask=all_true), model.forward_features(x)) <= 1e-12


def test_all_true_mask_equals_no_mask_fp32():
    model = apply_tome(make("deit3_layerscale"), r=5)
    x = images()
    n = NUM_PATCHES + 1
    with torch.no_grad():
        assert max_diff(model(x, attn_mask=torch.ones(2, 1, n, n, dtype=torch.bool)), model(x)) <= 1e-5


def test_causal_mask_rejected_when_merging():
    model = apply_tome(make("vit"), r=2)
    with pytest.raises(ValueError, match="is_causal"):
        model(images(), is_causal=True)


# --------------------------------------------------------------------------------------
# r > 0: behaviour of the patched model (fp32)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(MODELS))
def test_token_counts_sizes_sources(key):
    p = MODELS[key][2]
    n = NUM_PATCHES + p
    model = apply_tome(make(key), r=[5, 100, 1], trace_source=True)
    rec = BlockRecorder(model)
    with torch.no_grad():
        model(images(batch=3))
    rec.close()
    counts = token_counts([5, 100, 1], n, p)
    assert [y.shape[1] for y in rec.outputs] == counts[1:]
    assert counts[-1] < n - 6  # the cap clamped r=100 instead of failing
    state = tome_state(model)
    assert state.size.shape == (3, counts[-1], 1)
    assert torch.equal(state.size[:, :p], torch.ones(3, p, 1))
    assert torch.equal(state.size.sum(dim=1), torch.full((3, 1), float(n)))
    source = state.source
    assert source.shape == (3, counts[-1], n)
    assert set(source.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(source.sum(dim=1), torch.ones(3, n))  # every input token in exactly one
    assert torch.equal(source.sum(dim=2, keepdim=True), state.size)
    assert torch.equal(source[:, :p], torch.eye(n)[:p].expand(3, p, n))  # prefix tokens stay in place


def test_trace_source_off_keeps_no_source():
    model = apply_tome(make("vit"), r=3)
    with torch.no_grad():
        model(images())
    assert tome_state(model).source is None
    assert tome_state(model).size is not None


@pytest.mark.parametrize("key", ["vit", "deit_distilled", "registers", "no_class_token"])
@pytest.mark.parametrize("fmt", ["NCHW", "NLC"])
def test_forward_intermediates_unmerged(key, fmt):
    p = MODELS[key][2]
    model = make(key).double()
    x = images(dtype=torch.float64)
    schedule = [6, 3, 2]
    with torch.no_grad():
        _, ref_feats, ref_layers = ref_forward(model, x, schedule)
        apply_tome(model, r=schedule)
        final, inter = model.forward_intermediates(x, output_fmt=fmt, return_prefix_tokens=p > 0)
        only = model.forward_intermediates(x, indices=[0, 2], output_fmt=fmt, intermediates_only=True, norm=True)
        as_dict = model.forward_intermediates(x, indices=[1], output_fmt=fmt, output_dict=True, stop_early=True)
    assert max_diff(final, ref_feats) <= 1e-10  # final features stay merged (forward_head input)
    assert len(inter) == DEPTH
    side = IMG // PATCH
    for i, item in enumerate(inter):
        y, prefix = item if p > 0 else (item, None)
        ref_x, _, ref_source = ref_layers[i]
        expected = unmerge_tokens(ref_x[:, p:], ref_source[:, p:, p:])  # [B, 16, C]
        if fmt == "NCHW":
            assert y.shape == (2, DIM, side, side)
            y = y.flatten(2).transpose(1, 2)
        else:
            assert y.shape == (2, NUM_PATCHES, DIM)
        assert max_diff(y, expected) <= 1e-10
        if p > 0:
            assert max_diff(prefix, ref_x[:, :p]) <= 1e-10
        # patches merged together carry the same value
        holder = ref_source[:, p:, p:].argmax(dim=1)  # [B, 16]
        for b in range(2):
            for j in holder[b].unique():
                members = (holder[b] == j).nonzero().flatten()
                assert max_diff(y[b, members], y[b, members[:1]].expand(len(members), -1)) == 0
    for idx, y in zip([0, 2], only):
        ref_x, _, ref_source = ref_layers[idx]
        expected = unmerge_tokens(model.norm(ref_x)[:, p:], ref_source[:, p:, p:])
        y = y.flatten(2).transpose(1, 2) if fmt == "NCHW" else y
        assert max_diff(y, expected) <= 1e-10
    assert set(as_dict) == {"image_intermediates", "image_features"}
    y = as_dict["image_intermediates"][0]
    y = y.flatten(2).transpose(1, 2) if fmt == "NCHW" else y
    assert max_diff(y, unmerge_tokens(ref_layers[1][0][:, p:], ref_layers[1][2][:, p:, p:])) <= 1e-10


def test_get_intermediate_layers():
    model = apply_tome(make("registers"), r=5)
    with torch.no_grad():
        grid = model.get_intermediate_layers(images(), n=2, reshape=True)
        tokens = model.get_intermediate_layers(images(), n=[0], return_prefix_tokens=True)
    assert [y.shape for y in grid] == [(2, DIM, 4, 4)] * 2
    (patches, prefix), = tokens
    assert patches.shape == (2, NUM_PATCHES, DIM) and prefix.shape == (2, 5, DIM)


def test_forward_intermediates_dynamic_size():
    model = apply_tome(make("vit", dynamic_img_size=True), r=4)
    with torch.no_grad():
        final, inter = model.forward_intermediates(images(size=(48, 40)))
        logits = model(images(size=(48, 40)))
    assert [y.shape for y in inter] == [(2, DIM, 6, 5)] * DEPTH
    assert final.shape[1] == token_counts([4] * DEPTH, 31, 1)[-1]
    assert torch.isfinite(logits).all()


def test_weighted_average_pool():
    model = apply_tome(make("mae_avg_pool"), r=[6, 3, 2], trace_source=True)
    x = images()
    with torch.no_grad():
        feats = model.forward_features(x)
        size = tome_state(model).size
        source = tome_state(model).source
        weighted = (feats[:, 1:] * size[:, 1:]).sum(dim=1) / size[:, 1:].sum(dim=1)
        plain = feats[:, 1:].mean(dim=1)
        assert max_diff(weighted, plain) > 1e-3  # sizes differ, the weighting matters
        pre = model.forward_head(feats, pre_logits=True)
        assert max_diff(pre, model.fc_norm(weighted)) <= 1e-5
        assert max_diff(model.forward_head(feats), model.head(model.fc_norm(weighted))) <= 1e-5
        assert max_diff(model(x), model.head(model.fc_norm(weighted))) <= 1e-5
        # = the plain mean over the input patches after unmerging
        unmerged = unmerge_tokens(feats[:, 1:], source[:, 1:, 1:])
        assert max_diff(model.fc_norm(unmerged.mean(dim=1)), pre) <= 1e-5
        model.global_pool = "avgmax"
        expected = 0.5 * (feats[:, 1:].amax(dim=1) + weighted)
        assert max_diff(model.forward_head(feats, pre_logits=True), model.fc_norm(expected)) <= 1e-5
        model.global_pool = "avg"
        with pytest.raises(ValueError, match="forward_features"):
            model.forward_head(feats[:1])


def test_proportional_attention_equals_explicit_formula():
    for key in ["vit", "qk_norm"]:
        model = apply_tome(make(key), r=2)
        attn = model.blocks[1].attn
        assert type(attn) is ToMeAttention
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 9, DIM, generator=g)
        size = torch.randint(1, 6, (2, 9, 1), generator=g).float()
        with torch.no_grad():
            out, keys = attn(x, None, size)
            B, N, H, hd = 2, 9, HEADS, DIM // HEADS
            q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(q), attn.k_norm(k)
            weights = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + size.log().reshape(B, 1, 1, N), dim=-1)
            expected = ((weights @ v).transpose(1, 2).reshape(B, N, DIM)) @ attn.proj.weight.T + attn.proj.bias
        assert max_diff(out, expected) <= 1e-5
        assert max_diff(keys, k) <= 1e-6  # the keys, after k_norm, for the matching metric
        assert max_diff(out, attn(x)[0]) > 1e-4


def test_a_token_of_size_s_counts_as_s_copies():
    model = apply_tome(make("vit"), r=2)
    attn = model.blocks[0].attn
    g = torch.Generator().manual_seed(4)
    t = torch.randn(1, 4, DIM, generator=g)
    merged = t  # token 1 stands for 3 copies of itself
    expanded = torch.cat([t[:, :1], t[:, 1:2], t[:, 1:2], t[:, 1:2], t[:, 2:]], dim=1)
    with torch.no_grad():
        out_m, _ = attn(merged, None, torch.tensor([[[1.0], [3.0], [1.0], [1.0]]]))
        out_e, _ = attn(expanded, None)
    assert max_diff(out_m[:, [0, 1, 2, 3]], out_e[:, [0, 1, 4, 5]]) <= 1e-5


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["deit_distilled", "deit3_layerscale", "registers", "mae_avg_pool"])
def test_training_with_drop_path_backward(key):
    model = apply_tome(make(key, drop_path_rate=0.2), r=(4, -1)).train()
    x = images(batch=4).requires_grad_(True)
    torch.manual_seed(0)
    out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(4)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # every image patch, merged or not, receives a gradient
    patch_grads = x.grad.abs().reshape(4, 3, IMG // PATCH, PATCH, IMG // PATCH, PATCH).sum(dim=(1, 3, 5))
    assert (patch_grads > 0).all()
    p = MODELS[key][2]
    assert tome_state(model).size.shape[1] == token_counts([8, 4, 0], NUM_PATCHES + p, p)[-1]


def test_distilled_training_returns_both_heads():
    model = apply_tome(make("deit_distilled"), r=5).train()
    model.set_distilled_training(True)
    out, out_dist = model(images())
    assert out.shape == out_dist.shape == (2, 10)
    assert max_diff(out, out_dist) > 1e-4
    (out.sum() + out_dist.sum()).backward()
    assert model.dist_token.grad.abs().sum() > 0 and model.cls_token.grad.abs().sum() > 0


def test_grad_checkpointing():
    ref = make("vit").train()
    model = apply_tome(copy.deepcopy(ref), r=0).train()
    model.set_grad_checkpointing(True)
    x = images()
    assert max_diff(model(x), ref(x)) <= 1e-5
    # the backward pass runs each checkpointed block again, after the forward's pass: with a mask too (timm runs the
    # blocks of a masked forward without checkpoints)
    for attn_mask in (None, random_bool_mask(NUM_PATCHES + 1)):
        grads = []
        for m in (ref, model):
            m.zero_grad()
            m(x, attn_mask=attn_mask).square().sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        assert max_diff(*grads) <= 1e-4
    set_r(model, 2)
    with pytest.raises(ValueError, match="checkpointing"):
        model(x)
    with torch.no_grad():
        assert model(x).shape == (2, 10)  # fine without gradients


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu(dtype):
    ref = make("deit3_layerscale")
    x = images()
    try:
        with torch.autocast("cpu", dtype=dtype), torch.no_grad():
            ref(x)
    except RuntimeError as err:  # this CPU / build has no such autocast
        pytest.skip(f"timm itself cannot run autocast {dtype} here: {err}")
    model = apply_tome(copy.deepcopy(ref), r=0)
    with torch.autocast("cpu", dtype=dtype), torch.no_grad():
        assert max_diff(model(x).float(), ref(x).float()) <= 1e-5
    set_r(model, 4)
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert tome_state(model).size.sum().item() == 2 * (NUM_PATCHES + 1)
    out.float().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        full = model.eval()(x)
    assert (out.float().detach() - full).abs().max() <= 0.1 * full.abs().max()


@pytest.mark.parametrize("r", [0, 2])
@pytest.mark.parametrize("train", [False, True])
def test_an_empty_batch_runs_as_in_timm(r, train):
    """A batch of no images crashed in the attention (a reshape to ``-1``, with nothing to infer it from), even at
    r=0."""
    ref = make("vit").train(train)
    model = apply_tome(copy.deepcopy(ref), r=r, trace_source=True).train(train)
    x = images(batch=0).requires_grad_(train)
    out = model(x)
    assert out.shape == ref(x).shape == (0, 10)
    if train:
        out.sum().backward()
        assert x.grad.shape == x.shape
    mask = torch.ones(NUM_PATCHES + 1, NUM_PATCHES + 1, dtype=torch.bool)
    assert model.forward_features(x, attn_mask=mask).shape == (0, NUM_PATCHES + 1, DIM)
    final, layers = model.forward_intermediates(x, output_fmt="NLC")
    assert final.shape == (0, NUM_PATCHES + 1, DIM) and [y.shape for y in layers] == [(0, NUM_PATCHES, DIM)] * DEPTH
    # timm's own NCHW reshape fails on an empty batch (timm 1.0.31); the patched model's does not
    grid = IMG // PATCH
    assert [y.shape for y in model.forward_intermediates(x, intermediates_only=True)] == [(0, DIM, grid, grid)] * DEPTH


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
def test_not_a_vit_is_rejected():
    with pytest.raises(UnsupportedModelError, match="ResNet"):
        apply_tome(timm.create_model("resnet18", pretrained=False, num_classes=10))
    with pytest.raises(UnsupportedModelError, match="Linear"):
        apply_tome(torch.nn.Linear(4, 4))


@pytest.mark.parametrize(
    "name, match",
    [("vit_base_patch16_rpn_224", "ResPostBlock"), ("vit_base_patch16_xp_224", "ParallelScalingBlock"),
     ("vit_small_patch16_18x2_224", "ParallelThingsBlock")],
)
def test_unsupported_block_types(name, match):
    model = timm.create_model(name, pretrained=False, img_size=IMG, patch_size=PATCH, depth=1, embed_dim=DIM,
                              num_heads=HEADS, num_classes=10)
    cls = type(model)
    with pytest.raises(UnsupportedModelError, match=match):
        apply_tome(model)
    assert type(model) is cls and not is_patched(model)


@pytest.mark.parametrize("pool", ["map", "prr"])
def test_attention_pooling_is_refused_by_its_name(pool):
    model = make("vit", global_pool=pool)
    with pytest.raises(UnsupportedModelError, match=rf"^global_pool='{pool}' \(attention pooling\) is not supported by "
                                                    r"ToMe: use token, avg, avgmax, max or ''$"):
        apply_tome(model, r=2)
    assert not is_patched(model)


def test_unsupported_custom_block_and_attention():
    class MyBlock(Block):
        pass

    model = make("vit")
    model.blocks[1].__class__ = MyBlock
    with pytest.raises(UnsupportedModelError, match=r"blocks\[1\].*MyBlock"):
        apply_tome(model)
    assert type(model.blocks[0]) is Block and not is_patched(model)

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH, depth=2,
                              embed_dim=DIM, num_heads=HEADS, attn_layer="diff")
    with pytest.raises(UnsupportedModelError, match="DiffAttention"):
        apply_tome(model)
    model = make("vit", global_pool="map")
    with pytest.raises(UnsupportedModelError, match="map"):
        apply_tome(model)


@pytest.mark.parametrize(
    "r, match",
    [(-1, "r=-1"), (1.5, r"r=1\.5"), ([1, 2, 3, 4], "length 4.*3 blocks"), ([2, -1], r"r\[1\]=-1"),
     ((2, 5), "inflect=5")],
)
def test_bad_r_is_rejected(r, match):
    model = make("vit")
    with pytest.raises(ScheduleError, match=match):
        apply_tome(model, r=r)
    assert not is_patched(model) and type(model.blocks[0]) is Block
    apply_tome(model, r=1)
    with pytest.raises(ScheduleError, match=match):
        set_r(model, r)
    assert tome_state(model).schedule == [1, 1, 1]


def test_unpatched_model_errors():
    model = make("vit")
    with pytest.raises(UnsupportedModelError, match="apply_tome"):
        set_r(model, 2)
    with pytest.raises(UnsupportedModelError, match="apply_tome"):
        tome_state(model)
    assert remove_tome(model) is model and type(model) is VisionTransformer


# --------------------------------------------------------------------------------------
# remove / re-apply / deepcopy
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["vit", "deit_distilled", "mae_avg_pool"])
def test_remove_tome_restores_plain_model(key):
    ref = make(key)
    model = copy.deepcopy(ref)
    cls = type(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_tome(model, r=4, trace_source=True)
    x = images()
    with torch.no_grad():
        merged = model(x)
        assert max_diff(merged, ref(x)) > 1e-4
        assert remove_tome(model) is model
        assert type(model) is cls
        assert all(type(b) is Block and type(b.attn) is Attention for b in model.blocks)
        assert not hasattr(model, "_tome_state") and not hasattr(model.blocks[0], "_tome_state")
        assert max_diff(model(x), ref(x)) == 0
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    apply_tome(model, r=4)  # and it can be patched again
    with torch.no_grad():
        assert max_diff(model(x), merged) <= 1e-6


def test_apply_twice_updates_settings():
    model = apply_tome(make("vit"), r=2)
    state = tome_state(model)
    apply_tome(model, r=[3, 3, 0], prop_attn=False, trace_source=True)
    new = tome_state(model)
    assert new.schedule == [3, 3, 0] and new.prop_attn is False and new.trace_source is True
    assert [c.__name__ for c in type(model).__mro__].count("ToMeVisionTransformerMixin") == 1
    assert all(b._tome_state is new for b in model.blocks) and new is not state
    rec = BlockRecorder(model)
    with torch.no_grad():
        model(images())
    rec.close()
    assert [y.shape[1] for y in rec.outputs] == [14, 11, 11]
    assert tome_state(model).source.shape == (2, 11, 17)
    assert set_r(model, (2, -1)) == [4, 2, 0]
    assert all(type(b) is ToMeBlock for b in model.blocks)


def test_deepcopy_after_training_forward():
    model = apply_tome(make("deit_distilled", drop_path_rate=0.1), r=3, trace_source=True).train()
    model(images()).sum()  # graph still alive: the state holds this forward's tensors
    clone = copy.deepcopy(model)
    assert is_patched(clone) and type(clone) is type(model)
    cs = tome_state(clone)
    assert cs is not tome_state(model) and all(b._tome_state is cs for b in clone.blocks)
    assert cs.schedule == [3, 3, 3] and cs.trace_source and cs.size is None
    set_r(clone, 0)
    assert tome_state(model).schedule == [3, 3, 3]
    set_r(clone, 3)
    model.eval(), clone.eval()
    with torch.no_grad():
        assert max_diff(clone(images()), model(images())) == 0
    ema = timm.utils.ModelEmaV3(model, decay=0.9)
    with torch.no_grad():
        assert max_diff(ema.module(images()), model(images())) == 0
    ema.update(model)


def test_pickle_in_a_fresh_process(tmp_path):
    """The patched class is made at run time: a pickled model must load where it was never made."""
    model = apply_tome(make("deit_distilled"), r=[3, 2, 1], prop_attn=False).train()
    model(images()).sum()  # per-forward state with a graph: not pickled
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with torch.no_grad():
        expected = model.eval()(images())
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
import torch
from tests_helper_images import images
model = torch.load({str(path)!r}, weights_only=False)
from tome_train.tome import is_patched, tome_state
assert is_patched(model) and type(model).__name__ == "ToMeVisionTransformerDistilled", type(model)
state = tome_state(model)
assert state.schedule == [3, 2, 1] and state.prop_attn is False and state.size is None
assert all(b._tome_state is state for b in model.blocks)
with torch.no_grad():
    out = model(images())
assert (out - torch.load({str(tmp_path / "expected.pt")!r})).abs().max().item() == 0
print("ok")
"""
    (tmp_path / "tests_helper_images.py").write_text(
        "import torch\n"
        "def images():\n"
        "    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _aten_ops(model, images) -> list[str]:
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(images)
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


@pytest.mark.parametrize("key", ["vit", "mae_avg_pool"])
def test_unmerged_forward_runs_exactly_timms_ops(key):
    """r = 0, or a batch under ``min_batch``: not one extra kernel (no metric, no bias, no matching)."""
    base = make(key).eval()
    images = torch.randn(2, 3, IMG, IMG)
    expected = _aten_ops(base, images)
    for r, min_batch in [(0, 1), (3, 3)]:
        model = apply_tome(copy.deepcopy(base), r=r, min_batch=min_batch)
        assert _aten_ops(model, images) == expected
        assert torch.equal(model(images), base(images))
    assert _aten_ops(apply_tome(copy.deepcopy(base), r=3, min_batch=2), images) != expected


def test_min_batch_switches_merging_per_forward():
    base = make("vit").eval()
    model = apply_tome(copy.deepcopy(base), r=3, min_batch=4)
    merged = apply_tome(copy.deepcopy(base), r=3)
    small, large = torch.randn(3, 3, IMG, IMG), torch.randn(4, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(model(small), base(small))
        assert tome_state(model).size is None and not tome_state(model).merging
        assert torch.equal(model(large), merged(large))
        assert tome_state(model).merging and tome_state(model).size.shape[1] == 1 + NUM_PATCHES - 3 * DEPTH
        assert torch.equal(model(small), base(small))  # decided again on every forward


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_min_batch_is_one_clear_error(bad):
    with pytest.raises(ValueError, match=r"min_batch=.* is not allowed: use an integer >= 1"):
        apply_tome(make("vit"), r=2, min_batch=bad)


@pytest.mark.parametrize("flag", ["prop_attn", "trace_source"])
def test_a_flag_that_is_no_bool_is_one_clear_error(flag):
    with pytest.raises(ValueError, match=rf"^{flag}='no' is not allowed: use True or False$"):  # "no" counted as on
        apply_tome(make("vit"), r=2, **{flag: "no"})


def test_a_block_outside_a_pass_is_timms_block():
    """Outside its model's pass a block has no merge state: it merged a fresh (or copied) model's tokens, 17 to 15;
    after a pass, given that pass's final token count, it weighed the keys by the pass's stale sizes; a loop over the
    blocks by hand worked once and then refused. It computes timm's block, the mask and is_causal included, and the
    model's own passes merge as before."""
    ref = make("vit")
    model = apply_tome(make("vit"), r=2)
    x = images()

    def loop(m, tokens):
        for blk in m.blocks:
            tokens = blk(tokens)
        return tokens

    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(x))
        n = tokens.shape[1]
        mask = random_bool_mask(n)
        for m in (model, copy.deepcopy(model)):
            assert max_diff(m.blocks[0](tokens), ref.blocks[0](tokens)) <= 1e-6  # 17 tokens stay 17
        model(x)
        merged = tome_state(model).size.shape[1]
        assert merged < n
        late = torch.randn(2, merged, DIM, generator=torch.Generator().manual_seed(5))
        assert max_diff(model.blocks[-1](late), ref.blocks[-1](late)) <= 1e-6  # not the pass's sizes
        for _ in range(2):
            assert max_diff(loop(model, tokens), loop(ref, tokens)) <= 1e-5
        assert max_diff(model.blocks[1](tokens, attn_mask=mask), ref.blocks[1](tokens, attn_mask=mask)) <= 1e-6
        assert max_diff(model.blocks[1](tokens, is_causal=True), ref.blocks[1](tokens, is_causal=True)) <= 1e-6
        model(x)
        assert tome_state(model).size.shape[1] == merged  # the passes merge as before


def test_a_block_given_other_tokens_than_its_pass_holds_says_so():
    """A hook that changes the tokens inside a pass would leave them out of step with the pass's sizes."""
    model = apply_tome(make("vit"), r=2).eval()
    model.blocks[1].register_forward_pre_hook(lambda block, args: (args[0][:, :-1],))
    with torch.no_grad(), pytest.raises(ValueError, match=r"^a ToMe block got 2 x 14 tokens where the pass it is in "
                                                          r"has 2 x 15: only the model's forward_features and "
                                                          r"forward_intermediates run the blocks of a pass$"):
        model(images())
