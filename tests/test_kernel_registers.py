"""scripts/kernel_registers.py: the library's Triton kernels built for an H100 (sm_90) on this CPU, as a launch
specializes them, with ptxas's register and spill report. The builds run in a subprocess: the tests run Triton
interpreted (conftest.py), the builds need it compiled; refusals, which come before any build, in this process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_registers.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_plan_and_merge_kernels_build_for_sm90_without_spilling(tmp_path):
    """ViT-B's first merging layer (181 tokens, 12 heads of 64) in fp16 and bf16: every launch of the one-kernel
    plan, of the merge and of the merge with the norm builds, within the 255 registers a thread may hold and with no
    spill, the plan with set A in one matching block of 128 for both key dtypes (with fp32 FMAs for its similarity
    products bf16 keys took 255 registers and spilled there; with three TF32 products each, 104)."""
    out = tmp_path / "registers.json"
    done = run_script("--tokens", "181", "--dtype", "fp16", "bf16", "--kernels", "plan_layer", "merge", "merge_norm",
                      "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["dtype"], row["kernel"]) for row in rows] == [
        (dtype, kernel) for dtype in ("fp16", "bf16")
        for kernel in ("_plan_layer", "_scaled_row_copy", "_scaled_row_copy", "_merged_row_norm")]
    assert all(0 < row["registers"] <= 255 and row["spill_bytes"] == 0 for row in rows), rows
    plans = {row["dtype"]: row["constexprs"] for row in rows if row["kernel"] == "_plan_layer"}
    assert plans["fp16"]["BLOCK_MATCH"] == plans["bf16"]["BLOCK_MATCH"] == 128
    assert plans["fp16"]["HEADS_PER_STEP"] == 4 and plans["fp16"]["PRODUCTS"] == "tf32x3"


def refusal(load_script, monkeypatch, capsys, interpret: str, *args: str) -> tuple[int, str]:
    """The script's exit code and stderr for bad input, in this process: it stops before any build."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(SystemExit) as stop:
        load_script("kernel_registers").main(list(args))
    return stop.value.code, capsys.readouterr().err


def test_an_unknown_kernel_name_exits_2_naming_the_choices(load_script, monkeypatch, capsys):
    code, err = refusal(load_script, monkeypatch, capsys, "0", "--tokens", "37", "--kernels", "plan")
    assert code == 2
    assert "--kernels plan: not a wrapper; choose from plan_layer, merge" in err


def test_under_tritons_interpreter_it_exits_2_saying_why(load_script, monkeypatch, capsys):
    """Interpreted, no launch would be a build: one line and exit 2, not an empty report."""
    code, err = refusal(load_script, monkeypatch, capsys, "1", "--tokens", "37")
    assert code == 2
    assert err.strip() == "TRITON_INTERPRET=1: the kernels build only with Triton compiling them; unset it or set it to 0"
