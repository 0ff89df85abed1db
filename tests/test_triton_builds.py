"""tome_train.tome.triton_builds: the library's Triton kernels built ahead of their launches in a pool of threads, for
an H100's target (sm_90) on this CPU. Builds run in a subprocess: the tests run Triton interpreted (conftest.py),
builds need it compiled; Triton builds for sm_90 (``build_for``: a build needs no GPU, only the target)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BUILD_THEN_LAUNCH = """
import json, torch
from tome_train.tome import triton_builds, triton_kernels
from tome_train.tome.triton_builds import launches_redirected

triton_builds.build_for(90)

keys = torch.zeros(16, 181, 3 * 768, dtype=torch.float16)[..., 768:1536].unflatten(-1, (12, 64)).transpose(1, 2)
rows, branch = torch.zeros(16 * 181, 768), torch.zeros(16 * 181, 768, dtype=torch.float16)
perm, weight, norm = torch.arange(16 * 181), torch.ones(16 * 181, 1), torch.ones(768)


def layer():
    triton_kernels.fused_plan_layer(keys, torch.ones(16 * 181), 16, 1, torch.float32)
    triton_kernels.fused_merge_norm(rows, perm, perm, weight, 16 * 165, branch, norm, norm, 1e-6, torch.float16, 16)


assert triton_builds.can_build_ahead()
with triton_builds.built_not_run(workers=2):
    layer()
built = {kernel.__name__: dict(kernel.device_caches[0][0])
         for kernel in (triton_kernels._plan_layer, triton_kernels._merged_row_norm)}
found = []
with launches_redirected(lambda kernel, grid, args, kwargs: found.append(
        (kernel.__name__, kernel.warmup(*args, grid=grid, **kwargs)))):
    layer()
print(json.dumps({
    "built": {name: [type(k).__name__ for k in cache.values()] for name, cache in built.items()},
    "cubin_bytes": [len(k.asm["cubin"]) for cache in built.values() for k in cache.values()],
    "found_built": [name for name, kernel in found if any(kernel is k for k in built[name].values())],
    "found": [name for name, _ in found],
}))
"""


def test_a_layers_kernels_build_in_a_pool_and_their_launches_find_them_built():
    """ViT-B's first merging layer (batch 16, 181 tokens, fp16 keys): inside ``built_not_run`` the one-kernel plan and
    the merge-and-norm kernel build for sm_90 (one cubin each) in a pool of two threads; after it, the same launches
    look their kernels up as built, the very objects the pool built, and build nothing more."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", BUILD_THEN_LAUNCH], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["built"] == {"_plan_layer": ["CompiledKernel"], "_merged_row_norm": ["CompiledKernel"]}
    assert all(size > 1000 for size in result["cubin_bytes"])
    assert result["found"] == result["found_built"] == ["_plan_layer", "_merged_row_norm"]


def test_the_build_probe_refuses_an_unknown_model_and_no_threads_in_one_line(load_script, monkeypatch, capsys):
    """``scripts/build_probe.py`` with a model timm does not have, or zero build threads: exit code 2, one line naming
    the value, before any build (so in this process, which runs Triton interpreted)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    probe = load_script("build_probe")
    for args, named in ((["--model", "vit_nope"], "--model vit_nope"), (["--workers", "0", "2"], "--workers 0 2")):
        with pytest.raises(SystemExit) as stop:
            probe.main(args)
        done = capsys.readouterr()
        assert stop.value.code == 2 and done.out == ""
        assert done.err.splitlines() == [done.err.strip()] and done.err.startswith(named)
