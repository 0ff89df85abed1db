"""Bipartite soft matching and size-weighted merging against the paper's pseudocode.

``ref_bipartite_soft_matching`` below is written straight from the pseudocode of the paper
(whole-sequence alternating partition, ``scores[..., 0, :] = -inf`` for the class token,
``scores[..., :, 0] = -inf`` for the distillation token, argsort, gather, scatter_add, and the
distilled output order ``[unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]]`` of the public
code). With more prefix tokens (class + registers) the same rule is extended: every prefix
token on an even position is masked as a row, every one on an odd position as a column, and
the prefix tokens come first in their original order. ``test_timm_patch`` reuses it.
"""
from __future__ import annotations

import math

import pytest
import torch

from tome_train.tome import Merge, bipartite_soft_matching, max_merges, merge_wavg, unmerge_tokens
from tome_train.tome.merge import _cached_row_layout, plan_layer, row_layout


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------
# Reference, from the paper's pseudocode
# --------------------------------------------------------------------------------------
def ref_bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 1):
    """Returns ``merge(x, mode="sum")`` acting on ``[B, N, C]`` along dim 1."""
    t = metric.shape[1]
    r = min(r, (t - num_protected) // 2)
    if r <= 0:
        return lambda x, mode="sum": x
    prot_a = (num_protected + 1) // 2  # prefix tokens on even positions (set A): 0, 2, 4, ...
    prot_b = num_protected // 2  # prefix tokens on odd positions (set B): 1, 3, ...
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if num_protected >= 1:
            scores[..., :prot_a, :] = -math.inf  # class token (and registers in A) never merge
        if num_protected >= 2:
            scores[..., :, :prot_b] = -math.inf  # distillation token (and registers in B) never receive
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        unm_idx = unm_idx.sort(dim=-2)[0]

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        if mode == "sum":
            dst = dst.scatter_add(-2, dst_idx.expand(n, r, c), src)
        else:
            dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if num_protected <= 1:
            return torch.cat([unm, dst], dim=-2)
        if num_protected == 2:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=-2)
        prefix = [unm[:, i // 2:i // 2 + 1] if i % 2 == 0 else dst[:, i // 2:i // 2 + 1] for i in range(num_protected)]
        return torch.cat(prefix + [unm[:, prot_a:], dst[:, prot_b:]], dim=-2)

    return merge


def ref_merge_wavg(merge, x, size, source):
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    source = merge(source, mode="amax")
    return x / size, size, source


def _eye(b, n, dtype=torch.float64):
    return torch.eye(n, dtype=dtype).expand(b, n, n)


def _shuffled_row_check(merge: Merge) -> None:
    assert merge.unm_idx.dtype == torch.long
    assert torch.equal(merge.unm_idx, merge.unm_idx.sort(dim=-1).values)


# --------------------------------------------------------------------------------------
# Exactness against the reference
# --------------------------------------------------------------------------------------
CASES = [
    # (num_protected, num_tokens, r)
    (0, 16, 3), (0, 17, 8), (0, 17, 100),
    (1, 17, 1), (1, 17, 5), (1, 17, 8), (1, 16, 7), (1, 16, 50), (1, 197, 16),
    (2, 18, 4), (2, 18, 8), (2, 19, 6), (2, 19, 30), (2, 198, 13),
    (5, 21, 4), (5, 21, 8), (5, 20, 7), (5, 20, 100),
    (3, 15, 5), (4, 14, 5),
]


@pytest.mark.parametrize("p,n,r", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_equals_reference(p, n, r, dtype):
    g = torch.Generator().manual_seed(1000 * p + 10 * n + r)
    b, c, d = 3, 8, 6
    metric = torch.randn(b, n, d, generator=g, dtype=dtype)
    x = torch.randn(b, n, c, generator=g, dtype=dtype)
    size = torch.randint(1, 5, (b, n, 1), generator=g).to(dtype)
    source = _eye(b, n, dtype)

    merge = bipartite_soft_matching(metric, r, p)
    ref = ref_bipartite_soft_matching(metric, r, p)
    r_eff = min(r, (n - p) // 2)
    assert merge is not None and merge.r == r_eff
    _shuffled_row_check(merge)

    assert torch.equal(merge(x), ref(x))
    assert torch.equal(merge(x, mode="amax"), ref(x, mode="amax"))
    out, out_size, out_source = merge_wavg(merge, x, size, source)
    ref_out, ref_size, ref_source = ref_merge_wavg(ref, x, size, source)
    assert out.shape == (b, n - r_eff, c)
    assert torch.equal(out_size, ref_size)
    assert torch.equal(out_source, ref_source)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("p", [0, 1, 2, 5])
def test_chain_of_merges_equals_reference(p):
    """Several layers with sizes and sources carried from one to the next."""
    g = torch.Generator().manual_seed(7 + p)
    b, n, c = 2, 4 + p + 33, 5
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    ref_x, ref_size, ref_source = x, torch.ones(b, n, 1, dtype=torch.float64), _eye(b, n)
    out_x, out_size, out_source = x, None, _eye(b, n)
    for r in [6, 5, 9, 3, 40]:
        metric = torch.randn(b, out_x.shape[1], 4, generator=g, dtype=torch.float64)
        merge = bipartite_soft_matching(metric, r, p)
        out_x, out_size, out_source = merge_wavg(merge, out_x, out_size, out_source)
        ref = ref_bipartite_soft_matching(metric, r, p)
        ref_x, ref_size, ref_source = ref_merge_wavg(ref, ref_x, ref_size, ref_source)
        torch.testing.assert_close(out_x, ref_x, rtol=0, atol=1e-12)
        assert torch.equal(out_size, ref_size)
        assert torch.equal(out_source, ref_source)
    assert out_x.shape[1] == p + 7  # 37 unprotected - 23 merged = 14, then r=40 is capped at 7


# --------------------------------------------------------------------------------------
# Hand-made examples: what the partition, the matching and the order are
# --------------------------------------------------------------------------------------
def _handmade_one_cls():
    # positions: 0 cls (A), 1 B, 2 A, 3 B, 4 A, 5 B, 6 A
    metric = torch.tensor([
        [1.0, 1.0, 1.0],  # cls: would match everything, but never merges
        [0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0],  # = token 1: cosine 1
        [1.0, 0.0, 0.0],
        [1.0, 0.1, 0.0],  # close to token 3: cosine 0.995
        [0.0, 0.0, 1.0],
        [0.0, 0.5, 1.0],  # best partner token 5: cosine 0.894
    ], dtype=torch.float64)[None]
    x = torch.arange(7, dtype=torch.float64)[None, :, None]
    return metric, x


def test_handmade_class_token_layout():
    metric, x = _handmade_one_cls()
    out, size, _ = merge_wavg(bipartite_soft_matching(metric, 1, 1), x, None)
    assert out.flatten().tolist() == [0.0, 4.0, 6.0, 1.5, 3.0, 5.0]  # cls, unmerged A, then B
    assert size.flatten().tolist() == [1, 1, 1, 2, 1, 1]
    out, size, _ = merge_wavg(bipartite_soft_matching(metric, 2, 1), x, None)
    assert out.flatten().tolist() == [0.0, 6.0, 1.5, 3.5, 5.0]
    assert size.flatten().tolist() == [1, 1, 2, 2, 1]
    out, size, _ = merge_wavg(bipartite_soft_matching(metric, 3, 1), x, None)
    assert out.flatten().tolist() == [0.0, 1.5, 3.5, 5.5]
    out, size, _ = merge_wavg(bipartite_soft_matching(metric, 9, 1), x, None)  # capped at 3
    assert out.flatten().tolist() == [0.0, 1.5, 3.5, 5.5]


def test_matching_is_cosine_not_dot_product():
    metric, x = _handmade_one_cls()
    metric[0, 6] *= 100.0  # by dot product token 6 would now merge first
    metric[0, 1] *= 0.01
    out, _, _ = merge_wavg(bipartite_soft_matching(metric, 1, 1), x, None)
    assert out.flatten().tolist() == [0.0, 4.0, 6.0, 1.5, 3.0, 5.0]


def test_handmade_distillation_token_never_receives():
    # positions: 0 cls (A), 1 dist (B), 2 A, 3 B, 4 A, 5 B
    metric = torch.tensor([
        [0.0, 0.0, 1.0],
        [1.0, 0.0, 0.0],  # dist
        [1.0, 0.0, 0.0],  # identical to dist, must go to its second best: token 3
        [0.9, 0.5, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
    ], dtype=torch.float64)[None]
    x = torch.tensor([10.0, 20.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)[None, :, None]
    merge = bipartite_soft_matching(metric, 1, 2)
    out, size, _ = merge_wavg(merge, x, None)
    assert out.flatten().tolist() == [10.0, 20.0, 4.0, 2.5, 5.0]  # cls, dist, unmerged A, B
    assert size.flatten().tolist() == [1, 1, 1, 2, 1]
    out, size, _ = merge_wavg(bipartite_soft_matching(metric, 2, 2), x, None)
    assert out.flatten().tolist() == [10.0, 20.0, 3.0, 5.0]  # 2 -> 3 and 4 -> 3 or 5
    ref = ref_bipartite_soft_matching(metric, 2, 2)
    assert torch.equal(ref(x) / ref(torch.ones_like(x)), out)


def test_partition_alternates_over_whole_sequence():
    """Token 2k (set A) only ever merges into an odd token (set B), whatever the prefix."""
    g = torch.Generator().manual_seed(3)
    for p in [0, 1, 2, 3, 5]:
        n = p + 24
        metric = torch.randn(2, n, 6, generator=g, dtype=torch.float64)
        merge = bipartite_soft_matching(metric, 12, p)
        src = _eye(2, n)
        _, _, source = merge_wavg(merge, torch.zeros(2, n, 1, dtype=torch.float64), None, src)
        for row in source.reshape(-1, n):
            members = row.nonzero().flatten().tolist()
            if len(members) > 1:
                odd = [m for m in members if m % 2 == 1]
                assert len(odd) == 1, members  # one B token, the rest from A
                assert all(m >= p for m in members)


# --------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0, 1, 2, 5])
def test_protected_tokens_and_partition_invariants(p):
    g = torch.Generator().manual_seed(11 + p)
    b, n, c = 4, p + 30, 7
    x = torch.randn(b, n, c, generator=g)
    size0 = torch.randint(1, 6, (b, n, 1), generator=g).float()
    size0[:, :p] = 1
    metric = torch.randn(b, n, 5, generator=g)
    merge = bipartite_soft_matching(metric, 1000, p)
    assert merge.r == max_merges(n, p) == 15
    out, size, source = merge_wavg(merge, x, size0, _eye(b, n, torch.float32))
    assert out.shape == (b, n - 15, c)
    assert torch.equal(out[:, :p], x[:, :p])  # prefix in place, values untouched
    assert torch.equal(size[:, :p], torch.ones(b, p, 1))
    assert torch.equal(source[:, :p], _eye(b, n, torch.float32)[:, :p])
    # sources: a one-hot partition of the input tokens, consistent with the sizes
    assert set(source.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(source.sum(dim=1), torch.ones(b, n))
    torch.testing.assert_close(size, source @ size0, rtol=0, atol=0)
    assert torch.equal(size.sum(dim=1), size0.sum(dim=1))
    # size-weighted average of the members
    torch.testing.assert_close(out, (source @ (x * size0)) / size, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p", [0, 1, 2])
def test_merge_rows_cover_every_token_once(p):
    """``perm`` lists every input row once, kept rows first in output order; ``dest`` sends the kept
    rows to ``0, 1, ...`` and each merged-away set-A row to a set-B row of its own image."""
    b, t, r = 3, p + 21, 6
    merge = bipartite_soft_matching(torch.randn(b, t, 5, generator=torch.Generator().manual_seed(p)), r, p)
    k = merge.num_kept
    assert k == b * (t - r)
    assert torch.equal(merge.perm.sort().values, torch.arange(b * t))
    assert torch.equal(merge.dest[:k], torch.arange(k))
    image_in, image_out = merge.src_rows // t, merge.dst_rows // (t - r)
    assert torch.equal(image_in, image_out)
    a_offset = p % 2
    assert torch.equal((merge.src_rows % t - p - a_offset) % 2, torch.zeros(b * r, dtype=torch.long))  # set A
    num_unm = (t - p + 1 - a_offset) // 2 - r
    assert bool((merge.dst_rows % (t - r) >= p + num_unm).all())  # into set B, which follows the unmerged A


def test_no_merge_cases():
    metric = torch.randn(2, 9, 4)
    assert bipartite_soft_matching(metric, 0, 1) is None
    assert bipartite_soft_matching(metric, -3, 1) is None
    assert bipartite_soft_matching(metric[:, :2], 5, 1) is None  # one unprotected token
    assert bipartite_soft_matching(metric, 5, 9) is None  # everything protected
    assert max_merges(9, 1) == 4 and max_merges(10, 1) == 4 and max_merges(3, 5) == 0
    merge = bipartite_soft_matching(metric[:, :3], 5, 1)  # two unprotected tokens: one merge
    assert merge.r == 1


def test_batch_elements_are_matched_independently():
    g = torch.Generator().manual_seed(5)
    metric = torch.randn(3, 21, 6, generator=g)
    x = torch.randn(3, 21, 4, generator=g)
    batched, _, _ = merge_wavg(bipartite_soft_matching(metric, 7, 1), x, None)
    for i in range(3):
        single, _, _ = merge_wavg(bipartite_soft_matching(metric[i:i + 1], 7, 1), x[i:i + 1], None)
        assert torch.equal(batched[i:i + 1], single)


def test_an_empty_batch_merges_into_an_empty_batch():
    """No images: the rows' layout counted from an offset past its end, and a reshape to ``-1`` had nothing to infer
    it from."""
    merge = bipartite_soft_matching(torch.randn(0, 17, 8), 3, 1)
    assert merge.num_images == 0 and merge.src_idx.shape == merge.dst_idx.shape == (0, 3)
    x = torch.randn(0, 17, 5, requires_grad=True)
    out, size, source = merge_wavg(merge, x, torch.ones(0, 17, 1), _eye(0, 17, torch.float32))
    assert (out.shape, size.shape, source.shape) == ((0, 14, 5), (0, 14, 1), (0, 14, 17))
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert merge(torch.zeros(0, 17, 17), mode="amax").shape == (0, 14, 17)
    assert unmerge_tokens(out, source).shape == x.shape


def test_merge_accepts_extra_dims():
    g = torch.Generator().manual_seed(6)
    merge = bipartite_soft_matching(torch.randn(2, 13, 4, generator=g), 4, 1)
    y = torch.randn(2, 13, 3, 5, generator=g)
    out = merge(y)
    assert out.shape == (2, 9, 3, 5)
    assert torch.equal(out.reshape(2, 9, 15), merge(y.reshape(2, 13, 15)))


def test_metric_is_not_differentiated_but_tokens_are():
    g = torch.Generator().manual_seed(8)
    metric = torch.randn(2, 11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    merge = bipartite_soft_matching(metric, 4, 1)
    assert not merge.src_idx.requires_grad
    size = torch.randint(1, 4, (2, 11, 1), generator=g).double()
    x = torch.randn(2, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    out, new_size, source = merge_wavg(merge, x, size, _eye(2, 11))
    assert not new_size.requires_grad and not source.requires_grad
    assert torch.autograd.gradcheck(lambda t: merge_wavg(merge, t, size)[0], (x,))
    out.sum().backward()
    # d(sum of merged tokens)/dx_i = size_i / size of its group: 1 for tokens kept alone
    expected = size / (source.transpose(1, 2) @ new_size)
    torch.testing.assert_close(x.grad, expected.expand_as(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [1, 2])
def test_merge_gradient_is_the_gradient_of_its_ops(p):
    """The hand-written backward (one gather and one index_copy) against autograd run on the
    forward's own ops: the same numbers bit for bit, in fp32, with sizes that make every weight differ."""
    g = torch.Generator().manual_seed(9 + p)
    n, t, c = 3, 20, 8
    merge = bipartite_soft_matching(torch.randn(n, t, 6, generator=g), 7, p)
    size = torch.randint(1, 6, (n, t, 1), generator=g).float()
    x = torch.randn(n, t, c, generator=g, requires_grad=True)
    grad = torch.randn(n, t - 7, c, generator=g)
    out, new_size, _ = merge_wavg(merge, x, size)
    (x_grad,) = torch.autograd.grad(out, x, grad)

    sizes = size.reshape(n * t, 1).index_select(0, merge.perm)
    weight = sizes / new_size.reshape(-1, 1).index_select(0, merge.dest)
    rows = x.reshape(n * t, c).index_select(0, merge.perm) * weight
    k = merge.num_kept
    by_ops = rows[:k].clone().scatter_add(0, merge.dst_rows[:, None].expand(-1, c), rows[k:])
    (ops_grad,) = torch.autograd.grad(by_ops, x, grad.reshape(-1, c))
    assert torch.equal(out.reshape(-1, c), by_ops)
    assert torch.equal(x_grad, ops_grad)


def test_merge_of_a_handed_over_residual_add_is_the_merge_of_the_sum():
    """A merging block hands the merge its attention branch instead of adding it first: the same
    merged tokens bit for bit, and the same gradients for the stream and (fp16) the branch."""
    g = torch.Generator().manual_seed(12)
    n, t, c = 2, 19, 6
    merge = bipartite_soft_matching(torch.randn(n, t, 4, generator=g), 5, 1)
    size = torch.randint(1, 4, (n, t, 1), generator=g).float()
    x = torch.randn(n, t, c, generator=g, requires_grad=True)
    branch = torch.randn(n, t, c, generator=g).half().requires_grad_()
    grad = torch.randn(n, t - 5, c, generator=g)
    handed, handed_size, _ = merge_wavg(merge, x, size, None, branch)
    handed_grads = torch.autograd.grad(handed, (x, branch), grad)
    summed, summed_size, _ = merge_wavg(merge, x + branch, size)
    summed_grads = torch.autograd.grad(summed, (x, branch), grad)
    assert torch.equal(handed, summed) and torch.equal(handed_size, summed_size)
    assert handed_grads[1].dtype == torch.float16
    assert all(torch.equal(a, b) for a, b in zip(handed_grads, summed_grads))


def test_cached_row_layout_outlives_inference_mode():
    """The shape-only rows are built once per shape and reused by later calls: built during an
    evaluation pass under ``inference_mode``, they must still serve a training step."""
    g = torch.Generator().manual_seed(10)
    metric, x = torch.randn(2, 23, 4, generator=g), torch.randn(2, 23, 5, generator=g)
    _cached_row_layout.cache_clear()
    with torch.inference_mode():
        evaluated, _, _ = merge_wavg(bipartite_soft_matching(metric, 6, 1), x, None)
    layout = row_layout(2, 23, 6, 1, x.device)
    assert not any(t.is_inference() for t in vars(layout).values())
    assert _cached_row_layout.cache_info().hits >= 1

    x.requires_grad_()
    trained, _, _ = merge_wavg(bipartite_soft_matching(metric, 6, 1), x, None)
    trained.sum().backward()
    assert torch.equal(trained.detach(), evaluated)
    assert x.grad is not None and torch.equal(x.grad.sum((0, 2)) > 0, torch.ones(23, dtype=torch.bool))


def test_the_op_a_compiled_graph_calls_caches_no_layout():
    """Under mode reduce-overhead, CUDA graph trees refuse a graph whose first calls leave tensors alive in its
    memory pool (H100, 2026-11-27: "60 tensor(s) in the cudagraph pool not tracked as outputs", ViT-B's 12
    cached layouts of 5 tensors). The planning op the graph calls builds its layout each call, and plans the
    same rows as eager planning, which caches it."""
    g = torch.Generator().manual_seed(13)
    keys, size = torch.randn(2, 3, 23, 8, generator=g), torch.randint(1, 4, (2 * 23,), generator=g).float()
    _cached_row_layout.cache_clear()
    compiled = torch.ops.tome_train.plan_layer(keys, size, 6, 1, torch.float32)
    assert _cached_row_layout.cache_info().currsize == 0
    eager = plan_layer(keys, size, 6, 1, torch.float32)
    assert _cached_row_layout.cache_info().currsize == 1
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager[:4]))


# --------------------------------------------------------------------------------------
# Unmerging
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0, 1, 2, 5])
def test_unmerge_restores_layout(p):
    g = torch.Generator().manual_seed(21 + p)
    b, n, c = 2, p + 27, 6
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    merge = bipartite_soft_matching(torch.randn(b, n, 5, generator=g, dtype=torch.float64), 9, p)
    merged, _, source = merge_wavg(merge, x, None, _eye(b, n))
    back = unmerge_tokens(merged, source)
    assert back.shape == x.shape
    # every original token gets the value of the token holding it
    member = source.argmax(dim=1)  # [B, N]: which merged token holds original token j
    expected = merged.gather(1, member[..., None].expand(-1, -1, c))
    assert torch.equal(back, expected)
    # tokens that were not merged come back bit-identical
    alone = (source.sum(dim=2) == 1)  # merged tokens of size 1
    alone_orig = (source * alone[..., None]).sum(dim=1).bool()
    num_dst = sum(len(merge.dst_idx[i].unique()) for i in range(b))
    assert alone_orig.sum() == b * (n - 9) - num_dst
    assert torch.equal(back[alone_orig], x[alone_orig])
    assert torch.equal(back[:, :p], x[:, :p])


def test_unmerge_through_several_layers():
    g = torch.Generator().manual_seed(31)
    b, n, c, p = 2, 34, 4, 2
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    layer_sources, y, size, source = [], x, None, _eye(b, n)
    for r in [8, 6, 5]:
        merge = bipartite_soft_matching(torch.randn(b, y.shape[1], 3, generator=g, dtype=torch.float64), r, p)
        y, size, source = merge_wavg(merge, y, size, source)
        layer_sources.append(merge(_eye(b, merge.num_tokens), mode="sum"))  # this layer's own source map
    back = y
    for layer_source in reversed(layer_sources):  # one layer at a time, the way the tokens merged
        back = unmerge_tokens(back, layer_source)
    assert back.shape == x.shape
    assert torch.equal(unmerge_tokens(y, source), back)
    # averaging the unmerged tokens gives back the size-weighted mean of the merged ones
    torch.testing.assert_close(back.mean(dim=1), (y * size).sum(dim=1) / size.sum(dim=1), rtol=0, atol=1e-12)
    # and the mean of the original tokens is conserved by size-weighted merging
    torch.testing.assert_close(back.mean(dim=1), x.mean(dim=1), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------
# scripts/merge_probe.py: fused Triton kernels for the merge, run by Triton's CPU interpreter
# --------------------------------------------------------------------------------------
@pytest.fixture
def merge_probe(load_script):
    """The probe script, its Triton kernels run by Triton's interpreter (``TRITON_INTERPRET``, conftest.py)."""
    return load_script("merge_probe")


def test_probe_writes_each_part_of_each_variant(merge_probe, tmp_path):
    import json

    out = tmp_path / "merge.json"
    merge_probe.main(["--device", "cpu", "--batch-size", "2", "--channels", "24", "--tokens", "17",
                      "--r", "3", "--warmup", "0", "--steps", "1", "--host-calls", "1", "--output", str(out)])
    rows = json.loads(out.read_text())["rows"]
    parts = ("match", "plan", "weights", "layer", "merge", "add_merge", "add_merge_norm", "merge_backward")
    assert [(row["variant"], row["tokens"], row["part"]) for row in rows] == [
        (v, 17, part) for v, v_parts in (("torch", parts), ("triton", parts), ("triton_parts", ["layer"]),
                                         ("triton_a64", ["layer"]), ("triton_heads1", ["layer"]),
                                         ("triton_ieee", ["match", "layer"]),
                                         ("triton_warps4", ["layer"]), ("triton_warps16", ["layer"]),
                                         ("triton_then_norm", ["add_merge_norm"]))
        for part in v_parts]
    assert all(row["ms"] > 0 and row["host_us"] > 0 and row["vs_torch"] > 0 and row["max_diff"] <= 1e-6 for row in rows)
    assert all(row["same_argmax"] for row in rows if row["part"] == "match")


def test_overlap_probe_refuses_a_machine_without_cuda(load_script, capsys):
    """scripts/overlap_probe.py times CUDA streams and graphs: on a CPU it stops at once, with one line and exit 2."""
    with pytest.raises(SystemExit) as stop:
        load_script("overlap_probe").main(["--device", "cpu"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == ("--device cpu: the probe times CUDA streams and graphs; use cuda on a "
                                               "machine with one")
