"""scripts/speed_targets.py: issue 7's targets judged from benchmark JSON, on the GPU runs this repository keeps
(docs/gpu-runs/) and on rows made to sit on each side of a threshold."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

RUNS = ROOT / "docs" / "gpu-runs"
F1, F2 = RUNS / "2026-11-27-h100-device-time" / "run-f1", RUNS / "2026-11-27-h100-device-time" / "run-f2"
D = RUNS / "2026-11-27-h100-kernels"


@pytest.fixture
def targets(load_script):
    return load_script("speed_targets")


def _row(**changes):
    row = {"model": "vit_base_patch16_224", "r": "16", "mode": "infer", "batch_size": 256, "dtype": "fp16",
           "device": "cuda", "img_size": 224, "prop_attn": True, "compile": False, "cuda_graphs": False,
           "ratio": 1.8, "ratio_of_bound": 0.89, "first_ratio": 20.0, "recompiles": 0, "merging": True}
    return {**row, **changes}


def _target(targets, name):
    return next(t for t in targets.TARGETS if t.name == name)


def test_the_kept_runs_give_the_tables_figures(targets):
    runs = [targets.read_run(path / "results.json", name) for path, name in ((D, "d"), (F1, "f1"), (F2, "f2"))]
    latest = {}
    for verdict in sorted(targets.verdicts(runs), key=lambda v: v["date"]):
        latest[verdict["target"]] = verdict
    training_b = latest["ViT-B/16 r16 training, bf16, batch 128"]
    assert (training_b["run"], training_b["step"], round(training_b["ratio"], 2), training_b["met"]) == (
        "f2", "train_b_graphs", 1.83, True)
    training_l = latest["ViT-L/16 r8 training, bf16, batch 64"]
    assert (training_l["run"], round(training_l["ratio"], 2), training_l["met"]) == ("f1", 1.78, True)
    # a run's best row counts: f2's inference under graphs, not its eager row
    inference_l = latest["ViT-L/16 r8 inference, fp16, batch 256"]
    assert (inference_l["run"], inference_l["step"], round(inference_l["ratio"], 2), inference_l["met"]) == (
        "f2", "infer_l_graphs", 1.77, False)
    inference_b = latest["ViT-B/16 r16 inference, fp16, batch 256"]
    assert (round(inference_b["ratio"], 2), inference_b["met"]) == (1.64, False)
    compiled = latest["compiled ViT-B/16 r16 training"]
    assert (compiled["run"], round(compiled["ratio"], 2), round(compiled["first_ratio"], 2), compiled["met"]) == (
        "d", 1.46, 1.58, False)
    batch_one = latest["ViT-B/16 r16 batch-1 latency, fp16"]
    assert batch_one["met"] and "merging off (min_batch 2)" in batch_one["setting"]
    assert "compiled ViT-L/16 r8 training" not in latest


@pytest.mark.parametrize("name, changes, met", [
    ("ViT-B/16 r16 inference, fp16, batch 256", {"ratio": 1.8}, True),
    ("ViT-B/16 r16 inference, fp16, batch 256", {"ratio": 1.79}, False),
    ("ViT-B/16 r16 training, bf16, batch 128", {"mode": "train", "batch_size": 128, "dtype": "bf16", "ratio": 1.7},
     True),
    ("compiled ViT-B/16 r16 inference", {"compile": "default", "ratio": 1.9, "first_ratio": 1.5}, True),
    ("compiled ViT-B/16 r16 inference", {"compile": "default", "ratio": 1.9, "first_ratio": 1.51}, False),
    ("compiled ViT-B/16 r16 inference", {"compile": "default", "ratio": 1.9, "first_ratio": 1.2, "recompiles": 1},
     False),
    ("ViT-B/16 r16 batch-1 latency, fp16", {"batch_size": 1, "ratio": 0.996, "merging": False}, True),
    ("ViT-B/16 r16 batch-1 latency, fp16", {"batch_size": 1, "ratio": 0.994}, False),
    ("CPU ViT-S/16 r13 inference, fp32, batch 32", {"model": "vit_small_patch16_224", "r": "13", "device": "cpu",
                                                    "dtype": "fp32", "batch_size": 32, "ratio": 1.63,
                                                    "ratio_of_bound": 0.951}, True),
    ("CPU ViT-S/16 r13 inference, fp32, batch 32", {"model": "vit_small_patch16_224", "r": "13", "device": "cpu",
                                                    "dtype": "fp32", "batch_size": 32, "ratio": 1.63,
                                                    "ratio_of_bound": 0.949}, False),
])
def test_a_row_meets_a_target_at_its_threshold(targets, name, changes, met):
    target, row = _target(targets, name), _row(**changes)
    assert target.measures(row)
    assert target.met(row) is met


@pytest.mark.parametrize("changes", [{"prop_attn": False}, {"img_size": 64}, {"r": "8"}, {"compile": "default"},
                                     {"device": "cpu"}, {"dtype": "bf16"}, {"runtime": "onnxruntime"}])
def test_a_row_at_other_settings_measures_no_target_of_its_model(targets, changes):
    assert not _target(targets, "ViT-B/16 r16 inference, fp16, batch 256").measures(_row(**changes))


def test_the_command_writes_the_table_and_the_chart(targets, tmp_path, capsys):
    files = [F1 / "results.json", F2 / "results.json", D / "results.json"]
    assert targets.main([*map(str, files), "--markdown", str(tmp_path / "targets.md"),
                         "--plot", str(tmp_path / "targets.png")]) == 0
    table = capsys.readouterr().out
    assert (tmp_path / "targets.md").read_text() == table
    lines = table.splitlines()
    assert lines[2].startswith("| ViT-B/16 r16 inference, fp16, batch 256 | >= 1.80x | "
                               "2026-11-27-h100-device-time/run-f2 (infer_b_graphs) |")
    assert "| compiled ViT-L/16 r8 inference | >= 1.80x, compile <= 1.5x, 0 recompiles | not measured |" in table
    assert "| 2026-11-27-h100-kernels (compile_b_train_regions_graphs) | compiled (default, regions), each step one " \
           "CUDA graph, median of 10 steps | 1.46x, compile 1.58x, 0 recompiles | not met |" in table
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "targets.png").shape[:2] == (528, 1430)


def test_bad_input_exits_2_with_one_line(tmp_path):
    probe_only = tmp_path / "probe.json"
    probe_only.write_text(json.dumps({"merge": {"results": [{"part": "matching", "ms": 0.1}]}}))
    not_json = tmp_path / "log"
    not_json.write_text("== infer_b\n")
    for args, needle in (([str(tmp_path / "missing.json")], "no such file"),
                         ([str(probe_only)], "no benchmark rows in"),
                         ([str(not_json)], "is not a benchmark's JSON")):
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "speed_targets.py"), *args],
                                capture_output=True, text=True)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.startswith("error: ") and needle in result.stderr and result.stderr.count("\n") == 1


def test_the_kept_table_is_what_the_kept_runs_make(targets, tmp_path, capsys):
    """docs/targets.md, made by the command docs/performance.md gives, stays in step with the runs kept beside it."""
    files = [*sorted(RUNS.glob("*/results.json")), *sorted(RUNS.glob("*/*/results.json")),
             *sorted((ROOT / "docs" / "cpu-runs").glob("*/*.json"))]
    assert targets.main([*map(str, files), "--markdown", str(tmp_path / "targets.md")]) == 0
    assert (tmp_path / "targets.md").read_text() == (ROOT / "docs" / "targets.md").read_text(), (
        "regenerate docs/targets.md with the command in docs/performance.md")
