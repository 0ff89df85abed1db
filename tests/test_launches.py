"""Operations launched per merging layer, counted at PyTorch's dispatcher.

Eager ToMe training on a GPU is bound by the host: on an H100 a ViT-B step took 64 ms of wall time
for 38 ms of kernels (docs/performance.md), each operation costing its Python, autograd and launch
overhead whatever its size. So the operations ToMe adds to a block are a budget, held here as
numbers: every non-view operation is at least one kernel on a GPU.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Callable

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tome_train.tome import apply_tome

pytestmark = pytest.mark.usefixtures("one_thread")

DEPTH = 4
# Per merging layer, on top of the unpatched block (before the row cache and the merge's own backward:
# 32 and 8). Forward: the key mean and the log-size bias (2); matching: norm, divide, bmm, max, two
# sorts, gather (7); the merge's rows: three adds, three cats (6); sizes and weights: two index_selects,
# scatter_add, divide (4); the tokens: index_select, scale, scatter_add (3). Backward: index_select,
# scale, index_copy and its allocation.
FORWARD_BUDGET = 22
BACKWARD_BUDGET = 4


class LaunchCounter(TorchDispatchMode):
    """Counts the operations that reach the kernels; views and other aliases launch nothing."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_step(r: int) -> tuple[LaunchCounter, LaunchCounter]:
    """Operations of one training step's forward and backward (after a first step, so that anything
    built once per shape is built), ViT-Ti at 64 px: 17 tokens, r=2 in every layer."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=DEPTH, num_classes=10)
    if r:
        apply_tome(model, r)
    images = torch.randn(2, 3, 64, 64)
    model(images).sum().backward()
    forward, backward = LaunchCounter(), LaunchCounter()
    with forward:
        loss = model(images).sum()
    with backward:
        loss.backward()
    return forward, backward


def launches_counted(wrapper: Callable, counter: Callable[[], LaunchCounter | None]) -> Callable:
    """``wrapper`` (a kernel wrapper of ``triton_kernels`` or ``triton_attention``, on the CPU run by Triton's
    interpreter) with the dispatch mode off, so that the interpreter's own tensor work counts for nothing, and each of
    its Triton launches counted once under its name in ``counter()`` (where that gives a counter)."""
    from torch.utils._python_dispatch import _disable_current_modes
    from triton.runtime.jit import KernelInterface

    from tome_train.tome.triton_builds import launches_redirected

    run = KernelInterface.__getitem__

    def launch(kernel, grid, args, kwargs):
        if (now := counter()) is not None:
            now.ops[wrapper.__name__] += 1
        return run(kernel, grid)(*args, **kwargs)

    @functools.wraps(wrapper)
    def counted(*args):
        with _disable_current_modes(), launches_redirected(launch):
            return wrapper(*args)

    counted.launches_counted = True
    return counted


def test_merging_layer_launch_budget():
    timm_fw, timm_bw = count_step(0)
    tome_fw, tome_bw = count_step(2)
    assert tome_fw.ops["sort"] == 2 * DEPTH  # every layer merged
    extra_fw = (tome_fw.total - timm_fw.total) / DEPTH
    extra_bw = (tome_bw.total - timm_bw.total) / DEPTH
    assert extra_fw <= FORWARD_BUDGET, tome_fw.ops - timm_fw.ops
    assert extra_bw <= BACKWARD_BUDGET, tome_bw.ops - timm_bw.ops


# With the fused kernels (on a GPU, wherever they measure faster), per merging layer on top of timm's block,
# whose residual add the merge takes over (-1). "parts": the key mean, the log-size bias, one kernel each for
# the matching, the merge's rows and its weights, two for the merge (measured 5.75: the first layer has no
# sizes yet, so no bias). "whole_layer": the key mean, matching, rows and weights in one kernel (2.75).
# "whole_layer_attention", in half precision as on a GPU: also proportional attention in one kernel that takes
# the sizes' log itself, in place of SDPA (PyTorch's path adds the mask's log and cast, 2): measured 2.
FUSED_FORWARD_BUDGETS = {"parts": 6, "whole_layer": 3, "whole_layer_attention": 2}
# The Triton launches of one call of each kernel wrapper, as counted, per kernel set:
FUSED_KERNELS = {"parts": {"fused_most_similar": 1, "fused_plan_merge": 1, "fused_size_weights": 1, "fused_merge": 2},
                 "whole_layer": {"fused_plan_layer": 1, "fused_merge": 2},
                 "whole_layer_attention": {"fused_plan_layer": 1, "fused_merge": 2, "size_biased_attention": 1}}


@pytest.mark.parametrize("kernel_set", FUSED_KERNELS)
def test_merging_layer_launches_with_every_fused_kernel(monkeypatch, kernel_set):
    """The same count with the merge's kernels standing in (here on the CPU, run by Triton's interpreter):
    each Triton launch counts once, the interpreter's own tensor work inside it not at all."""
    from tome_train.tome import attention, kernels, merge

    kernels_per_layer = FUSED_KERNELS[kernel_set]
    counter = LaunchCounter()
    paths = {"fused_most_similar": merge._most_similar, "fused_plan_merge": merge._plan_merge,
             "fused_size_weights": merge._size_weights, "fused_plan_layer": merge._plan_layer,
             "fused_merge": merge._merge_rows, "size_biased_attention": attention._size_biased_attention}
    for name in kernels_per_layer:
        path = paths[name]
        monkeypatch.setattr(path, "device_types", ("cpu",))
        monkeypatch.setattr(path, "choices", {})
        monkeypatch.setattr(path, "candidate", launches_counted(path._load(), lambda: counter))
    monkeypatch.setattr(kernels, "seconds_per_call",
        lambda fn, device, args: 0.0 if getattr(fn, "launches_counted", False) else 1.0)
    dtype = torch.float16 if "size_biased_attention" in kernels_per_layer else torch.float32
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64, dtype=dtype)
    timm_model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=DEPTH, num_classes=10).eval().to(dtype)
    tome_model = apply_tome(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=DEPTH, num_classes=10), 2)
    tome_model.to(dtype)
    timm_counter = LaunchCounter()
    with torch.inference_mode():
        tome_model.eval()(images)  # the choices (each runs the kernels to check and time them)
        counter.ops.clear()
        with counter:
            tome_model(images)
        with timm_counter:
            timm_model(images)
    layers = {name: DEPTH - 1 if name == "size_biased_attention" else DEPTH  # the first has no sizes yet
              for name in kernels_per_layer}
    assert {name: counter.ops[name] for name in kernels_per_layer} == {
        name: count * layers[name] for name, count in kernels_per_layer.items()}
    extra = (counter.total - timm_counter.total) / DEPTH
    assert extra <= FUSED_FORWARD_BUDGETS[kernel_set], counter.ops - timm_counter.ops


# Training in half precision with every kernel kept, per merging layer against timm's block. Forward: the plan,
# the merge's two and the attention kernel in place of SDPA, less the residual add: 2. Backward: the merge's one
# kernel and the attention's two (dq; dk and dv), written where q, k and v lie in qkv's gradient, in place of
# SDPA's backward and of the stack, copy and view of autograd through timm's split of the heads: -0.5 (the first
# layer, without sizes, keeps SDPA's).
TRAINING_BUDGETS = {"forward": 2, "backward": -0.5}
# The Triton launches of one call of each kernel wrapper, as counted:
TRAINING_KERNELS = {"fused_plan_layer": 1, "fused_merge": 2, "fused_merge_backward": 1, "_packed_forward": 1,
                    "_packed_backward": 2}


def test_a_merging_layer_trains_with_every_kernel_in_about_timms_launches(monkeypatch):
    """ViT-Ti in fp16, a training step with every kernel standing in on the CPU (Triton's interpreter; each
    launch counted once, the interpreter's own work not at all): the forward and the backward per merging
    layer against timm's block (:data:`TRAINING_BUDGETS`)."""
    from tome_train.tome import attention, kernels, merge, triton_attention

    active = []

    def counter() -> LaunchCounter | None:
        return active[-1] if active else None

    for path in (merge._plan_layer, merge._merge_rows, merge._merge_rows_backward):
        monkeypatch.setattr(path, "device_types", ("cpu",))
        monkeypatch.setattr(path, "choices", {})
        monkeypatch.setattr(path, "candidate", launches_counted(path._load(), counter))
    trained = attention._trained_size_biased_attention
    monkeypatch.setattr(trained, "device_types", ("cpu",))
    monkeypatch.setattr(trained, "choices", {})
    for name in ("_packed_forward", "_packed_backward"):
        monkeypatch.setattr(triton_attention, name, launches_counted(getattr(triton_attention, name), counter))
    candidates = {"fused_plan_layer", "fused_merge", "fused_merge_backward", "size_biased_attention_trainable"}
    monkeypatch.setattr(kernels, "seconds_per_call",
        lambda fn, device, args: 0.0 if fn.__name__ in candidates else 1.0)

    def step(r: int) -> dict[str, LaunchCounter]:
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=DEPTH, num_classes=10)
        model = (apply_tome(model, r) if r else model).half()
        images = torch.randn(2, 3, 64, 64).half()
        model(images).float().sum().backward()  # the choices
        counts = {"forward": LaunchCounter(), "backward": LaunchCounter()}
        active.append(counts["forward"])
        with counts["forward"]:
            loss = model(images).float().sum()
        active[-1] = counts["backward"]
        with counts["backward"]:
            loss.backward()
        active.clear()
        return counts

    timm_counts, tome_counts = step(0), step(2)
    assert set(trained.choices.values()) == {trained.candidate}
    launched = tome_counts["forward"].ops + tome_counts["backward"].ops
    layers = {name: DEPTH - 1 if name.startswith("_packed") else DEPTH for name in TRAINING_KERNELS}  # the first: no sizes
    assert {name: launched[name] for name in TRAINING_KERNELS} == {
        name: count * layers[name] for name, count in TRAINING_KERNELS.items()}
    assert not tome_counts["forward"].ops["_packed_backward"] and not tome_counts["backward"].ops["_packed_forward"]
    for phase, budget in TRAINING_BUDGETS.items():
        extra = (tome_counts[phase].total - timm_counts[phase].total) / DEPTH
        assert extra <= budget, (phase, tome_counts[phase].ops - timm_counts[phase].ops,
                                 timm_counts[phase].ops - tome_counts[phase].ops)
