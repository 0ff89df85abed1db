"""The choice between PyTorch's ops and fused Triton kernels (:mod:`.triton_kernels`,
:mod:`.triton_attention`), by measurement.

PyTorch's ops (:mod:`.merge`, :mod:`.attention`) are the reference and run everywhere. Where Triton can
run (a CUDA device with the ``triton`` package that CUDA builds of torch ship), a :class:`FastestPath`
runs the reference and the fused kernel once per input shape on the real inputs, and keeps the kernel
for that shape only if it computes the reference's result and takes less time; a kernel that fails to
build or run is dropped for good. The choice is never made under ``torch.compile`` (inductor writes its own kernels), a
tracer or CUDA-graph capture (a choice made before it holds there); a kernel that adds atomically (the merge's) is
never chosen under deterministic algorithms. A call's cost is the larger of the host's launches and the device's
work, except for steps that will replay as CUDA graphs (:func:`choosing_for_graphs`), where it is the device's work.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import statistics
import time
import warnings
import weakref
from typing import Callable, Iterator

import torch


def capturing(device: torch.device) -> bool:
    """Whether ops on ``device`` are being captured into a CUDA graph (whose kernels run only on replay)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def recorded_into_graph(device: torch.device) -> bool:
    """Whether ops on ``device`` are being recorded, not run: traced by ``torch.compile`` or captured
    into a CUDA graph."""
    return torch.compiler.is_compiling() or capturing(device)


def compiling_with_ops() -> bool:
    """Whether ``torch.compile`` is tracing, and so a merging layer reaches the graph as the library's custom ops
    (which run the eager choice). Not under ``torch.export``: an exported program runs without Python (ONNX, AOTInductor),
    so it records PyTorch's ops."""
    # the flag torch.export sets around its trace, read directly: Dynamo in torch 2.11 (the GPU machine's) folds
    # torch.compiler.is_exporting() to True inside every trace, torch.compile's included
    return torch.compiler.is_compiling() and not torch.compiler._is_exporting_flag


@contextlib.contextmanager
def autograd_recording() -> Iterator[None]:
    """Autograd records, also where it would not: under ``no_grad``, and inside a custom op's implementation,
    which PyTorch runs with autograd's dispatch keys excluded (a choice through the backward, made when a
    compiled graph first calls an op, differentiates there)."""
    autograd = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
    exclude = torch._C._dispatch_tls_local_exclude_set() - autograd
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@contextlib.contextmanager
def _paths_set(setting: str, value: bool) -> Iterator[None]:
    """Every :class:`FastestPath`'s class-wide ``setting`` is ``value`` inside, as it was after."""
    previous = getattr(FastestPath, setting)
    setattr(FastestPath, setting, value)
    try:
        yield
    finally:
        setattr(FastestPath, setting, previous)


def choosing_for_graphs() -> contextlib.AbstractContextManager[None]:
    """Choices made inside go by the device's time alone: for steps that will replay as CUDA graphs, where the host
    launches one graph, not each kernel (on an H100, timed with the host's launches, the attention kernels were kept
    in 5 of ViT-L's 23 merging layers under whole-step graphs, and in 2 to 5 of ViT-B's 11)."""
    return _paths_set("device_time_only", True)


@functools.cache
def _sleep_cycles_per_second(device: torch.device) -> float:
    """The rate of ``torch.cuda._sleep``'s spin on ``device``, measured once."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        start.record()
        torch.cuda._sleep(1_000_000)
        end.record()
        end.synchronize()
    return 1_000_000 / (start.elapsed_time(end) / 1e3)


# Doublings of the sleep before a run of calls is taken to wait for the device (1024 times the first sleep, itself
# twice the run's wall time)
_MAX_SLEEP_DOUBLINGS = 10


def seconds_per_call(fn: Callable, device: torch.device, args: tuple, calls: int = 3) -> float:
    """Seconds per call in a run of ``calls`` back-to-back calls of ``fn(*args)`` (median of three runs): the cost
    of a call among the others of a step, the larger of the host's launch time and the device's work."""
    times = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def device_seconds_per_call(fn: Callable, device: torch.device, args: tuple, calls: int = 3) -> float:
    """Seconds of the device's work per call in a run of ``calls`` back-to-back calls (median of three runs), as a
    CUDA graph replays them: the device sleeps while the host enqueues the run behind it, so that no kernel waits
    for a launch. A run counts only if the device measurably slept for longer than the host took to enqueue it
    (the sleep's length is set by a rate measured once, and the clock may have changed since); otherwise the next
    sleeps twice as long. A call that waits for the device (a host sync) cannot be hidden so: where the host took
    longer to enqueue a run than a whole run takes without the sleep, or the sleep has doubled
    ``_MAX_SLEEP_DOUBLINGS`` times, it warns and returns the wall time, :func:`seconds_per_call`, as on a CPU."""
    per_call = seconds_per_call(fn, device, args, calls)
    if device.type != "cuda":
        return per_call
    cycles = int(2 * per_call * calls * _sleep_cycles_per_second(device))
    times, doublings = [], 0
    with torch.cuda.device(device):
        while len(times) < 3:
            asleep, awake, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            torch.cuda.synchronize()
            enqueue_start = time.perf_counter()
            asleep.record()
            torch.cuda._sleep(cycles)
            awake.record()
            for _ in range(calls):
                fn(*args)
            end.record()
            enqueue_s = time.perf_counter() - enqueue_start
            end.synchronize()
            # the sleep began after the host started enqueueing; ending after the host finished, it hid the host
            if asleep.elapsed_time(awake) / 1e3 > enqueue_s:
                times.append(awake.elapsed_time(end) / 1e3 / calls)
                continue
            # enqueueing alone outlasting a whole run without the sleep: the host waited for the device
            if enqueue_s > 1.5 * per_call * calls + 1e-3 or doublings == _MAX_SLEEP_DOUBLINGS:
                warnings.warn(f"{getattr(fn, '__name__', fn)} kept the host busy past the device's sleep (does it "
                              "wait for the device?); timed by the wall clock", RuntimeWarning, stacklevel=2)
                return per_call
            cycles *= 2
            doublings += 1
    return statistics.median(times)


@functools.cache
def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device)


@contextlib.contextmanager
def on_side_stream(device: torch.device) -> Iterator[None]:
    """Work queued inside runs on a second CUDA stream of ``device``, after the work queued so far on the current
    one, and so alongside what the current stream is given next, until :func:`join_side_stream`. Memory stays
    safe without ``record_stream`` as long as every fork is joined before its results are used: the side stream's
    allocations are reused only by later side work, which starts after the current stream's work queued before it."""
    side = _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield


def join_side_stream(device: torch.device) -> None:
    """The current stream of ``device`` waits for the work :func:`on_side_stream` queued."""
    torch.cuda.current_stream(device).wait_stream(_side_stream(device))


def pytorch_ops_only() -> contextlib.AbstractContextManager[None]:
    """Every :class:`FastestPath` runs its reference, PyTorch's ops, inside: the implementation that the tests hold
    to float64, to check a run of the kernels against."""
    return _paths_set("enabled", False)


Agreement = Callable[[tuple, object, object], bool]


def same_result(args: tuple, expected, candidate, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Whether ``candidate`` (a tensor or a tuple of them) is ``expected`` to ``rtol`` and ``atol``."""
    if isinstance(expected, torch.Tensor):
        expected, candidate = (expected,), (candidate,)
    return len(expected) == len(candidate) and all(
        e.shape == c.shape and torch.allclose(e, c, rtol=rtol, atol=atol) for e, c in zip(expected, candidate))


def to_units_in_last_place(units: float, fp32_tolerance: tuple[float, float] = (1e-5, 1e-6)) -> Agreement:
    """A check that a half-precision result is the expected one to ``units`` units in the last place of its
    dtype (``units`` times its machine epsilon, relative and absolute), an fp32 one to ``fp32_tolerance``
    (rtol, atol)."""
    def agree(args: tuple, expected, candidate) -> bool:
        dtype = (expected if isinstance(expected, torch.Tensor) else expected[0]).dtype
        if dtype in (torch.float16, torch.bfloat16):
            tolerance = units * torch.finfo(dtype).eps
            return same_result(args, expected, candidate, rtol=tolerance, atol=tolerance)
        return same_result(args, expected, candidate, *fp32_tolerance)

    return agree


# Sums that a kernel accumulates in fp32 and rounds once, where PyTorch's ops round every product and partial
# sum to a half-precision dtype: two units in the last place (fp16 2.0e-3, bf16 1.6e-2).
same_to_rounding = to_units_in_last_place(2)


def identical(args: tuple, expected, candidate) -> bool:
    """Whether ``candidate`` (a tensor or a tuple of them) is ``expected`` exactly: for indices, where a row
    off by one is another result."""
    if isinstance(expected, torch.Tensor):
        expected, candidate = (expected,), (candidate,)
    return len(expected) == len(candidate) and all(torch.equal(e, c) for e, c in zip(expected, candidate))


class FastestPath:
    """``reference(*args)``, or ``candidate(*args)`` where that was measured to give the same result faster.

    ``candidate`` is a function or its name in a module of this package (``"triton_kernels.fused_merge"``),
    imported at the first choice (a torch without triton has no candidate). The first call with a new
    device and input shapes on one of ``device_types`` (while ``enabled``) checks the candidate with
    ``agree(args, expected, candidate)`` (default :func:`same_result`), times both and remembers the
    faster; later calls with those shapes take it directly, also while a CUDA graph is captured (a shape
    first met during a capture gets the reference: timing there would synchronize). The first argument
    is a tensor on the device; a module argument counts by its type (a choice goes by shapes, and holds no model). With
    ``differentiable``, both are checked and timed through their
    backward too (:func:`through_backward`): the result is then the output and the input gradients. A candidate
    that is not ``deterministic`` (its result may vary in the last place from run to run, as atomic adds do) is
    never taken under ``torch.use_deterministic_algorithms``.
    """

    enabled = True  # False: always the reference (to measure against it, or to rule the kernels out)
    device_time_only = False  # True inside :func:`choosing_for_graphs`
    building_ahead = False  # True inside :func:`build_ahead`
    paths: "weakref.WeakSet[FastestPath]" = weakref.WeakSet()  # every live path, for :func:`report`
    _choosing_s_all = 0.0  # what every path's choices took, each counted once
    _building_ahead_s = 0.0  # what :func:`build_ahead` took

    def __init__(self, reference: Callable, candidate: Callable | str, device_types: tuple[str, ...] = ("cuda",),
                 agree: Agreement = same_result, differentiable: bool = False, deterministic: bool = True):
        self.reference, self.candidate, self.device_types, self.agree = reference, candidate, device_types, agree
        self.differentiable, self.deterministic = differentiable, deterministic
        self.name = candidate.rsplit(".", 1)[-1] if isinstance(candidate, str) else candidate.__name__
        FastestPath.paths.add(self)
        self.choices: dict[tuple, Callable] = {}
        # per choice: the reference's and the candidate's seconds per call, and what they measured ("host and
        # device" or "device")
        self.seconds: dict[tuple, tuple[float, float, str]] = {}
        self.choosing_s = 0.0  # the time its choices took: loading, first runs (Triton's compilation), checks, timing
        self.broken = False

    def applies(self, device: torch.device) -> bool:
        """Whether a call on ``device`` may take the candidate: the paths enabled and this one not broken, a device
        it chooses on, no tracer, no compiler, and deterministic algorithms not ruling it out. A caller that would
        rather not take a path's detour where it cannot take the candidate asks this first."""
        if not FastestPath.enabled or self.broken or device.type not in self.device_types:
            return False
        if torch.jit.is_tracing() or (not self.deterministic and torch.are_deterministic_algorithms_enabled()):
            return False
        return not torch.compiler.is_compiling()  # inductor writes its own kernels

    def __call__(self, *args):
        return self.pick(*args)(*args)

    def pick(self, *args) -> Callable:
        """The function that runs for ``args``: the reference or the candidate, choosing first if these
        shapes are new (which runs both on ``args``)."""
        device = args[0].device
        if not self.applies(device):
            return self.reference
        key = (device, *((a.dtype, tuple(a.shape)) if isinstance(a, torch.Tensor)
                         else type(a) if isinstance(a, torch.nn.Module) else a for a in args))
        choice = self.choices.get(key)
        if FastestPath.building_ahead:
            # a kernel launched in the pass ahead only builds: its output would be garbage for the ops after it
            if choice is None:
                self._build(args)
            return self.reference
        if choice is None:
            if capturing(device):
                return self.reference
            started, chosen_before = time.perf_counter(), FastestPath._choosing_s_all
            choice = self.choices[key] = self._choose(device, args, key)
            # less what choices of other paths took inside this one (a reference that runs a path of its own)
            own_s = time.perf_counter() - started - (FastestPath._choosing_s_all - chosen_before)
            self.choosing_s += own_s
            FastestPath._choosing_s_all += own_s
        return choice

    def _load(self) -> Callable | None:
        if isinstance(self.candidate, str):
            module, name = self.candidate.rsplit(".", 1)
            try:
                module = importlib.import_module(f".{module}", __package__)
            except ImportError:  # no triton: nothing to choose from, and nothing to warn about
                return None
            self.candidate = getattr(module, name)
        return self.candidate

    def _build(self, args: tuple) -> None:
        """The candidate run on ``args`` inside :func:`build_ahead` (through its backward if ``differentiable``),
        which builds its kernels and runs none of them."""
        candidate = self._load()
        if candidate is None:
            return
        functions = {candidate: candidate}
        try:
            if self.differentiable:
                args, functions = through_backward(functions, args)
            functions[candidate](*args)
        except Exception:  # the choice meets it again, drops the candidate and says why
            pass

    def _choose(self, device: torch.device, args, key: tuple) -> Callable:
        candidate = self._load()
        if candidate is None:
            self.broken = True
            return self.reference
        measured = {self.reference: self.reference, candidate: candidate}
        try:
            if self.differentiable:
                args, measured = through_backward(measured, args)
            expected, result = (measured[fn](*args) for fn in (self.reference, candidate))
            error = None if self.agree(args, expected, result) else "a different result"
        except Exception as err:  # a kernel that does not build or run here
            error = str(err).splitlines()[0][:200]
        if error is not None:  # never again in this process
            self.broken = True
            warnings.warn(f"{candidate.__name__} cannot stand in for {self.reference.__name__} here ({error}); "
                          "using PyTorch's ops", RuntimeWarning, stacklevel=3)
            return self.reference
        timer, timed = ((device_seconds_per_call, "device") if self.device_time_only
                        else (seconds_per_call, "host and device"))
        ops, kernel = (timer(measured[fn], device, args) for fn in (self.reference, candidate))
        self.seconds[key] = (ops, kernel, timed)
        return candidate if kernel < ops else self.reference


def through_backward(functions: dict[Callable, Callable], args: tuple) -> tuple[tuple, dict[Callable, Callable]]:
    """Each function as one that also runs its backward: on ``args``' tensors that require a gradient,
    detached (the caller's autograd graph is left alone), with one fixed random output gradient; each
    returns its output and the input gradients. Returns the detached arguments and the new functions."""
    args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = next(iter(functions))(*args)
    # a generator of its own: the choice must not move the caller's random stream
    generator = torch.Generator(out.device).manual_seed(0)
    grad = torch.randn(out.shape, generator=generator, device=out.device, dtype=torch.float32).to(out.dtype)

    def with_backward(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args):
            with autograd_recording():
                out = fn(*args)
                return (out, *torch.autograd.grad(out, inputs, grad))

        return run

    return args, {key: with_backward(fn) for key, fn in functions.items()}


def may_choose(device: torch.device) -> bool:
    """Whether a step on ``device`` may make choices: some live path may take its candidate there
    (:meth:`FastestPath.applies`) and nothing is being captured."""
    return not capturing(device) and any(path.applies(device) for path in list(FastestPath.paths))


def build_ahead(step: Callable[[], object], device: torch.device) -> bool:
    """Runs ``step`` once, the choices it meets deferred and their kernels built: a path meeting new shapes runs
    its reference and, instead of choosing, runs its candidate with the Triton kernels' launches built in a pool of
    threads, not run (:func:`.triton_builds.built_not_run`). The same step then makes its choices without waiting
    for one build after another (on an H100, run f2, most of a first step's choices: ViT-L inference 21.9 s with
    Triton's cache empty, 4.9 s with it filled). The random streams of the CPU and ``device`` come out as they went
    in. A pass that fails warns and leaves the kernels to build at their first launch, as without it. Returns
    whether it ran: not without triton, nor where it interprets the kernels (nothing to build) or cannot build in a
    pool."""
    try:
        builds = importlib.import_module(".triton_builds", __package__)
    except ImportError:
        return False
    if not builds.can_build_ahead():
        return False
    started = time.perf_counter()
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()
                    ] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(cuda_devices), builds.built_not_run(), _paths_set("building_ahead", True):
            step()
    except Exception as err:  # a Triton whose building in a pool differs from the one this was written for, say
        warnings.warn(f"building kernels ahead failed ({str(err).splitlines()[0][:200]}); they build at their first "
                      "launch", RuntimeWarning, stacklevel=2)
    FastestPath._building_ahead_s += time.perf_counter() - started
    return True


def choice_times() -> dict[str, list[dict]]:
    """The measurements behind :func:`report`: for each kernel, per input shape it was timed at (its first
    argument's shape and dtype), microseconds per call of PyTorch's ops and of the kernel and what they measured
    (``timed``: ``"host and device"``, :func:`seconds_per_call`, or ``"device"``, :func:`device_seconds_per_call`)."""
    return {path.name: [{"shape": list(key[1][1]), "dtype": str(key[1][0]).removeprefix("torch."),
                         "ops_us": round(ops * 1e6, 1), "kernel_us": round(kernel * 1e6, 1), "timed": timed}
                        for key, (ops, kernel, timed) in path.seconds.items()]
            for path in sorted(FastestPath.paths, key=lambda p: p.name) if path.seconds}


def choosing_seconds() -> float:
    """The time every live path's choices took so far in this process (a model's first step on a GPU makes them)."""
    return sum(path.choosing_s for path in FastestPath.paths)


def building_seconds() -> float:
    """The time the passes of :func:`build_ahead` took so far in this process (before a model's first step of each
    kind on a GPU)."""
    return FastestPath._building_ahead_s


def report() -> dict[str, str]:
    """What the paths chose so far in this process: for each kernel, on how many of the input shapes it
    met it was kept (``"9/12"``; ``" dropped"`` added where it failed to build, run or agree). Only paths
    that were asked on a device they choose on."""
    return {path.name: f"{sum(c is not path.reference for c in path.choices.values())}/{len(path.choices)}"
            + (" dropped" if path.broken else "")
            for path in sorted(FastestPath.paths, key=lambda p: p.name) if path.choices or path.broken}
