"""Side-by-side throughput: unpatched timm against the same model patched with ToMe.

``python -m tome_train.bench --model vit_small_patch16_224 --r 13 --device cpu --batch-size 32
--output bench.json`` builds the model once (random weights, no download), deep-copies it, patches
the copy with :func:`tome_train.tome.apply_tome` and measures both on the same input:

- inference: ``model(x)`` under ``torch.inference_mode`` (images/s, and the step time, which at
  ``--batch-size 1`` is the latency);
- training: forward, cross-entropy, backward and an AdamW step (images/s);
- with ``--runtime onnxruntime``, inference of both models exported to ONNX as ``train.py export --onnx``
  writes them, run by onnxruntime on the CPU: what an exported model gains outside PyTorch.

Repetitions alternate between the two sides (ABBA order) and each side reports the median step
time, so drift of a noisy machine (thermal, other processes) hits both alike. Next to the measured
ratio stands the FLOP bound of the schedule: ``vit_flops(dims, blocks_only=True)`` without merging
over the same with the schedule, the speedup ToMe would give if time were proportional to FLOPs
(transformer blocks only, as the usual bounds are quoted: ViT-B/16 r16 2.02x; matching itself is not
counted). ``*_gflops`` are whole-model forward GFLOPs per image, patch embedding and head included,
counted as the paper does (one multiply-add is one FLOP).

``--plot FILE.png`` draws each measured speedup against its FLOP bound (:func:`plot_ratios`).

:func:`run_benchmark` is the importable core; :func:`main` is the command line that
``train.py bench ...`` hands its arguments to.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import difflib
import errno
import json
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .arguments import OneLineArgumentParser, integer_at_least
from .tome import (
    COMPILE_MODES, GRAPHED_COMPILE_MODES, ScheduleError, UnsupportedModelError, ViTDims, apply_tome, compile_tome,
    flop_bound, is_patched, tome_state, vit_flops,
)
from .tome import kernels
from .tome.schedule import check_fits, schedule_from_text

MODES = ("infer", "train")
RUNTIMES = ("torch", "onnxruntime")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Column order of the CSV file and of every result row.
FIELDS = (
    "model", "r", "schedule", "mode", "prop_attn", "batch_size", "img_size", "dtype", "device", "runtime", "compile",
    "compile_scope", "cuda_graphs", "baseline_ims", "tome_ims", "ratio", "flop_bound", "ratio_of_bound",
    "baseline_ms", "tome_ms", "baseline_gflops", "tome_gflops", "tokens_in", "tokens_out",
    "baseline_first_s", "tome_first_s", "first_ratio", "baseline_first_graphs", "tome_first_graphs",
    "tome_first_choosing_s", "tome_first_building_s", "recompiles",
    "sdpa", "fused_kernels", "min_batch", "merging", "baseline_max_diff", "tome_max_diff", "same_merges",
    "ops_max_diff", "same_merges_as_ops",
    "warmup", "steps", "timer", "stat", "other_cpus",
)
TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}
STATS = {"median": statistics.median, "min": min}


class BenchError(ValueError):
    """Bad input to the benchmark: reported as one ``error: ...`` line and exit code 2."""


@dataclass(frozen=True)
class BenchCase:
    """One model at one merge schedule (``r``: int, ``(r, inflect)`` or per-layer list)."""

    model: str
    r: object = 0

    @property
    def r_label(self) -> str:
        r = self.r
        if isinstance(r, tuple):
            return f"{r[0]}@{r[1]:g}"
        if isinstance(r, list):
            return "[" + ",".join(str(v) for v in r) + "]"
        return str(r)


# ---------------------------------------------------------------------------------------------
# input checks


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise BenchError(f"{name}={value!r} is not allowed: use {', '.join(allowed)}")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BenchError(f"{name}={value!r} is not allowed: use an integer >= {low}")


def parse_r(text: str):
    """``"13"`` -> 13, ``"16@-1"`` -> ``(16, -1.0)`` (r with inflection), ``"8,8,4"`` -> per-layer list."""
    try:
        return schedule_from_text(text)
    except ScheduleError as e:
        raise BenchError(str(e)) from None


def check_model_name(name: str) -> None:
    """Raise :class:`BenchError` naming the closest timm models when ``name`` is not a timm model."""
    import timm

    if timm.is_model(name):
        return
    matches: list[str] = []
    if name:  # names that start with it, then names that hold it, then look-alikes
        for found in (timm.list_models(f"{name}*"), timm.list_models(f"*{name}*"),
                      difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)):
            matches += [m for m in found if m not in matches]
    hint = f"; matching timm models: {', '.join(matches[:8])}{', ...' if len(matches) > 8 else ''}" if matches else ""
    raise BenchError(f"unknown timm model {name!r}{hint}")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise BenchError(f"device={device!r} is not allowed: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError("device=cuda is not available on this machine: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BenchError(f"device={device!r} is not available: {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise BenchError(f"device={device!r} is not supported: use cpu or cuda")
    return dev


def make_cases(models: Sequence[str], rs: Sequence, pair: bool) -> list[BenchCase]:
    """``--pair`` zips models with r values (one side may have a single entry); otherwise the cross product."""
    if not models or not rs:
        raise BenchError("give at least one --model and one --r")
    if pair:
        if len(models) != len(rs) and 1 not in (len(models), len(rs)):
            raise BenchError(f"--pair needs as many --r values as models: got {len(models)} models and {len(rs)} r values")
        n = max(len(models), len(rs))
        models = list(models) * n if len(models) == 1 else list(models)
        rs = list(rs) * n if len(rs) == 1 else list(rs)
        return [BenchCase(m, r) for m, r in zip(models, rs)]
    return [BenchCase(m, r) for m in models for r in rs]


# ---------------------------------------------------------------------------------------------
# measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _create(name: str, img_size: int | None, device: torch.device | str) -> torch.nn.Module:
    """``timm.create_model`` (random weights), or :class:`BenchError` saying why it cannot be benchmarked."""
    import timm
    from timm.models import VisionTransformer

    from .config import ConfigError
    from .models import check_patch_grid

    check_model_name(name)
    kwargs = {"img_size": img_size} if img_size is not None else {}
    with torch.device(device):
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except Exception as e:  # timm raises many kinds for bad kwargs (img_size on a fixed-size model, ...)
            try:  # a CNN does not take img_size: say that it is no ViT rather than what it does not take
                model = timm.create_model(name, pretrained=False) if kwargs else None
            except Exception:
                model = None
            if model is None or isinstance(model, VisionTransformer):
                at = f" at img_size={img_size}" if img_size is not None else ""
                raise BenchError(f"cannot build {name!r}{at}: {e}") from None
    # the training run's check (a model that is no ViT is named by apply_tome, in _patch)
    try:
        check_patch_grid(model, name, img_size, key="img_size")
    except ConfigError as e:
        raise BenchError(str(e)) from None
    return model


def _patch(model: torch.nn.Module, case: BenchCase, prop_attn: bool) -> list[int]:
    try:
        apply_tome(model, r=case.r, prop_attn=prop_attn)  # first: it names a model it cannot patch
        check_fits(case.r, ViTDims.from_timm(model))
    except (ScheduleError, UnsupportedModelError) as e:
        raise BenchError(f"{case.model} r={case.r_label}: {e}") from None
    return list(tome_state(model).schedule)


def check_case(case: BenchCase, img_size: int | None = None, prop_attn: bool = True) -> list[int]:
    """Build and patch the case on the meta device (no memory, no init cost): every bad input
    shows up here, before any measurement. Returns the per-layer schedule."""
    return _patch(_create(case.model, img_size, "meta"), case, prop_attn)


def build_pair(
    case: BenchCase, *, img_size: int | None, prop_attn: bool, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module, list[int]]:
    """The unpatched timm model and a deep copy patched with ToMe (same weights), on ``device``."""
    base = _create(case.model, img_size, "cpu")
    tome = copy.deepcopy(base)
    schedule = _patch(tome, case, prop_attn)
    return base.to(device), tome.to(device), schedule


def _autocast(device: torch.device, dtype: torch.dtype, cache_enabled: bool = True):
    if dtype == torch.float32:
        return nullcontext()
    # a CUDA graph replays the casts it captured: autocast's cache of cast weights would outlive them
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
# model: torch.compile(model); regions: the ToMe side by compile_tome (the timm side stays whole)
COMPILE_SCOPES = ("model", "regions")


def _sdpa_preference(prefer: str | None):
    """``scaled_dot_product_attention`` tries backend ``prefer`` first, then the others in their
    default order (on CUDA: flash cannot take the proportional-attention bias, cuDNN and the
    memory-efficient kernel can)."""
    if prefer is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    order = [prefer] + [name for name in SDPA_BACKENDS if name != prefer]
    return sdpa_kernel([names[name] for name in order], set_priority=True)


class OtherLoad:
    """How many CPUs other processes kept busy between :meth:`start` and :meth:`stop` (Linux):
    busy time of the whole machine from ``/proc/stat`` less this process's own CPU time."""

    def __init__(self):
        self._start = None

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait (guest is in user)
        own = sum(os.times()[:4])
        return time.perf_counter(), busy, own

    def start(self) -> "OtherLoad":
        self._start = self._sample()
        return self

    def stop(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        wall, busy, own = (e - s for e, s in zip(end, self._start))
        return round(max(busy - own, 0.0) / wall, 2)


def _compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (a rise between steps is a recompilation)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def capture_cuda_graph(record: Callable[[], object], device: torch.device,
                       warm_up: Callable[[], object] | None = None, warmups: int = 3) -> torch.cuda.CUDAGraph:
    """``record()`` captured as one CUDA graph on ``device``, after ``warmups`` eager calls of ``warm_up`` (default:
    ``record``) on a side stream, which make the allocator's, cuDNN's and the kernels' choices that a capture
    cannot make."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            (warm_up or record)()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        record()
    return graph


class _Runner:
    """One side of the comparison: a model, its step function and the step times it measured.

    ``min_batch`` and the region compilation (patched models only) are set on the model before
    every step, so two runners can time the same model with and without merging.
    """

    def __init__(self, model, mode: str, x, target, device, dtype, compile_: str | None, lr: float = 1e-4,
                 timer: Callable[[], float] = time.perf_counter, min_batch: int | None = None,
                 sdpa: str | None = None, compile_scope: str = "model", cuda_graph: bool = False):
        self.model, self.mode, self.x, self.target, self.timer = model, mode, x, target, timer
        self.device, self.dtype, self.min_batch, self.sdpa = device, dtype, min_batch, sdpa
        self.times: list[float] = []
        self.first_s: float | None = None
        self.first_graphs: int | None = None  # graphs compiled in the first step
        self.first_choosing_s: float | None = None  # of the first step, the kernels' choices (kernels.choosing_seconds)
        self.first_building_s: float | None = None  # of the first step, the pass building them ahead (building_seconds)
        self.cuda_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        model.train(mode == "train")
        by_regions = compile_scope == "regions" and is_patched(model)
        self.regions_mode = compile_ if by_regions else None
        self.fn = torch.compile(model, mode=compile_) if compile_ and not by_regions else model
        # every kernel of a step replays from CUDA graphs (with regions under a graphed mode, the merges between
        # them are still launched one by one)
        self.graphed = cuda_graph or (compile_ in GRAPHED_COMPILE_MODES and not by_regions)
        if mode == "train":
            self.opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda" or None,
                                         capturable=cuda_graph)
            use_scaler = dtype == torch.float16 and device.type == "cuda"
            self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None

    def forward(self):
        if is_patched(self.model):
            compile_tome(self.model, self.regions_mode)
            if self.min_batch is not None:
                tome_state(self.model).min_batch = self.min_batch
        with _sdpa_preference(self.sdpa):
            return self.fn(self.x)

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step(zero_grad=True)

    def _step(self, zero_grad: bool) -> None:
        cache = not self.cuda_graph
        if self.mode == "infer":
            with torch.inference_mode(), _autocast(self.device, self.dtype, cache):
                self.forward()
            return
        with _autocast(self.device, self.dtype, cache):
            out = self.forward()
            if isinstance(out, (tuple, list)):  # distilled models in training return (head, dist head)
                out = out[0]
            loss = F.cross_entropy(out.float(), self.target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        if zero_grad:
            self.opt.zero_grad(set_to_none=True)

    def _capture(self) -> None:
        """The whole step as one CUDA graph, so that the host launches one graph instead of every kernel (see
        :func:`capture_cuda_graph`); its backward writes the gradients afresh (they are cleared in the eager
        steps before), as every replay then does."""
        self.graph = capture_cuda_graph(lambda: self._step(zero_grad=False), self.device,
                                        warm_up=lambda: self._step(zero_grad=True))

    def _timed(self, fn: Callable[[], None] | None = None) -> float:
        _sync(self.device)
        t0 = self.timer()
        (fn or self.step)()
        _sync(self.device)
        return self.timer() - t0

    def first_step(self) -> None:
        """The first call on its own: with ``torch.compile`` it holds the compilation, with CUDA graphs
        the eager warm-up and the capture; either way the kernels' choices (by the device's time alone where the
        step replays as CUDA graphs)."""
        graphs, choosing, building = _compiled_graphs(), kernels.choosing_seconds(), kernels.building_seconds()
        with kernels.choosing_for_graphs() if self.graphed else nullcontext():
            self.first_s = self._timed(self._capture if self.cuda_graph else None)
        self.first_graphs = _compiled_graphs() - graphs
        self.first_choosing_s = kernels.choosing_seconds() - choosing
        self.first_building_s = kernels.building_seconds() - building

    def timed_step(self) -> None:
        self.times.append(self._timed())


class _OnnxRunner:
    """One side in onnxruntime (CPU): the model exported to ONNX as ``train.py export --onnx`` writes it
    (:func:`tome_train.export.write_onnx`, fp32), then inference on the same images as the other side. Its first
    step holds the export, the session's creation (onnxruntime's graph optimizations) and the first run."""

    first_graphs, first_choosing_s, first_building_s = 0, 0.0, 0.0  # nothing of torch's compiler or kernels

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, path: Path, timer: Callable[[], float]):
        self.model, self.x, self.path, self.timer = model.eval(), x, path, timer
        self.device = x.device
        self.times: list[float] = []
        self.first_s: float | None = None
        self.session = None

    def forward(self) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"images": self.x.numpy()})[0])

    def step(self) -> None:
        self.forward()

    def first_step(self) -> None:
        from .export import onnx_session, write_onnx

        t0 = self.timer()
        write_onnx(self.model, torch.randn(2, *self.x.shape[1:]), self.path)
        self.session = onnx_session(self.path, threads=torch.get_num_threads())
        self.forward()
        self.first_s = self.timer() - t0

    def timed_step(self) -> None:
        t0 = self.timer()
        self.step()
        self.times.append(self.timer() - t0)


def time_pair(
    baseline: _Runner, tome: _Runner, warmup: int, steps: int, stat: Callable = statistics.median
) -> tuple[float, float, int]:
    """Step seconds of both sides (median by default), repetitions interleaved in ABBA order, and
    the graphs compiled after the warm-up (0 unless a step recompiled). Each side's first step is
    timed apart (``first_s``) and counts neither as warm-up nor as a timed step."""
    baseline.first_step()
    tome.first_step()
    for _ in range(warmup):
        baseline.step()
        tome.step()
    _sync(baseline.device)
    graphs = _compiled_graphs()
    for i in range(steps):
        first, second = (baseline, tome) if i % 2 == 0 else (tome, baseline)
        first.timed_step()
        second.timed_step()
    return stat(baseline.times), stat(tome.times), _compiled_graphs() - graphs


def _same_merges(size: torch.Tensor | None, reference: torch.Tensor | None) -> float:
    """The fraction of images whose final token sizes ``[B, N, 1]`` are the reference's (1.0 where neither
    side merged, 0.0 where only one did or they kept different token counts)."""
    if size is None or reference is None:
        return float(size is None and reference is None)
    if size.shape != reference.shape:
        return 0.0
    return (size == reference).flatten(1).all(dim=1).float().mean().item()


def check_outputs(baseline: _Runner, tome: _Runner) -> dict:
    """The measured forward of each side (its dtype, compiled or not) against the eager fp32 forward of the
    same model on the same images through PyTorch's ops (:func:`~tome_train.tome.kernels.pytorch_ops_only`,
    the implementation the tests hold to a float64 reference): the largest logit difference of each side
    (``*_max_diff``), and for ToMe the fraction of images whose merges came out the same (``same_merges``:
    identical final token sizes). ToMe is also checked against that eager forward in the measured dtype
    (``ops_max_diff``, ``same_merges_as_ops``): what the fused kernels and the compiler change, apart from
    what half precision changes (with random weights many similarity scores nearly tie, and fp16 keys flip
    some of the matches)."""
    result = {}
    for name, runner in (("baseline", baseline), ("tome", tome)):
        patched = is_patched(runner.model)
        with torch.inference_mode():
            with _autocast(runner.device, runner.dtype):
                fast = runner.forward().float()
            size = tome_state(runner.model).size if patched else None
            if patched:
                compile_tome(runner.model, None)
            with kernels.pytorch_ops_only():
                exact = runner.model(runner.x).float()
                result[f"{name}_max_diff"] = (fast - exact).abs().max().item()
                if patched:
                    result["same_merges"] = _same_merges(size, tome_state(runner.model).size)
                    with _autocast(runner.device, runner.dtype):
                        ops = runner.model(runner.x).float()
                    result["ops_max_diff"] = (fast - ops).abs().max().item()
                    result["same_merges_as_ops"] = _same_merges(size, tome_state(runner.model).size)
    return result


def check_onnx_outputs(baseline: _OnnxRunner, tome: _OnnxRunner) -> dict:
    """Each side's onnxruntime logits against the eager fp32 forward of the same model on the same images
    through PyTorch's ops (``*_max_diff``). Which tokens merged cannot be read from the exported graph."""
    result = {}
    with torch.inference_mode(), kernels.pytorch_ops_only():
        for name, runner in (("baseline", baseline), ("tome", tome)):
            result[f"{name}_max_diff"] = (runner.forward() - runner.model(runner.x)).abs().max().item()
    return result


def choose_min_batch(timings: Sequence[tuple[int, float, float]]) -> int:
    """From ``(batch, seconds merged, seconds unmerged)`` rows: the smallest batch from which merging
    was faster at every larger batch measured (one past the largest when it never was)."""
    min_batch = max(b for b, _, _ in timings) + 1
    for batch, merged, unmerged in sorted(timings, reverse=True):
        if merged >= unmerged:
            break
        min_batch = batch
    return min_batch


def calibrate_min_batch(
    model: torch.nn.Module,
    *,
    device: str | torch.device | None = None,
    dtype: str = "fp32",
    max_batch: int = 32,
    warmup: int = 2,
    steps: int = 5,
    timer: str = "wall",
    log: Callable[[str], None] | None = None,
) -> tuple[int, list[dict]]:
    """Time a patched model's inference with and without merging at batch 1, 2, 4, ... ``max_batch``
    (interleaved) and set its ``min_batch`` by :func:`choose_min_batch`: smaller batches then run
    unmerged, as fast as the unpatched model, where matching costs more than it saves.

    Returns ``min_batch`` and one row per batch (``batch_size``, ``merged_ms``, ``unmerged_ms``).
    The model is left in eval mode.
    """
    if not is_patched(model):
        raise BenchError("calibrate_min_batch needs a model patched with apply_tome")
    for name, value, low in (("max_batch", max_batch, 1), ("steps", steps, 1), ("warmup", warmup, 0)):
        _check_int(name, value, low)
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("timer", timer, TIMERS)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    sizes = sorted({min(2 ** k, max_batch) for k in range(max_batch.bit_length() + 1)})
    rows, timings = [], []
    # timed as the model runs: its regions compiled as compile_tome left them, its input channels and dtype
    regions = dict(compile_=tome_state(model).compile_mode, compile_scope="regions", timer=TIMERS[timer])
    weights = next(model.parameters())
    for batch in sizes:
        x = torch.randn(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size, device=dev,
                        dtype=weights.dtype)
        merged = _Runner(model, "infer", x, None, dev, DTYPES[dtype], **regions, min_batch=1)
        unmerged = _Runner(model, "infer", x, None, dev, DTYPES[dtype], **regions, min_batch=batch + 1)
        t_unmerged, t_merged, _ = time_pair(unmerged, merged, warmup, steps)
        timings.append((batch, t_merged, t_unmerged))
        rows.append({"batch_size": batch, "merged_ms": t_merged * 1e3, "unmerged_ms": t_unmerged * 1e3})
    min_batch = choose_min_batch(timings)
    tome_state(model).min_batch = min_batch
    if log is not None:
        slower = [f"{b}: {m * 1e3:.2f} vs {u * 1e3:.2f} ms" for b, m, u in timings if b < min_batch]
        log(f"min_batch={min_batch}: batches under it run unmerged (merged vs unmerged, {'; '.join(slower)})"
            if slower else "min_batch=1: merging pays off at every batch size measured")
    return min_batch, rows


def run_benchmark(
    cases: Iterable[BenchCase | tuple],
    *,
    device: str | torch.device | None = None,
    dtype: str = "fp32",
    batch_size: int = 32,
    img_size: int | None = None,
    warmup: int = 3,
    steps: int = 10,
    modes: Sequence[str] = MODES,
    prop_attn: bool = True,
    compile: bool | str = False,
    compile_scope: str = "model",
    cuda_graphs: bool = False,
    timer: str = "wall",
    stat: str = "median",
    seed: int = 0,
    auto_min_batch: bool = False,
    sdpa: str | None = None,
    runtime: str = "torch",
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Measure every case in every mode; one result row (see :data:`FIELDS`) per case and mode.

    Every row also holds each side's first step (``*_first_s``: with ``compile`` the compilation; the graphs
    compiled in it, ``*_first_graphs``; on the ToMe side the time its kernels' choices took, ``tome_first_choosing_s``,
    and the pass before them that built their kernels, ``tome_first_building_s``),
    the graphs compiled during the timed steps (``recompiles``), and for inference the check of
    :func:`check_outputs`. ``auto_min_batch`` first runs :func:`calibrate_min_batch` (eager, up to
    ``batch_size``) on the ToMe side, which then merges only if that pays off at ``batch_size``.
    ``sdpa`` names the attention backend both sides try first (see :func:`_sdpa_preference`);
    ``compile`` is ``True`` or a ``torch.compile`` mode (:data:`COMPILE_MODES`; ``reduce-overhead``
    adds CUDA graphs on a GPU); ``compile_scope="regions"`` compiles the ToMe side with
    :func:`~tome_train.tome.compile_tome` instead of ``torch.compile(model)`` (the timm side always whole).
    ``cuda_graphs`` captures each side's whole step (forward; or forward, backward and optimizer step) as
    one CUDA graph, so that the host no longer sets the pace; the first step then holds three eager
    steps (with ``compile``: the compilation) and the capture. With ``compile`` it needs a mode without
    graphs of its own (not :data:`GRAPHED_COMPILE_MODES`); with ``compile_scope="regions"`` the ToMe
    side's compiled regions and eager merges between them then replay as one graph. ``runtime="onnxruntime"``
    times both models exported to ONNX in onnxruntime on the CPU (fp32 inference only; see :class:`_OnnxRunner`).

    ``cases`` holds :class:`BenchCase` or ``(model_name, r)`` tuples. Raises :class:`BenchError`
    for bad input, before any measurement when it can be seen from the arguments alone.

    ``timer="cpu"`` times with the process CPU clock instead of the wall clock (CPU device only):
    on a shared machine another process's load then does not count. With one thread
    (``torch.set_num_threads(1)``) that is the uncontended single-core time; with more threads it
    adds up the CPU time of all of them (spin-waiting included), so "images/s" reads
    images per CPU-second. ``stat`` picks ``median`` (default) or ``min`` of the repetitions.
    """
    cases = [c if isinstance(c, BenchCase) else BenchCase(*c) for c in cases]
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    _check_choice("timer", timer, TIMERS)
    if timer == "cpu" and dev.type != "cpu":
        raise BenchError("timer=cpu measures host CPU time and only suits --device cpu")
    _check_choice("stat", stat, STATS)
    _check_choice("dtype", dtype, DTYPES)
    compile = "default" if compile is True else compile or None
    if compile is not None:
        _check_choice("compile", compile, COMPILE_MODES)
    _check_choice("compile_scope", compile_scope, COMPILE_SCOPES)
    if compile is None and compile_scope != "model":
        raise BenchError(f"compile_scope={compile_scope!r} needs --compile: without it nothing is compiled")
    if cuda_graphs:
        if compile in GRAPHED_COMPILE_MODES:
            raise BenchError(f"cuda_graphs with compile mode {compile!r}, which captures graphs of its own: "
                             f"use {' or '.join(m for m in COMPILE_MODES if m not in GRAPHED_COMPILE_MODES)}")
        if dtype == "fp16" and "train" in modes:
            raise BenchError("cuda_graphs training needs bf16 or fp32: fp16's loss scaler reads the GPU from the host")
        if dev.type != "cuda":
            raise BenchError(f"cuda_graphs needs a CUDA device, not {dev.type}")
    if sdpa is not None:
        _check_choice("sdpa", sdpa, SDPA_BACKENDS)
    _check_choice("runtime", runtime, RUNTIMES)
    onnx = runtime == "onnxruntime"
    if onnx:
        _check_onnxruntime(dev, dtype, modes, compile, cuda_graphs, auto_min_batch, sdpa)
    bad_modes = [m for m in modes if m not in MODES]
    if bad_modes or not modes:
        raise BenchError(f"mode={bad_modes or list(modes)!r} is not allowed: use infer, train or both")
    modes = [m for m in MODES if m in modes]
    for name, value, low in (("batch_size", batch_size, 1), ("steps", steps, 1), ("warmup", warmup, 0)):
        _check_int(name, value, low)
    if img_size is not None and (not isinstance(img_size, int) or img_size <= 0):
        raise BenchError(f"img_size={img_size!r} is not allowed: use a positive integer")
    for case in cases:  # every case checked first, so a typo in the last one fails before minutes of timing
        check_case(case, img_size, prop_attn)
    log = log or (lambda msg: None)
    torch_dtype = DTYPES[dtype]
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    rows = []
    for case in cases:
        torch.manual_seed(seed)
        base, tome, schedule = build_pair(case, img_size=img_size, prop_attn=prop_attn, device=dev)
        dims = ViTDims.from_timm(base)
        size = img_size or base.patch_embed.img_size[0]
        if auto_min_batch:
            log(f"{case.model} r={case.r_label}: calibrating min_batch up to batch {batch_size}")
            calibrate_min_batch(tome, device=dev, dtype=dtype, max_batch=batch_size, warmup=warmup,
                                steps=steps, timer=timer, log=log)
        min_batch = tome_state(tome).min_batch
        merging = batch_size >= min_batch and any(schedule)
        ran = schedule if merging else [0] * len(schedule)  # below min_batch the patched model runs unmerged
        flops_base, flops_tome = vit_flops(dims), vit_flops(dims, ran)
        bound = flop_bound(dims, ran)
        counts = dims.tokens_per_layer(ran)
        x = torch.randn(batch_size, 3, *base.patch_embed.img_size, device=dev)
        target = torch.randint(0, max(base.num_classes, 1), (batch_size,), device=dev)
        for mode in modes:
            log(f"{case.model} r={case.r_label} {mode}: warmup {warmup}, {steps} interleaved steps per side"
                + (" in onnxruntime" if onnx else ""))
            with tempfile.TemporaryDirectory(prefix="tome-bench-") if onnx else nullcontext() as onnx_dir:
                if onnx:
                    a, b = (_OnnxRunner(m, x, Path(onnx_dir) / f"{side}.onnx", TIMERS[timer])
                            for m, side in ((base, "timm"), (tome, "tome")))
                else:
                    a = _Runner(base, mode, x, target, dev, torch_dtype, compile, timer=TIMERS[timer], sdpa=sdpa,
                                cuda_graph=cuda_graphs)
                    b = _Runner(tome, mode, x, target, dev, torch_dtype, compile, timer=TIMERS[timer], sdpa=sdpa,
                                compile_scope=compile_scope, cuda_graph=cuda_graphs)
                meter = OtherLoad().start()
                t_base, t_tome, recompiles = time_pair(a, b, warmup, steps, STATS[stat])
                other_cpus = meter.stop() if dev.type == "cpu" else None
            if onnx:
                checks = check_onnx_outputs(a, b)
            else:
                checks = check_outputs(a, b) if mode == "infer" else {}
            firsts = {"baseline_first_s": a.first_s, "tome_first_s": b.first_s, "first_ratio": b.first_s / a.first_s,
                      "baseline_first_graphs": a.first_graphs, "tome_first_graphs": b.first_graphs,
                      "tome_first_choosing_s": b.first_choosing_s, "tome_first_building_s": b.first_building_s}
            del a, b
            ims_base, ims_tome = batch_size / t_base, batch_size / t_tome
            ratio = ims_tome / ims_base
            rows.append({
                "model": case.model,
                "r": case.r_label,
                "schedule": schedule,
                "mode": mode,
                "prop_attn": prop_attn,
                "batch_size": batch_size,
                "img_size": size,
                "dtype": dtype,
                "device": str(dev),
                "runtime": runtime,
                "compile": compile or False,
                "compile_scope": compile_scope if compile else None,
                "cuda_graphs": cuda_graphs,
                "baseline_ims": ims_base,
                "tome_ims": ims_tome,
                "ratio": ratio,
                "flop_bound": bound,
                "ratio_of_bound": ratio / bound,
                "baseline_ms": t_base * 1e3,
                "tome_ms": t_tome * 1e3,
                "baseline_gflops": flops_base / 1e9,
                "tome_gflops": flops_tome / 1e9,
                "tokens_in": counts[0],
                "tokens_out": counts[-1],
                **firsts,
                "recompiles": recompiles,
                "sdpa": sdpa or "default",
                "fused_kernels": kernels.report(),
                "min_batch": min_batch,
                "merging": merging,
                "baseline_max_diff": checks.get("baseline_max_diff"),
                "tome_max_diff": checks.get("tome_max_diff"),
                "same_merges": checks.get("same_merges"),
                "ops_max_diff": checks.get("ops_max_diff"),
                "same_merges_as_ops": checks.get("same_merges_as_ops"),
                "warmup": warmup,
                "steps": steps,
                "timer": timer,
                "stat": stat,
                "other_cpus": other_cpus,
            })
        del base, tome
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# reporting


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    import timm

    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(rows: list[dict]) -> str:
    header = ("model", "r", "mode", "batch", "timm im/s", "ToMe im/s", "ratio", "FLOP bound", "of bound",
              "1st step", "same merges: ops / fp32", "max diff: ops", "fp32 timm / ToMe")
    lines = [header]
    for row in rows:
        checked, diffed = row["same_merges"] is not None, row["tome_max_diff"] is not None
        lines.append((
            row["model"], row["r"] + ("" if row["merging"] or not any(row["schedule"]) else " (off)"), row["mode"],
            str(row["batch_size"]), f"{row['baseline_ims']:.1f}", f"{row['tome_ims']:.1f}", f"{row['ratio']:.2f}x",
            f"{row['flop_bound']:.2f}x", f"{100 * row['ratio_of_bound']:.0f}%", f"{row['first_ratio']:.2f}x",
            f"{100 * row['same_merges_as_ops']:.0f}% / {100 * row['same_merges']:.0f}%" if checked else "-",
            f"{row['ops_max_diff']:.1e}" if checked else "-",
            f"{row['baseline_max_diff']:.1e} / {row['tome_max_diff']:.1e}" if diffed else "-",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for k, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "schedule": " ".join(str(v) for v in row["schedule"]),
                             "fused_kernels": " ".join(f"{k}={v}" for k, v in row["fused_kernels"].items())})


def plot_ratios(rows: list[dict], title: str):
    """ToMe's speedup over timm against the FLOP bound of its schedule, a line per model and mode (one point per r,
    labelled), with the bound itself as the diagonal: how much of what merging removes each schedule turned into
    time. Returns the matplotlib figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=120)
    ax = fig.subplots()
    series: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        series.setdefault((row["model"], row["mode"]), []).append(row)
    for (model, mode), points in series.items():
        points = sorted(points, key=lambda row: row["flop_bound"])
        ax.plot([row["flop_bound"] for row in points], [row["ratio"] for row in points], "o-", label=f"{model}, {mode}")
        for row in points:
            ax.annotate(f"r={row['r']}", (row["flop_bound"], row["ratio"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    top = max(max(row["flop_bound"], row["ratio"]) for row in rows) * 1.05
    ax.plot([1.0, top], [1.0, top], "--", color="gray", label="the FLOP bound")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("FLOP bound of the schedule (timm FLOPs / ToMe FLOPs, blocks)")
    ax.set_ylabel("measured speedup (ToMe images/s / timm images/s)")
    ax.set_title(textwrap.fill(title, 100), fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _check_onnxruntime(device: torch.device, dtype: str, modes: Sequence[str], compile: str | None,
                       cuda_graphs: bool, auto_min_batch: bool, sdpa: str | None) -> None:
    """The settings ``runtime="onnxruntime"`` can measure, and onnxruntime installed, or :class:`BenchError`."""
    given = {"mode train": "train" in modes, f"dtype {dtype}": dtype != "fp32", f"device {device.type}":
             device.type != "cpu", "compile": compile is not None, "cuda_graphs": cuda_graphs,
             "auto_min_batch": auto_min_batch, "sdpa": sdpa is not None}
    if any(given.values()):
        raise BenchError(f"runtime=onnxruntime times fp32 inference on the CPU: "
                         f"{', '.join(name for name, on in given.items() if on)} cannot apply")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BenchError("runtime=onnxruntime needs onnxruntime: pip install 'tome-train[export]'") from None


def _check_output_file(path: str) -> None:
    """A file the run may write at its end, or :class:`BenchError` before the run."""
    if os.path.isdir(path):
        raise BenchError(f"cannot write {path!r}: it is a directory, name a file in it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise BenchError(f"cannot write {path!r}: {parent!r} {what}")
    try:  # a folder that takes no new file (read-only, /proc) was found only after the run, as a traceback
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".bench-"):
            pass
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as e:
        raise BenchError(f"cannot write {path!r}: {e.strerror or e}") from None


def _check_plot_file(path: str) -> None:
    """A file name whose extension matplotlib writes (it would otherwise add ``.png`` or fail after the run)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    if os.path.splitext(path)[1].lower().lstrip(".") not in formats:
        raise BenchError(f"--plot {path!r}: name a file ending in one of {', '.join('.' + f for f in formats)}")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=prog or "python -m tome_train.bench",
        description="Throughput of unpatched timm against the ToMe-patched model (random weights).",
    )
    p.add_argument("--model", nargs="+", default=["vit_small_patch16_224"], help="timm model name(s)")
    p.add_argument("--r", nargs="+", default=["13"], metavar="R",
                   help="merge schedule(s): 13, 16@-1 (r with inflection: -1 = decreasing) or 8,8,4 (per layer)")
    p.add_argument("--pair", action="store_true", help="zip --model with --r instead of the cross product")
    p.add_argument("--prop-attn", action=argparse.BooleanOptionalAction, default=True,
                   help="proportional attention on the ToMe side (default: on)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype (fp32: no autocast)")
    p.add_argument("--batch-size", type=integer_at_least(1), default=32)
    p.add_argument("--img-size", type=integer_at_least(1), default=None, help="input resolution (default: the model's)")
    p.add_argument("--warmup", type=integer_at_least(0), default=3, help="untimed steps per side and mode")
    p.add_argument("--steps", type=integer_at_least(1), default=10, help="timed steps per side and mode (median reported)")
    p.add_argument("--mode", nargs="+", choices=["infer", "train", "both"], default=None,
                   help="default: both (with --runtime onnxruntime: infer)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=list(COMPILE_MODES), metavar="MODE",
                   help=f"torch.compile both sides, in mode MODE ({', '.join(COMPILE_MODES)}; default: default)")
    p.add_argument("--compile-scope", choices=list(COMPILE_SCOPES), default="model",
                   help="how the ToMe side compiles: model (torch.compile(model), default) or regions "
                        "(compile_tome: attention and MLP compiled once for all blocks, merging eager); "
                        "the timm side always compiles whole")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture each side's whole step as one CUDA graph (a GPU; with --compile, in a mode "
                        "without graphs of its own: default or max-autotune-no-cudagraphs)")
    p.add_argument("--sdpa", choices=list(SDPA_BACKENDS), default=None,
                   help="attention backend both sides try first (default: PyTorch's order)")
    p.add_argument("--auto-min-batch", action="store_true",
                   help="first measure from which batch size merging pays off; smaller batches run unmerged")
    p.add_argument("--runtime", choices=list(RUNTIMES), default="torch",
                   help="torch (default) or onnxruntime: both models exported to ONNX, fp32 inference on the CPU")
    p.add_argument("--threads", type=integer_at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--timer", choices=list(TIMERS), default="wall",
                   help="wall clock (default) or process CPU time (CPU only; robust to other load with --threads 1)")
    p.add_argument("--stat", choices=list(STATS), default="median", help="statistic of the timed steps per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, metavar="JSON", help="write results and machine info as JSON")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write the result rows as CSV")
    p.add_argument("--plot", default=None, metavar="PNG", help="also plot each speedup against its FLOP bound")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command line; returns 0, 2 for bad input (one ``error:`` line on stderr), 1 if a run fails."""
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as e:  # --help, or a refused command line (said in one line)
        return int(e.code or 0)
    threads = torch.get_num_threads()
    try:
        return _run(args, list(argv) if argv is not None else sys.argv[1:])
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"error: out of memory at batch size {args.batch_size}: use a smaller --batch-size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # a caller in the same process keeps its setting


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    mode = args.mode or (["infer"] if args.runtime == "onnxruntime" else ["both"])
    modes = list(MODES) if "both" in mode else mode
    cases = make_cases(args.model, [parse_r(t) for t in args.r], args.pair)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    outputs = [path for path in (args.output, args.csv, args.plot) if path]
    for path in outputs:
        _check_output_file(path)
    if len({os.path.realpath(path) for path in outputs}) < len(outputs):
        raise BenchError(f"--output, --csv and --plot name the same file ({', '.join(outputs)}): one would overwrite "
                         "another; name each its own")
    if args.plot:
        _check_plot_file(args.plot)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = run_benchmark(
        cases, device=device, dtype=args.dtype, batch_size=args.batch_size, img_size=args.img_size,
        warmup=args.warmup, steps=args.steps, modes=modes, prop_attn=args.prop_attn,
        compile=args.compile, compile_scope=args.compile_scope, cuda_graphs=args.cuda_graphs, timer=args.timer,
        stat=args.stat, seed=args.seed, auto_min_batch=args.auto_min_batch, sdpa=args.sdpa, runtime=args.runtime,
        log=log,
    )

    machine = machine_info(device)
    setting = (f"{machine['host_cpu']}" + (f" / {machine['gpu']}" if "gpu" in machine else "")
               + f", torch {machine['torch']}, threads={machine['torch_threads']}, {args.dtype}, "
               + f"prop_attn={'on' if args.prop_attn else 'off'}{f', compiled ({args.compile}, ToMe by {args.compile_scope})' if args.compile else ''}"
               + f"{', CUDA graphs' if args.cuda_graphs else ''}"
               + f"{', onnxruntime' if args.runtime == 'onnxruntime' else ''}, "
               + f"{args.stat} of {args.steps} steps, {args.timer} clock")
    print(setting)
    others = max((row["other_cpus"] for row in rows if row["other_cpus"] is not None), default=None)
    if others is not None and others > 0.25 and args.timer == "wall":
        print(f"warning: other processes kept {others:.1f} of {os.cpu_count()} CPUs busy during the run: "
              f"wall-clock numbers are unreliable; --timer cpu --threads 1 is robust to that", file=sys.stderr)
    print(format_table(rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"machine": machine, "argv": argv, "results": rows,
                       "fused_kernel_times": kernels.choice_times()}, f, indent=2)
            f.write("\n")
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        plot_ratios(rows, f"batch {args.batch_size}, {setting}").savefig(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
