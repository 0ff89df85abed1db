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
from tome_train.tome.merge import (_merge_rows, _merge_rows_backward, _most_similar, _weighted_merge,
                                   _weighted_merge_backward, most_similar, same_matches)
from tome_train.tome.triton_kernels import fused_merge, fused_merge_backward, fused_most_similar

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


def _slow(fn, seconds):
    def slowed(*args):
        time.sleep(seconds)
        return fn(*args)

    slowed.__name__ = f"slow_{fn.__name__}"
    return slowed


def test_fastest_path_keeps_the_faster_per_shape_and_never_a_wrong_one():
    rows, perm, dest, weight, k = merge_inputs(tied=False)
    args = (rows, perm, dest, weight, k)
    faster = FastestPath(_slow(_weighted_merge, 0.02), fused_merge, device_types=("cpu",))
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
    path = FastestPath(_slow(_weighted_merge, 0.02), fused_merge, device_types=("cuda",))
    path(*args)  # a CPU tensor: not a device this path chooses on
    assert path.choices == {}
    path = FastestPath(_slow(_weighted_merge, 0.02), fused_merge, device_types=("cpu",))
    torch.use_deterministic_algorithms(True)  # the kernel adds merged rows atomically
    try:
        path(*args)
    finally:
        torch.use_deterministic_algorithms(False)
    assert path.choices == {}
    FastestPath.enabled = False
    try:
        path(*args)
    finally:
        FastestPath.enabled = True
    assert path.choices == {}


def test_the_merge_names_its_kernels():
    """The library's matching and merge stand the fused kernels against their ops (loaded by name at the first
    choice); the matching's are checked by :func:`same_matches`."""
    for path, kernel in ((_merge_rows, fused_merge), (_merge_rows_backward, fused_merge_backward),
                         (_most_similar, fused_most_similar)):
        assert path.device_types == ("cuda",)
        assert path._load() is kernel
    assert _most_similar.agree is same_matches and _merge_rows.agree is kernels.same_result


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
    path = FastestPath(_slow(_weighted_merge, 0.02), fused_merge, device_types=("cpu",))
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
    path = FastestPath(_slow(_weighted_merge, 0.02), fused_merge, device_types=("cpu",))
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
