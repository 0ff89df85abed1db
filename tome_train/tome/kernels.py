"""The choice between PyTorch's ops and fused Triton kernels (:mod:`.triton_kernels`), by measurement.

PyTorch's ops (:mod:`.merge`) are the reference and run everywhere. Where Triton can run (a CUDA device
with the ``triton`` package that CUDA builds of torch ship), a :class:`FastestPath` runs the reference
and the fused kernel once per input shape on the real inputs, and keeps the kernel for that shape only
if it computes the reference's result and takes less time; a kernel that fails to build or run is
dropped for good. The choice is never made under ``torch.compile`` (inductor writes its own kernels),
a tracer, CUDA-graph capture or deterministic algorithms (the kernel adds merged rows atomically).
"""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable

import torch

def recorded_into_graph(device: torch.device) -> bool:
    """Whether ops on ``device`` are being recorded, not run: traced by ``torch.compile`` or captured
    into a CUDA graph (whose kernels run only on replay)."""
    return torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _agree(reference: torch.Tensor, candidate: torch.Tensor) -> bool:
    return reference.shape == candidate.shape and torch.allclose(reference, candidate, rtol=1e-5, atol=1e-6)


class FastestPath:
    """``reference(*args)``, or ``candidate(*args)`` where that was measured to give the same result faster.

    ``candidate`` is a function or the name of one in :mod:`.triton_kernels`, imported at the first
    choice (a torch without triton has no candidate). The first call with a new device and input shapes
    on one of ``device_types`` (while ``enabled``) times both, three runs each after one that builds the
    kernel, and remembers the faster; later calls with those shapes take it directly. The first
    argument is a tensor on the device.
    """

    enabled = True  # False: always the reference (to measure against it, or to rule the kernels out)

    def __init__(self, reference: Callable, candidate: Callable | str, device_types: tuple[str, ...] = ("cuda",)):
        self.reference, self.candidate, self.device_types = reference, candidate, device_types
        self.choices: dict[tuple, Callable] = {}
        self.broken = False

    def _applies(self, device: torch.device) -> bool:
        if not FastestPath.enabled or self.broken or device.type not in self.device_types:
            return False
        if torch.jit.is_tracing() or torch.are_deterministic_algorithms_enabled():
            return False
        return not recorded_into_graph(device)

    def __call__(self, *args):
        device = args[0].device
        if not self._applies(device):
            return self.reference(*args)
        key = (device, *((a.dtype, tuple(a.shape)) if isinstance(a, torch.Tensor) else a for a in args))
        choice = self.choices.get(key)
        if choice is None:
            choice = self.choices[key] = self._choose(device, args)
        return choice(*args)

    def _time(self, fn: Callable, device: torch.device, args) -> float:
        times = []
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn(*args)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def _load(self) -> Callable | None:
        if isinstance(self.candidate, str):
            try:
                from . import triton_kernels
            except ImportError:  # no triton: nothing to choose from, and nothing to warn about
                return None
            self.candidate = getattr(triton_kernels, self.candidate)
        return self.candidate

    def _choose(self, device: torch.device, args) -> Callable:
        candidate = self._load()
        if candidate is None:
            self.broken = True
            return self.reference
        try:
            error = None if _agree(self.reference(*args), candidate(*args)) else "a different result"
        except Exception as err:  # a kernel that does not build or run here
            error = str(err).splitlines()[0][:200]
        if error is not None:  # never again in this process
            self.broken = True
            warnings.warn(f"{candidate.__name__} cannot stand in for {self.reference.__name__} here ({error}); "
                          "using PyTorch's ops", RuntimeWarning, stacklevel=3)
            return self.reference
        return min((self.reference, candidate), key=lambda fn: self._time(fn, device, args))
