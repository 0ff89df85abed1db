"""The fused Triton merge kernels against PyTorch's ops (run here by Triton's interpreter, which
``tests/conftest.py`` turns on), and the measured choice between the two (:class:`FastestPath`)."""
from __future__ import annotations

import time

import pytest
import torch

from tome_train.tome import bipartite_soft_matching
from tome_train.tome.kernels import FastestPath
from tome_train.tome.merge import _merge_rows, _merge_rows_backward
from tome_train.tome.triton_kernels import fused_merge, fused_merge_backward
from tome_train.tome.merge import _weighted_merge, _weighted_merge_backward

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
    faster = FastestPath(_slow(_weighted_merge, 0.1), fused_merge, device_types=("cpu",))
    assert torch.allclose(faster(*args), _weighted_merge(*args), atol=1e-6)
    assert list(faster.choices.values()) == [fused_merge]
    slower = FastestPath(_weighted_merge, _slow(fused_merge, 0.1), device_types=("cpu",))
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
    path = FastestPath(_slow(_weighted_merge, 0.1), fused_merge, device_types=("cuda",))
    path(*args)  # a CPU tensor: not a device this path chooses on
    assert path.choices == {}
    path = FastestPath(_slow(_weighted_merge, 0.1), fused_merge, device_types=("cpu",))
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
    """The library's merge stands the fused kernels against its ops (loaded by name at the first choice)."""
    for path, kernel in ((_merge_rows, fused_merge), (_merge_rows_backward, fused_merge_backward)):
        assert path.device_types == ("cuda",)
        assert path._load() is kernel
