"""The fused Triton kernels of the matching and the merge against PyTorch's ops (run here by Triton's
interpreter, which ``tests/conftest.py`` turns on), and the measured choice between the two
(:class:`FastestPath`)."""
from __future__ import annotations

import time

import pytest
import torch

from tome_train.tome import bipartite_soft_matching
from tome_train.tome import kernels
from tome_train.tome.kernels import FastestPath
from tome_train.tome.merge import (Merge, _merge_norm_rows, _merge_rows, _merge_rows_backward, _most_similar,
                                   _plan_layer, _plan_merge, _same_merge_and_norm, _size_weights, _weighted_merge,
                                   _weighted_merge_backward, _weighted_merge_norm, merges_into_norm, most_similar,
                                   plan_layer, plan_merge, same_layer_plan, same_matches, size_weights)
from tome_train.tome.triton_kernels import (fused_merge, fused_merge_backward, fused_merge_norm, fused_most_similar,
                                            fused_plan_layer, fused_plan_merge, fused_size_weights)

pytestmark = pytest.mark.usefixtures("one_thread")


def merge_inputs(tied: bool, seed: int = 0):
    """A merge of 3 images of 23 tokens (class token first, r 6) with sizes 1-7: ``rows``, ``perm``,
    ``dest``, ``weight``, ``num_kept``. ``tied``: all keys alike, so every merged-away token goes to the
    first set-B token (ties go to the first), where the kernel's atomic adds pile up on one row."""
    g = torch.Generator().manual_seed(seed)
    metric = torch.ones(3, 23, 8) if tied else torch.randn(3, 23, 8, generator=g)
    merge = bipartite_soft_matching(metric, 6, 1)
    if tied:
        assert merge.dst_idx.unique().tolist() == [0]
    weight, _ = merge.weights(torch.randint(1, 8, (3, 23, 1), generator=g), torch.float32)
    return torch.randn(3 * 23, 40, generator=g), merge.perm, merge.dest, weight, merge.num_kept


@pytest.mark.parametrize("tied", [False, True])
def test_fused_merge_is_the_merge(tied):
    rows, perm, dest, weight, k = merge_inputs(tied)
    expected = _weighted_merge(rows, perm, dest, weight, k)
    fused = fused_merge(rows, perm, dest, weight, k)
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)  # atomic adds: their order may differ
    receives = torch.zeros(k, dtype=torch.bool).index_fill_(0, dest[k:], True)
    assert torch.equal(fused[~receives], expected[~receives])

    # the residual add inside the kernel: an fp16 branch onto the fp32 stream, never written as a sum
    branch = torch.randn(rows.shape, dtype=torch.float16)
    fused = fused_merge(rows, perm, dest, weight, k, branch=branch)
    torch.testing.assert_close(fused, _weighted_merge(rows, perm, dest, weight, k, branch), rtol=1e-6, atol=1e-6)

    grad = torch.randn(k, 40)
    assert torch.equal(fused_merge_backward(grad, perm, dest, weight), _weighted_merge_backward(grad, perm, dest, weight))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("with_branch", [False, True])
@pytest.mark.parametrize("normed_dtype", [torch.float32, torch.float16])
def test_fused_merge_norm_is_the_merge_and_its_layer_norm(tied, with_branch, normed_dtype):
    """One kernel merges the rows (with a block's fp16 residual branch) and layer-norms the result for the MLP, in
    fp32 or as the fp16 that autocast would hand the MLP: against the merge and ``F.layer_norm`` in float64, the
    merged rows to fp32 rounding (bit for bit where nothing merges into a row), the norm to fp32 rounding or two
    units in fp16's last place; a norm without its bias is caught."""
    rows, perm, dest, weight, k = merge_inputs(tied)
    g = torch.Generator().manual_seed(1)
    branch = torch.randn(rows.shape, generator=g).half() if with_branch else None
    scale, shift = torch.randn(40, generator=g), torch.randn(40, generator=g)
    args = (rows, perm, dest, weight, k, branch, scale, shift, 1e-6, normed_dtype, 3)
    merged, normed = fused_merge_norm(*args)
    double = _weighted_merge(rows.double(), perm, dest, weight.double(), k,
                             branch.double() if with_branch else None)
    torch.testing.assert_close(merged, double.float(), rtol=1e-6, atol=1e-6)
    receives = torch.zeros(k, dtype=torch.bool).index_fill_(0, dest[k:], True)
    assert torch.equal(merged[~receives], _weighted_merge(rows, perm, dest, weight, k, branch)[~receives])
    expected = torch.nn.functional.layer_norm(double, (40,), scale.double(), shift.double(), 1e-6)
    assert normed.dtype == normed_dtype
    torch.testing.assert_close(normed.double(), expected, **(
        dict(rtol=1e-5, atol=1e-5) if normed_dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)))
    assert _same_merge_and_norm(args, _weighted_merge_norm(*args), (merged, normed))
    assert not _same_merge_and_norm(args, _weighted_merge_norm(*args), (merged, normed - shift.to(normed_dtype)))


def test_the_merge_hands_the_mlp_its_norm_only_where_one_kernel_may_do_both():
    """:func:`merges_into_norm`: without a gradient, eagerly, on a device the kernel is chosen on, for a layer norm
    with weight and bias (not an RMS norm, not timm's half-precision ``fast_norm``)."""
    import timm.layers

    x = torch.randn(2, 5, 8)
    norm = torch.nn.LayerNorm(8)
    assert not merges_into_norm(norm, x)  # a CPU tensor: the kernel is chosen on a GPU only
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_merge_norm_rows, "device_types", ("cpu",))
        assert merges_into_norm(norm, x) and merges_into_norm(timm.layers.LayerNorm(8), x)
        assert not merges_into_norm(norm, x, torch.randn(2, 5, 8, requires_grad=True))
        with torch.no_grad():
            assert merges_into_norm(norm, x.requires_grad_())
        assert not merges_into_norm(torch.nn.LayerNorm(8, bias=False), x)
        assert not merges_into_norm(timm.layers.RmsNorm(8), x)
        fast = timm.layers.LayerNorm(8)
        fast.fast_norm = True
        assert not merges_into_norm(fast, x)


# bf16: the kernels' arithmetic written out in PyTorch (the interpreter cannot run their bf16), so the tolerance is tested
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16-kernels"),
                                   pytest.param(torch.bfloat16, id="bf16-kernels-arithmetic")])
def test_half_precision_merges_by_the_kernels_agree_to_rounding(dtype):
    """A half-precision model merges half-precision rows: the kernels accumulate each destination in fp32 and
    round once, PyTorch's ops round every product and sum, so the two differ in the last place and the merge's
    check allows two units there (:func:`kernels.same_to_rounding`), not more: a row of another token is off by
    far more. bf16 as the kernels would give it, the fp32 result rounded (the interpreter's bf16 is unusable here:
    no atomic add, bit patterns where values should be)."""
    rows, perm, dest, weight, k = merge_inputs(tied=True)
    args = (rows.to(dtype), perm, dest, weight.to(dtype), k)
    full = (rows, perm, dest, weight.to(dtype).float(), k)
    expected = _weighted_merge(*args)
    fused = fused_merge(*args) if dtype == torch.float16 else _weighted_merge(*full).to(dtype)
    assert not torch.equal(fused, expected) and kernels.same_to_rounding(args, expected, fused)
    assert not kernels.same_to_rounding(args, expected, fused.roll(1, 0))
    grad_args = (torch.randn(k, 40).to(dtype), perm, dest, args[3])
    expected = _weighted_merge_backward(*grad_args)
    fused = fused_merge_backward(*grad_args) if dtype == torch.float16 else \
        _weighted_merge_backward(grad_args[0].float(), perm, dest, full[3]).to(dtype)
    assert kernels.same_to_rounding(grad_args, expected, fused)
    assert not kernels.same_to_rounding(full, _weighted_merge(*full), _weighted_merge(*full) + 1e-4)  # fp32: 1e-5


def maxima(n: int, t: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The matching's maxima and set-B indices ``[n, Na]`` for random features, image 0's first three maxima
    made equal to its fourth and, past 20 tokens, image 1's sixth a NaN (a zero feature)."""
    node_max, node_idx = most_similar(torch.randn(n, t, 8, generator=torch.Generator().manual_seed(seed)), p)
    node_max[0, :3] = node_max[0, 3]
    if t > 20:
        node_max[1, 5] = float("nan")
    return node_max, node_idx


# (images, tokens, protected, r): a class token; 197 tokens (ViT-B) in several comparison blocks; two and
# three protected tokens (set A first, then second) at the 50% cap; none; one merge
PLANS = [(3, 23, 1, 6), (2, 197, 1, 16), (2, 40, 2, 19), (2, 41, 3, 19), (4, 17, 0, 8), (2, 9, 1, 1)]


@pytest.mark.parametrize("n,t,p,r", PLANS)
def test_fused_plan_is_the_plan_exactly(n, t, p, r):
    node_max, node_idx = maxima(n, t, p, seed=t + p)
    expected = plan_merge(node_max, node_idx, r, p, t)
    fused = fused_plan_merge(node_max, node_idx, r, p, t)
    assert kernels.identical((), expected, fused)
    assert not kernels.identical((), expected, (fused[0], fused[1] + (fused[1] == 0)))  # one row off: another merge


def test_the_plan_takes_equal_maxima_in_token_order_and_nan_first():
    node_max, node_idx = torch.tensor([[0.5, 0.9, 0.5, float("nan"), 0.5]]), torch.zeros(1, 5, dtype=torch.long)
    perm, dest = plan_merge(node_max, node_idx, 3, 1, 11)
    merge = Merge(1, 11, 3, perm, dest)
    assert merge.src_idx.tolist() == [[3, 1, 0]] and merge.unm_idx.tolist() == [[2, 4]]
    assert kernels.identical((), (perm, dest), fused_plan_merge(node_max, node_idx, 3, 1, 11))


@pytest.mark.parametrize("n,t,p,r", PLANS)
def test_fused_size_weights_are_the_weights(n, t, p, r):
    """Exact in fp32 and fp16 (whole-number sizes add up exactly in any order; the divisions are correctly
    rounded); bf16 to one unit in the last place, as Triton's interpreter truncates on conversion to bf16
    where a GPU rounds to nearest (a weight of 1 stays exact)."""
    perm, dest = plan_merge(*maxima(n, t, p, seed=t), r, p, t)
    sizes = torch.randint(1, 9, (n * t,), generator=torch.Generator().manual_seed(1))
    for size in (None, sizes.float(), sizes.half()):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            expected = size_weights(perm, dest, size, t, r, dtype)
            fused = fused_size_weights(perm, dest, size, t, r, dtype)
            assert all(e.dtype == f.dtype == dtype and e.shape == f.shape for e, f in zip(expected, fused))
            assert torch.equal(fused[1], expected[1])
            if dtype == torch.bfloat16:
                torch.testing.assert_close(fused[0], expected[0], rtol=2 ** -7, atol=0)
                assert torch.equal(fused[0] == 1, expected[0] == 1)
            else:
                assert torch.equal(fused[0], expected[0])


def layer_keys(n: int, t: int, heads: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Attention keys ``[n, heads, t, dim]`` as timm makes them: a strided view of one packed qkv."""
    qkv = torch.randn(n, t, 3 * heads * dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return qkv.reshape(n, t, 3, heads, dim).permute(2, 0, 3, 1, 4)[1]


# (images, tokens, protected, r, heads, head dim): ViT-B's first layer (set A in one matching block of 128, or
# two of 64; set B in four); head dims padded in the kernel (ViT-H's 80 to 128, set B then in blocks of 16);
# two and no protected tokens, at the cap; one head
LAYERS = [(2, 197, 1, 16, 3, 64), (3, 23, 1, 6, 2, 40), (2, 37, 1, 8, 2, 80), (2, 40, 2, 19, 2, 16),
          (2, 17, 0, 8, 1, 16)]


@pytest.mark.parametrize("n,t,p,r,heads,dim,block_match,heads_per_step,products",
                         [(*layer, 128, 4, "tf32x3") for layer in LAYERS]
                         + [(*LAYERS[0], 64, 4, "tf32x3"), (*LAYERS[0], 128, 1, "tf32x3"),
                            (*LAYERS[0], 128, 2, "tf32x3"), (*LAYERS[0], 128, 4, "ieee")])
def test_fused_layer_plan_is_the_layer_plan(n, t, p, r, heads, dim, block_match, heads_per_step, products):
    """The one-kernel layer against the ops: the same matches, rows and weights (random keys, so no near-ties),
    for fp32 and fp16 keys, with and without sizes; and :func:`same_layer_plan` says so. The heads summed four at
    a time (of one to three: steps with heads past the last); ViT-B's first layer also with set A in two matching
    blocks, with its three heads summed one and two at a time, and with the similarity products in fp32 FMAs
    instead of three TF32 products each."""
    sizes = torch.randint(1, 9, (n * t,), generator=torch.Generator().manual_seed(2)).float()
    for keys_dtype, size, dtype in ((torch.float32, None, torch.float32), (torch.float16, sizes, torch.float16),
                                    (torch.float32, sizes, torch.float32)):
        keys = layer_keys(n, t, heads, dim, seed=t, dtype=keys_dtype)
        args = (keys, size, r, p, dtype)
        expected, fused = plan_layer(*args), fused_plan_layer(*args, block_match=block_match,
                                                             heads_per_step=heads_per_step, products=products)
        assert kernels.identical(args, expected[:2], fused[:2])  # perm, dest
        assert kernels.identical(args, expected[2:4], fused[2:4])  # weight, new size
        assert torch.equal(fused[5], expected[5])
        torch.testing.assert_close(fused[4], expected[4], rtol=1e-5, atol=1e-6)
        assert same_layer_plan(args, expected, fused)


def test_three_tf32_products_per_fp32_one_pass_the_matchings_check_and_one_does_not():
    """The kernels' similarity dots take three TF32 tensor-core products per fp32 product (``products="tf32x3"``:
    each factor split into its TF32 part and the TF32 part of the rest, the rests' product dropped). Triton's
    interpreter computes those dots in fp32, so here the split is written out: on ViT-B's first layer of unit-length
    features the scores stay within 1e-6 of float64's (fp32's own error: about 1.5e-7) and :func:`same_matches`
    accepts the maxima and argmax they give; TF32 alone, off by about 5e-4, it refuses."""
    from tome_train.tome.merge import _unit_sets

    metric = torch.randn(4, 197, 64, generator=torch.Generator().manual_seed(0))
    a, b = _unit_sets(metric, 1)

    def tf32(x):  # the top 10 of fp32's 23 mantissa bits
        return (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)

    a_hi, b_hi = tf32(a), tf32(b)
    a_lo, b_lo = tf32(a - a_hi), tf32(b - b_hi)
    three = a_hi @ b_hi.transpose(1, 2) + a_hi @ b_lo.transpose(1, 2) + a_lo @ b_hi.transpose(1, 2)
    one = a_hi @ b_hi.transpose(1, 2)
    exact = a.double() @ b.double().transpose(1, 2)
    assert (three.double() - exact).abs().max() < 1e-6 < 1e-4 < (one.double() - exact).abs().max()
    expected = most_similar(metric, 1)
    assert same_matches((metric, 1), expected, three.max(-1))
    assert not same_matches((metric, 1), expected, one.max(-1))


def test_same_layer_plan_takes_ties_either_way_and_nothing_else():
    """Two set-A tokens with the same keys tie at the last merge: a kernel may order them either way (its
    maxima are the ops' to rounding), but its rows must be the plan of its own maxima."""
    t, p, r = 23, 1, 6
    keys = layer_keys(1, t, 2, 16, seed=7).clone()
    merge = Merge(p, t, r, *plan_layer(keys, None, r, p, torch.float32)[:2])
    last, unmerged = merge.src_idx[0, -1].item(), merge.unm_idx[0, 0].item()
    keys[:, :, 2 + 2 * unmerged] = keys[:, :, 2 + 2 * last]  # set A is every second token from 2
    args = (keys, None, r, p, torch.float32)
    expected = plan_layer(*args)
    node_max, node_idx = expected[4:]
    later = max(last, unmerged)  # the stable order takes the earlier of the two; nudged up, the later goes first
    nudged = node_max.clone()
    nudged[0, later] += 1e-7
    rows = plan_merge(nudged, node_idx, r, p, t)
    assert not kernels.identical(args, expected[:2], rows)
    candidate = (*rows, *size_weights(*rows, None, t, r, torch.float32), nudged, node_idx)
    assert same_layer_plan(args, expected, candidate)
    assert not same_layer_plan(args, expected, (*candidate[:4], node_max, node_idx))  # rows not of its maxima
    perm, dest, weight, new_size = expected[:4]
    assert not same_layer_plan(args, expected, (perm, dest + (dest == 0), weight, new_size, node_max, node_idx))
    assert not same_layer_plan(args, expected, (perm, dest, weight * 1.01, new_size, node_max, node_idx))
    assert not same_layer_plan(args, expected, (perm, dest, weight, new_size, node_max + 1e-3, node_idx))


# Triton's interpreter runs these merges in about 20 ms on the CPU: PyTorch's ops slowed by 5x that lose for sure
SLOWED_MERGE_S = 0.1


def _slow(fn, seconds):
    def slowed(*args):
        time.sleep(seconds)
        return fn(*args)

    slowed.__name__ = f"slow_{fn.__name__}"
    return slowed


def test_fastest_path_keeps_the_faster_per_shape_and_never_a_wrong_one():
    rows, perm, dest, weight, k = merge_inputs(tied=False)
    args = (rows, perm, dest, weight, k)
    faster = FastestPath(_slow(_weighted_merge, SLOWED_MERGE_S), fused_merge, device_types=("cpu",))
    assert torch.allclose(faster(*args), _weighted_merge(*args), atol=1e-6)
    assert list(faster.choices.values()) == [fused_merge]
    slower = FastestPath(_weighted_merge, _slow(fused_merge, 0.02), device_types=("cpu",))
    slower(*args)
    assert list(slower.choices.values()) == [_weighted_merge]

    def wrong(rows, perm, dest, weight, num_kept):
        return _weighted_merge(rows, perm, dest, weight, num_kept) + 1e-3

    with pytest.warns(RuntimeWarning, match="wrong cannot stand in for _weighted_merge here .a different result"):
        assert torch.equal(FastestPath(_weighted_merge, wrong, ("cpu",))(*args), _weighted_merge(*args))

    def failing(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    broken = FastestPath(_weighted_merge, failing, ("cpu",))
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        broken(*args)
    assert broken.broken and torch.equal(broken(*args), _weighted_merge(*args))  # never tried again


def test_fastest_path_stays_with_the_reference_where_it_must():
    rows, perm, dest, weight, k = merge_inputs(tied=False)
    args = (rows, perm, dest, weight, k)
    path = FastestPath(_slow(_weighted_merge, SLOWED_MERGE_S), fused_merge, device_types=("cuda",))
    path(*args)  # a CPU tensor: not a device this path chooses on
    assert path.choices == {}
    path = FastestPath(_slow(_weighted_merge, SLOWED_MERGE_S), fused_merge, device_types=("cpu",), deterministic=False)
    grad = torch.randn(k, rows.shape[1])
    backward = FastestPath(_slow(_weighted_merge_backward, SLOWED_MERGE_S), fused_merge_backward, device_types=("cpu",))
    torch.use_deterministic_algorithms(True)  # the merge kernel adds merged rows atomically, its backward gathers
    try:
        path(*args)
        backward(grad, perm, dest, weight)
    finally:
        torch.use_deterministic_algorithms(False)
    assert path.choices == {} and list(backward.choices.values()) == [fused_merge_backward]
    assert not _merge_rows.deterministic and _merge_rows_backward.deterministic and _plan_layer.deterministic
    with kernels.pytorch_ops_only():
        path(*args)
    assert path.choices == {}


def test_the_time_choices_take_is_counted():
    """:func:`kernels.choosing_seconds` adds what each new shape's choice took (here at least the slowed reference's
    ten runs: one for the check, nine timed) and nothing for a shape already chosen."""
    rows, perm, dest, weight, k = merge_inputs(tied=False)
    path = FastestPath(_slow(_weighted_merge, SLOWED_MERGE_S), fused_merge, device_types=("cpu",))
    before = kernels.choosing_seconds()
    path(rows, perm, dest, weight, k)
    chosen = kernels.choosing_seconds()
    assert chosen - before >= 10 * SLOWED_MERGE_S and abs(path.choosing_s - (chosen - before)) < 1e-9
    path(rows, perm, dest, weight, k)
    assert kernels.choosing_seconds() == chosen

    # a reference that runs a path of its own (the merge and norm's runs the merge's): each choice counted once
    inner = FastestPath(_slow(_weighted_merge, SLOWED_MERGE_S), fused_merge, device_types=("cpu",))

    def merge_by_inner(*args):
        return inner(*args)

    outer = FastestPath(merge_by_inner, fused_merge, device_types=("cpu",))
    started = time.perf_counter()
    outer(rows, perm, dest, weight, k)
    elapsed = time.perf_counter() - started
    counted = kernels.choosing_seconds() - chosen
    assert inner.choosing_s >= 10 * SLOWED_MERGE_S and outer.choosing_s > 0
    assert abs(counted - inner.choosing_s - outer.choosing_s) < 1e-9 and counted <= elapsed


def test_choices_for_graphs_go_by_the_device_time_and_say_so():
    """Inside :func:`kernels.choosing_for_graphs` a choice is timed by the device's work alone (on a CPU, where
    every op is the host's, as before) and its times say so; the setting ends with the block, also on an error."""
    def merge_for_graphs(*args):  # a name of its own in the report
        return fused_merge(*args)

    rows, perm, dest, weight, k = merge_inputs(tied=False)
    path = FastestPath(_slow(_weighted_merge, SLOWED_MERGE_S), merge_for_graphs, device_types=("cpu",))
    with kernels.choosing_for_graphs():
        path(rows, perm, dest, weight, k)
    path(rows[:, :20].contiguous(), perm, dest, weight, k)
    assert list(path.choices.values()) == [merge_for_graphs, merge_for_graphs]
    assert [entry["timed"] for entry in kernels.choice_times()["merge_for_graphs"]] == ["device", "host and device"]
    with pytest.raises(RuntimeError), kernels.choosing_for_graphs():
        raise RuntimeError
    assert not FastestPath.device_time_only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device time needs a GPU")
def test_on_a_gpu_a_choice_for_graphs_ignores_the_hosts_time():
    """A candidate with half the reference's device work (one matmul where the reference adds one by the identity,
    which changes nothing) but 5 ms of host time per call: slower by wall time, faster as a CUDA graph replays it."""
    x, w = (torch.randn(2048, 2048, device="cuda") for _ in range(2))

    def reference(x, w):
        return (x @ w) @ torch.eye(2048, device="cuda")

    def candidate(x, w):
        time.sleep(0.005)
        return x @ w

    by_wall, for_graphs = FastestPath(reference, candidate), FastestPath(reference, candidate)
    by_wall(x, w)
    with kernels.choosing_for_graphs():
        for_graphs(x, w)
    assert list(by_wall.choices.values()) == [reference] and list(for_graphs.choices.values()) == [candidate]
    (ops, kernel, timed), = for_graphs.seconds.values()
    assert timed == "device" and kernel < ops < 0.005


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device time needs a GPU")
def test_on_a_gpu_device_time_lengthens_a_sleep_that_did_not_hide_the_host(monkeypatch):
    """A sleep rate measured 20 times too low (as at a lower clock than the timing's) makes sleeps too short to
    hide the host's 5 ms per call: the runs that show it are dropped, the sleep doubled, the device's work kept."""
    x, w = (torch.randn(2048, 2048, device="cuda") for _ in range(2))

    def slow_to_launch(x, w):
        time.sleep(0.005)
        return x @ w

    rate = kernels._sleep_cycles_per_second(x.device)
    monkeypatch.setattr(kernels, "_sleep_cycles_per_second", lambda device: rate / 20)
    assert kernels.device_seconds_per_call(slow_to_launch, x.device, (x, w)) < 0.002


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device time needs a GPU")
def test_on_a_gpu_device_time_of_a_call_that_waits_for_the_device_is_its_wall_time_and_says_so():
    """A call that synchronizes keeps the host busy for as long as the device sleeps first: the host then takes
    longer to enqueue a run than a whole run takes without the sleep, and the timer warns and returns the wall time
    at once instead of doubling the sleep ten times."""
    x = torch.randn(1024, device="cuda")

    def waits(x):
        return x.sum().item()

    with pytest.warns(RuntimeWarning, match="wait for the device"):
        assert kernels.device_seconds_per_call(waits, x.device, (x,)) > 0


def test_the_merge_names_its_kernels():
    """The library's matching and merge stand the fused kernels against their ops (loaded by name at the first
    choice); the matching's are checked by :func:`same_matches`."""
    for path, kernel in ((_merge_rows, fused_merge), (_merge_rows_backward, fused_merge_backward),
                         (_most_similar, fused_most_similar), (_plan_merge, fused_plan_merge),
                         (_size_weights, fused_size_weights), (_plan_layer, fused_plan_layer)):
        assert path.device_types == ("cuda",)
        assert path._load() is kernel
    assert _most_similar.agree is same_matches
    assert _merge_rows.agree is kernels.same_to_rounding and _merge_rows_backward.agree is kernels.same_to_rounding
    assert _plan_merge.agree is kernels.identical and _size_weights.agree is kernels.same_result
    assert _plan_layer.agree is same_layer_plan


@pytest.mark.parametrize("p", [0, 1, 2])
def test_fused_matching_is_the_matching(p):
    g = torch.Generator().manual_seed(30 + p)
    # set B in one block of the kernel, in two, in seven; head dims a power of two and not (padded to 64)
    for tokens, dim in ((9, 64), (40, 64), (197, 64), (40, 40)):
        metric = torch.randn(2, tokens, dim, generator=g)
        node_max, node_idx = fused_most_similar(metric, p)
        expected_max, expected_idx = most_similar(metric, p)
        assert torch.equal(node_idx, expected_idx)
        torch.testing.assert_close(node_max, expected_max, rtol=0, atol=1e-6)
        assert same_matches((metric, p), (expected_max, expected_idx), (node_max, node_idx))


def test_same_matches_accepts_a_tie_broken_the_other_way_and_nothing_else():
    # class token, then set B = tokens 1, 3, 5 and set A = tokens 2, 4, 6; set-B tokens 1 and 5 are equal,
    # so set-A token 4 ties between them
    metric = torch.tensor([[[0.3, 0.3], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.1], [1.0, 0.0], [-1.0, 0.0]]])
    expected = most_similar(metric, 1)
    tie = expected[1][0, 1].item()
    assert expected[1].tolist() == [[1, tie, 1]] and tie in (0, 2)
    assert same_matches((metric, 1), expected, (expected[0], torch.tensor([[1, 2 - tie, 1]])))
    assert not same_matches((metric, 1), expected, (expected[0], torch.tensor([[0, tie, 1]])))  # not a maximum
    assert not same_matches((metric, 1), expected, (expected[0] + 1e-3, expected[1]))
    assert not same_matches((metric, 1), expected, (expected[0][:, :2], expected[1][:, :2]))


def test_fastest_path_keeps_its_choices_in_a_cuda_graph_capture_and_makes_none_there(monkeypatch):
    rows, perm, dest, weight, k = merge_inputs(tied=False)
    args = (rows, perm, dest, weight, k)
    path = FastestPath(_slow(_weighted_merge, SLOWED_MERGE_S), fused_merge, device_types=("cpu",))
    path(*args)
    monkeypatch.setattr(kernels, "capturing", lambda device: True)  # a CPU stand-in for a capturing stream
    calls = []
    path.candidate = path.choices[next(iter(path.choices))] = lambda *a: calls.append(a) or fused_merge(*a)
    path(*args)
    assert len(calls) == 1  # the choice made before the capture
    other_shape = (rows[:, :20].contiguous(), perm, dest, weight, k)
    assert torch.equal(path(*other_shape), _weighted_merge(*other_shape))
    assert len(path.choices) == 1  # none made while capturing: timing would synchronize


class _Sine(torch.autograd.Function):
    """``sin`` with its own backward, ``sign * cos``: right with sign 1, wrong with -1."""

    @staticmethod
    def forward(ctx, x, sign):
        ctx.save_for_backward(x)
        ctx.sign = sign
        return x.sin()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.cos() * ctx.sign, None


def sine(x):
    return _Sine.apply(x, 1.0)


def wrong_sine(x):
    return _Sine.apply(x, -1.0)


def test_a_differentiable_path_checks_and_times_the_backward_and_leaves_the_callers_graph_alone():
    weight = torch.randn(64, requires_grad=True)
    x = weight * 2  # the caller's graph: the choice must not backpropagate into it
    path = FastestPath(_slow(torch.sin, 0.02), sine, device_types=("cpu",), differentiable=True)
    out = path(x)
    assert list(path.choices.values()) == [sine] and weight.grad is None
    out.sum().backward()
    torch.testing.assert_close(weight.grad, 2 * x.detach().cos(), rtol=0, atol=1e-6)

    # the same output, the wrong gradient: only the backward shows it
    wrong = FastestPath(torch.sin, wrong_sine, device_types=("cpu",), differentiable=True)
    with pytest.warns(RuntimeWarning, match="wrong_sine cannot stand in for sin here .a different result"):
        wrong(x)
    assert wrong.broken
    forward_only = FastestPath(_slow(torch.sin, 0.02), wrong_sine, device_types=("cpu",))
    forward_only(x)
    assert list(forward_only.choices.values()) == [wrong_sine]  # why training needs differentiable=True


def test_through_backward_returns_the_output_and_the_input_gradients_with_a_fixed_output_gradient():
    def scaled_sine(x, scale):
        return x.sin() * scale

    x = torch.randn(5, requires_grad=True) * 1  # not a leaf
    state = torch.get_rng_state()
    args, functions = kernels.through_backward({scaled_sine: scaled_sine}, (x, 3))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream did not move
    assert args[1] == 3 and args[0].requires_grad and args[0].grad_fn is None and torch.equal(args[0], x)
    out, grad = functions[scaled_sine](*args)
    _, again = functions[scaled_sine](*args)
    assert torch.equal(out, 3 * x.detach().sin()) and torch.equal(grad, again)
    grad_out = grad / (3 * x.detach().cos())
    assert grad_out.std() > 0.1  # one random output gradient, not ones


def test_the_report_says_per_kernel_on_how_many_shapes_it_was_kept():
    rows, perm, dest, weight, k = merge_inputs(tied=False)
    path = FastestPath(_slow(_weighted_merge, SLOWED_MERGE_S), fused_merge, device_types=("cpu",))
    path(rows, perm, dest, weight, k)
    path(rows[:, :20].contiguous(), perm, dest, weight, k)
    assert kernels.report()["fused_merge"] == "2/2"

    def failing_kernel(*args):
        raise RuntimeError("no kernel image")

    broken = FastestPath(_weighted_merge, failing_kernel, device_types=("cpu",))
    with pytest.warns(RuntimeWarning):
        broken(rows, perm, dest, weight, k)
    assert kernels.report()["failing_kernel"] == "0/1 dropped"
    assert "fused_most_similar" not in kernels.report()  # the library's paths are not asked on a CPU


def test_fastest_path_is_never_asked_under_the_compiler_or_a_tracer():
    """inductor writes its own kernels and a tracer records ops: both get the reference, no choice is made."""
    x = torch.randn(8, 16)
    path = FastestPath(_slow(torch.sin, 0.02), sine, device_types=("cpu",))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: path(t) * 2, backend="eager")
    torch.testing.assert_close(compiled(x), 2 * x.sin())
    traced = torch.jit.trace(lambda t: path(t) * 2, (x,), check_trace=False)  # the check reruns it eagerly
    torch.testing.assert_close(traced(x), 2 * x.sin())
    assert path.choices == {}
    path(x)  # eagerly it chooses
    assert len(path.choices) == 1


# the kernels of a merging layer: the matching, rows and weights as three, or the layer's in one; the merge's
KERNEL_SETS = {"parts": (_most_similar, _plan_merge, _size_weights, _merge_rows, _merge_rows_backward),
               "whole_layer": (_plan_layer, _merge_rows, _merge_rows_backward)}


@pytest.mark.parametrize("kernel_set", KERNEL_SETS)
def test_a_model_with_every_merge_kernel_chosen_trains_as_with_pytorchs_ops(monkeypatch, kernel_set):
    """ViT-Ti (4 blocks at 64 px: 17 tokens, r 2 in each) with the merge's kernels standing in on the CPU (timed
    as the faster, so that every one is kept): the logits, the merges and every parameter's gradient as with
    PyTorch's ops, to the order of the atomic adds."""
    import timm

    from tome_train.tome import apply_tome, tome_state

    paths = KERNEL_SETS[kernel_set]
    for path in paths:
        monkeypatch.setattr(path, "device_types", ("cpu",))
        monkeypatch.setattr(path, "choices", {})
    monkeypatch.setattr(kernels, "seconds_per_call",
        lambda fn, device, args: 0.0 if fn.__name__.startswith("fused_") else 1.0)
    torch.manual_seed(0)
    model = apply_tome(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=10), 2)
    images = torch.randn(3, 3, 64, 64)

    def step():
        model.zero_grad()
        logits = model(images)
        logits.square().sum().backward()
        return logits.detach(), tome_state(model).size, [p.grad.clone() for p in model.parameters()]

    with kernels.pytorch_ops_only():
        expected = step()
    logits, size, grads = step()
    assert all(path.choices and all(c is path.candidate for c in path.choices.values()) for path in paths)
    torch.testing.assert_close(logits, expected[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(size, expected[1])
    for grad, expected_grad in zip(grads, expected[2]):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def tiny_model_preferring(monkeypatch, path: FastestPath):
    """ViT-Ti (4 blocks at 64 px, r 2, in eval mode) with ``path`` choosing on the CPU and its candidate timed as the
    faster, three images, and the logits and token sizes PyTorch's ops give them."""
    import timm

    from tome_train.tome import apply_tome, tome_state

    monkeypatch.setattr(path, "device_types", ("cpu",))
    monkeypatch.setattr(path, "choices", {})
    monkeypatch.setattr(kernels, "seconds_per_call", lambda fn, device, args: 0.0 if fn is path.candidate else 1.0)
    torch.manual_seed(0)
    model = apply_tome(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=10), 2).eval()
    images = torch.randn(3, 3, 64, 64)
    with kernels.pytorch_ops_only(), torch.no_grad():
        return model, images, model(images), tome_state(model).size


def test_a_model_merging_into_its_norm_infers_as_with_pytorchs_ops(monkeypatch):
    """ViT-Ti (4 blocks at 64 px, r 2) in inference with the one-kernel merge and norm standing in on the CPU (timed
    as the faster): it is kept in every merging layer, the logits and merges are PyTorch's ops'; a training step
    never asks for it (the merge's gradient goes through the merge kernels)."""
    from tome_train.tome import tome_state

    model, images, expected, expected_size = tiny_model_preferring(monkeypatch, _merge_norm_rows)
    with torch.no_grad():
        logits = model(images)
    assert len(_merge_norm_rows.choices) == 4
    assert all(c is fused_merge_norm for c in _merge_norm_rows.choices.values())
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(tome_state(model).size, expected_size)
    monkeypatch.setattr(_merge_norm_rows, "choices", {})
    model(images).sum().backward()
    assert _merge_norm_rows.choices == {}


def test_a_model_planning_beside_attention_infers_as_it_would_one_after_the_other(monkeypatch):
    """ViT-Ti (4 blocks at 64 px, r 2) in inference with the plan queued on a second stream as soon as the keys exist
    (here on the CPU, the streams recorded instead: the order is what a GPU would be given), timed as the faster: in
    every merging block the plan is queued before attention and awaited after it, before the merge; the logits and
    merges are those of the plan after attention; training, compiled regions and CUDA-graph captures never take it."""
    import contextlib

    from tome_train.tome import attention, compile_tome, timm_patch, tome_state

    path = timm_patch._merging_first_half
    order = []

    @contextlib.contextmanager
    def side_stream(device):
        order.append("fork")
        yield
        order.append("planned")

    monkeypatch.setattr(kernels, "on_side_stream", side_stream)
    monkeypatch.setattr(kernels, "join_side_stream", lambda device: order.append("join"))
    proportional_attention = attention.proportional_attention
    monkeypatch.setattr(attention, "proportional_attention",
                        lambda *args, **kwargs: order.append("attention") or proportional_attention(*args, **kwargs))
    model, images, expected, expected_size = tiny_model_preferring(monkeypatch, path)
    assert order == ["attention"] * 4
    order.clear()
    with torch.no_grad():
        logits = model(images)
    assert len(path.choices) == 4 and all(c is path.candidate for c in path.choices.values())
    assert all(key[2] is timm_patch.ToMeBlock for key in path.choices)  # the block by its type: no model held
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(tome_state(model).size, expected_size)
    order.clear()
    with torch.no_grad():
        model(images)  # chosen: each block runs the candidate once
    assert order == ["fork", "planned", "attention", "join"] * 4
    order.clear()
    model(images).sum().backward()
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(kernels, "capturing", lambda device: True)
        model(images)
    compile_tome(model, "default")
    assert not timm_patch.plans_beside_attention(tome_state(model), images)
    assert order == ["attention"] * 8


@pytest.fixture
def builds_recorded(monkeypatch) -> list[str]:
    """Triton taken to build kernels ahead (here it interprets them, and so has nothing to build): each kernel a build
    ahead would start, by name, in the order met."""
    from triton.runtime.jit import KernelInterface

    from tome_train.tome import triton_builds

    built = []
    monkeypatch.setattr(triton_builds, "can_build_ahead", lambda: True)
    monkeypatch.setattr(KernelInterface, "warmup", lambda kernel, *args, grid, **kwargs: built.append(kernel.__name__))
    return built


def test_a_first_step_builds_its_kernels_ahead_then_chooses_them(monkeypatch, builds_recorded):
    """ViT-Ti (4 blocks at 64 px, r 2) in inference with the merge-and-norm kernel choosing on the CPU: the first
    forward first runs a pass that starts the kernel's build for each merging layer's shapes and runs none of it (its
    launches only build; its time counted by ``kernels.building_seconds``), then chooses the kernel in every layer,
    giving PyTorch's ops' logits; a second forward builds nothing more; nor does a step where nothing may choose. A
    pass ahead of another first step with these shapes (say, of a model's copy) runs PyTorch's ops where kernels were
    chosen: a kernel launched there only builds, and its unwritten output would feed the ops after it (on a GPU, as
    indices out of range)."""
    from tome_train.tome import tome_state

    built_before_choosing = []
    choose = FastestPath._choose

    def counted_choice(path, *args):
        built_before_choosing.append(len(builds_recorded))
        return choose(path, *args)

    monkeypatch.setattr(FastestPath, "_choose", counted_choice)
    model, images, expected, expected_size = tiny_model_preferring(monkeypatch, _merge_norm_rows)
    assert builds_recorded == []  # PyTorch's ops only: nothing may choose
    building_before = kernels.building_seconds()
    with torch.no_grad():
        logits = model(images)
    assert kernels.building_seconds() > building_before
    # 17, 15, 13 and 11 tokens: four shapes, all four built before the first choice
    assert builds_recorded == ["_merged_row_norm"] * 4 and built_before_choosing == [4] * 4
    assert all(c is fused_merge_norm for c in _merge_norm_rows.choices.values())
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(tome_state(model).size, expected_size)
    with torch.no_grad():
        model(images)
    assert builds_recorded == ["_merged_row_norm"] * 4
    # another first step with the same layer shapes (a model's copy, say): its pass runs PyTorch's ops throughout, not
    # the chosen kernel, whose launches would only build and leave its output unwritten
    def chosen(*args):
        assert not FastestPath.building_ahead, "a chosen kernel ran in the pass ahead"
        return fused_merge_norm(*args)

    tome_state(model)._built_ahead.clear()
    building_before = kernels.building_seconds()
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(_merge_norm_rows, "choices", dict.fromkeys(_merge_norm_rows.choices, chosen))
        logits = model(images)
    assert kernels.building_seconds() > building_before and builds_recorded == ["_merged_row_norm"] * 4
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_a_pass_ahead_that_fails_warns_and_the_step_goes_on_without_it(monkeypatch, builds_recorded):
    """A pass ahead that fails (here the pool of builds refuses to start, as a Triton with another API might) warns
    and leaves the first step as it would be without it: the kernel chosen in every layer, PyTorch's ops' logits."""
    import contextlib

    from tome_train.tome import triton_builds

    @contextlib.contextmanager
    def refused(workers=None):
        raise TypeError("AsyncCompileMode() takes no arguments")
        yield

    monkeypatch.setattr(triton_builds, "built_not_run", refused)
    model, images, expected, _ = tiny_model_preferring(monkeypatch, _merge_norm_rows)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="building kernels ahead failed .AsyncCompileMode"):
        logits = model(images)
    assert builds_recorded == [] and len(_merge_norm_rows.choices) == 4
    assert all(c is fused_merge_norm for c in _merge_norm_rows.choices.values())
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_a_first_training_step_builds_the_backwards_kernels_too_and_leaves_gradients_and_randomness_alone(
        monkeypatch, builds_recorded):
    """ViT-Ti (4 blocks at 64 px, r 2, drop path 0.1) training with the merge kernels choosing on the CPU: the pass
    ahead of the first step builds the merge's forward and, through a backward to a copy of the images, its
    backward's kernel, gives no parameter a gradient, and leaves the random streams as they were: the step's logits and
    gradients are those of the same step run again, without the pass."""
    import timm

    from tome_train.tome import apply_tome

    for path in (_merge_rows, _merge_rows_backward):
        monkeypatch.setattr(path, "device_types", ("cpu",))
        monkeypatch.setattr(path, "choices", {})
    monkeypatch.setattr(kernels, "seconds_per_call",
        lambda fn, device, args: 0.0 if fn.__name__.startswith("fused_") else 1.0)
    torch.manual_seed(0)
    model = apply_tome(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=10,
                                         drop_path_rate=0.1), 2)
    images = torch.randn(3, 3, 64, 64)

    def step():
        torch.manual_seed(1)
        model.zero_grad()
        logits = model(images)
        gradients_before_backward = [p.grad for p in model.parameters()]
        logits.square().sum().backward()
        return logits.detach(), gradients_before_backward, [p.grad.clone() for p in model.parameters()]

    logits, before, grads = step()
    # per layer the merge's two launches (kept rows, then merged-away rows), then its backward's one, layer 4 first
    assert builds_recorded == ["_scaled_row_copy"] * 12
    assert all(g is None for g in before)
    assert _merge_rows_backward.choices and all(c is fused_merge_backward
                                                 for c in _merge_rows_backward.choices.values())
    expected_logits, _, expected_grads = step()  # built ahead already: no pass
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
def test_on_a_gpu_planning_beside_attention_gives_the_plan_after_it(monkeypatch):
    """On a GPU, the plan on a second stream (kept here whatever its time): the logits and merges of the plan after
    attention, over repeated forwards (a stream left unjoined, or memory reused too early, would show as a
    difference)."""
    import timm

    from tome_train.tome import apply_tome, timm_patch, tome_state

    path = timm_patch._merging_first_half
    monkeypatch.setattr(path, "choices", {})
    monkeypatch.setattr(kernels, "seconds_per_call",
        lambda fn, device, args: 0.0 if fn.__name__.endswith("plan_beside") else 1.0)
    torch.manual_seed(0)
    model = apply_tome(timm.create_model("vit_base_patch16_224", num_classes=10), 16).eval().cuda()
    images = torch.randn(64, 3, 224, 224, device="cuda")
    with torch.no_grad():
        with monkeypatch.context() as patch:
            patch.setattr(path, "broken", True)  # its reference: the plan after attention, the same kernels
            expected, expected_size = model(images), tome_state(model).size.clone()
        for _ in range(3):
            logits = model(images)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(tome_state(model).size, expected_size)
    assert path.choices and all(c is path.candidate for c in path.choices.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a GPU")
def test_on_a_gpu_a_first_step_finds_its_kernels_built_ahead(monkeypatch):
    """On a GPU (kernels compiled), ViT-B r12 at batch 48 in fp16 inference, every choice to make anew: the pass ahead
    of the first forward builds what its choices then launch (nothing builds after it), and they take kernels."""
    import timm
    from triton.runtime.jit import JITFunction

    from tome_train.tome import apply_tome, triton_builds

    def kernels_built() -> int:
        return sum(len(caches[0]) for module in triton_builds.KERNEL_MODULES for kernel in vars(module).values()
                   if isinstance(kernel, JITFunction) for caches in kernel.device_caches.values())

    for path in list(FastestPath.paths):
        monkeypatch.setattr(path, "choices", {})
    built_ahead = []
    build_ahead = kernels.build_ahead

    def counted(step, device):
        ran = build_ahead(step, device)
        built_ahead.append(kernels_built())
        return ran

    monkeypatch.setattr(kernels, "build_ahead", counted)
    torch.manual_seed(0)
    model = apply_tome(timm.create_model("vit_base_patch16_224", num_classes=10), 12).eval().cuda()
    images = torch.randn(48, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.float16):
        model(images)
    assert built_ahead == [kernels_built()]
    assert any(c is not p.reference for p in FastestPath.paths for c in p.choices.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a GPU")
@pytest.mark.parametrize("keys_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_on_a_gpu_the_compiled_plan_and_merge_norm_kernels_pass_their_checks(keys_dtype):
    """On a GPU the kernels are compiled, not interpreted: the one-kernel plan with its dots as three TF32 products
    passes the plan's check at ViT-B's first layer (batch 64, 12 heads) for each key dtype, and the merge-and-norm
    kernel gives the merge and ``F.layer_norm`` in float64 to fp32 rounding, and to two units of fp16's last place
    in the dtype autocast hands the MLP."""
    keys = layer_keys(64, 197, 12, 64, seed=0, dtype=keys_dtype).cuda()
    sizes = torch.randint(1, 9, (64 * 197,), generator=torch.Generator().manual_seed(1)).float().cuda()
    args = (keys, sizes, 16, 1, torch.float32)
    planned = fused_plan_layer(*args)
    assert same_layer_plan(args, plan_layer(*args), planned)
    perm, dest, weight, _, _, _ = planned
    g = torch.Generator("cuda").manual_seed(2)
    rows = torch.randn(64 * 197, 768, generator=g, device="cuda")
    branch = torch.randn(rows.shape, generator=g, device="cuda").half()
    scale, shift = torch.randn(768, generator=g, device="cuda"), torch.randn(768, generator=g, device="cuda")
    num_kept = 64 * (197 - 16)
    double = _weighted_merge(rows.double(), perm, dest, weight.double(), num_kept, branch.double())
    expected_norm = torch.nn.functional.layer_norm(double, (768,), scale.double(), shift.double(), 1e-6)
    for normed_dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        merged, normed = fused_merge_norm(rows, perm, dest, weight, num_kept, branch, scale, shift, 1e-6, normed_dtype,
                                          64)
        torch.testing.assert_close(merged.double(), double, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(normed.double(), expected_norm, rtol=tolerance, atol=tolerance)
