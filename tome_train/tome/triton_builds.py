"""The library's Triton kernels built ahead of their first launch, many at once (imported only where triton is).

A first step on a GPU builds every kernel it meets, one after the other, each build about a second of the host's
time: most of a ViT's first ToMe step (on an H100, run f2: ViT-L inference 21.9 s of choices with Triton's cache
empty, 4.9 s with it filled). Triton (3.4 on) builds in a pool of threads under ``triton.AsyncCompileMode``: a
kernel's ``warmup`` with a launch's arguments starts its build there, keyed as that launch will look it up.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction, KernelInterface

from . import triton_attention, triton_kernels

KERNEL_MODULES = (triton_kernels, triton_attention)

Launch = Callable[[KernelInterface, object, tuple, dict], object]


def can_build_ahead() -> bool:
    """Whether the library's kernels are built (not interpreted: ``TRITON_INTERPRET``) and this Triton builds in a
    pool of threads (``triton.AsyncCompileMode``, Triton 3.4 on; with the ``ignore_errors`` of 3.6 and 3.8, without which
    :func:`built_not_run` raises and :func:`.kernels.build_ahead` warns)."""
    return isinstance(triton_kernels._plan_layer, JITFunction) and hasattr(triton, "AsyncCompileMode")


def build_for(arch: int) -> None:
    """From now on in this process Triton builds for an NVIDIA ``sm_<arch>`` device, whatever the machine has (a build
    needs only the target; nothing can launch): to build, and time builds, on a machine without that GPU."""

    class Target:
        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int) -> int:
            return 0

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", arch, 32)

    driver.set_active(Target())


@contextlib.contextmanager
def launches_redirected(launch: Launch) -> Iterator[None]:
    """Inside, a launch ``kernel[grid](*args, **kwargs)`` of one of the library's kernels (compiled or interpreted)
    calls ``launch(kernel, grid, args, kwargs)`` instead; other kernels launch as usual. The kernels stay where they
    are (a kernel's build reads the functions it calls from its module)."""
    ours = {id(value) for module in KERNEL_MODULES for value in vars(module).values()
            if isinstance(value, KernelInterface)}
    launch_as_usual = KernelInterface.__getitem__

    def redirected(kernel: KernelInterface, grid):
        if id(kernel) in ours:
            return lambda *args, **kwargs: launch(kernel, grid, args, kwargs)
        return launch_as_usual(kernel, grid)

    KernelInterface.__getitem__ = redirected
    try:
        yield
    finally:
        KernelInterface.__getitem__ = launch_as_usual


@contextlib.contextmanager
def launches_recorded() -> Iterator[list[tuple[KernelInterface, tuple, dict]]]:
    """Inside, a launch of one of the library's kernels is appended to the yielded list as ``(kernel, args,
    kwargs)`` and not run (the wrappers' outputs stay uninitialized)."""
    launches = []
    with launches_redirected(lambda kernel, grid, args, kwargs: launches.append((kernel, args, kwargs))):
        yield launches


@contextlib.contextmanager
def built_not_run(workers: int | None = None) -> Iterator[None]:
    """Inside, a launch of one of the library's kernels starts its build in a pool of ``workers`` threads (default:
    the CPUs this process may use) and is not run (the wrappers' outputs stay uninitialized); leaving waits for
    every build, after which the launches find their kernels built. Interpreted kernels have nothing to build."""
    workers = workers or len(os.sched_getaffinity(0))
    # a build that fails is left out (ignore_errors): its launch builds it again and fails there, where the choice drops
    # the kernel and says why
    with (ThreadPoolExecutor(workers, thread_name_prefix="triton-build") as pool,
          triton.AsyncCompileMode(pool, ignore_errors=True),
          launches_redirected(lambda kernel, grid, args, kwargs: kernel.warmup(*args, grid=grid, **kwargs))):
        yield
