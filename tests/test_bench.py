"""tome_train.bench: structure and consistency of what it writes, and its bad-input exits.

Timings are never asserted: only that the numbers agree with each other and with the FLOP model.
The tiny model at 64 px (16 patches + class token) keeps every run to a few seconds on a CPU.
"""
import argparse
import csv
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from tome_train import bench
from tome_train.tome import ViTDims, apply_tome, parse_schedule, vit_flops

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "64", "--device", "cpu", "--batch-size", "2",
        "--steps", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def both_modes(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, csv_path = out / "bench.json", out / "bench.csv"
    rc = bench.main(TINY + ["--r", "0", "2", "--mode", "both", "--output", str(json_path), "--csv", str(csv_path),
                            "--plot", str(out / "bench.png"), "--quiet"])
    return rc, json.loads(json_path.read_text()), list(csv.DictReader(csv_path.open()))


def test_json_has_one_row_per_case_and_mode(both_modes):
    rc, data, _ = both_modes
    assert rc == 0
    assert {"date", "host_cpu", "cpu_count", "torch", "timm", "device"} <= set(data["machine"])
    rows = data["results"]
    assert [(row["r"], row["mode"]) for row in rows] == [("0", "infer"), ("0", "train"), ("2", "infer"), ("2", "train")]
    for row in rows:
        assert set(row) == set(bench.FIELDS)
        assert row["model"] == "vit_tiny_patch16_224" and row["img_size"] == 64 and row["batch_size"] == 2
        assert row["baseline_ims"] > 0 and row["tome_ims"] > 0
        assert math.isclose(row["ratio"], row["tome_ims"] / row["baseline_ims"], rel_tol=1e-9)
        assert math.isclose(row["ratio_of_bound"], row["ratio"] / row["flop_bound"], rel_tol=1e-9)
        assert math.isclose(row["baseline_ims"], 2 / (row["baseline_ms"] / 1e3), rel_tol=1e-9)
        assert row["baseline_gflops"] >= row["tome_gflops"] > 0
        assert row["baseline_first_s"] > 0 and row["tome_first_s"] > 0
        assert math.isclose(row["first_ratio"], row["tome_first_s"] / row["baseline_first_s"], rel_tol=1e-9)
        assert row["recompiles"] == 0 and row["min_batch"] == 1 and row["merging"] == (row["r"] != "0")
        # eager on a CPU: nothing compiled, no kernel to choose
        assert row["baseline_first_graphs"] == row["tome_first_graphs"] == 0 and row["tome_first_choosing_s"] == 0.0
        assert row["tome_first_building_s"] == 0.0
        if row["mode"] == "infer":  # fp32 eager on both sides of the check: the very same computation
            assert row["baseline_max_diff"] == row["tome_max_diff"] == row["ops_max_diff"] == 0.0
            assert row["same_merges"] == row["same_merges_as_ops"] == 1.0
        else:
            assert {row[k] for k in ("baseline_max_diff", "tome_max_diff", "same_merges", "ops_max_diff",
                                     "same_merges_as_ops")} == {None}


def test_flop_bound_follows_the_schedule(both_modes):
    rows = both_modes[1]["results"]
    r0, r2 = rows[0], rows[2]
    assert r0["flop_bound"] == 1.0 and r0["schedule"] == [0] * 12 and r0["tokens_out"] == r0["tokens_in"] == 17
    assert r2["flop_bound"] > 1.0 and r2["schedule"] == [2] * 12
    assert r2["tokens_out"] == 2  # 17 tokens: 2 per layer until the 50% cap leaves the class token and one more
    import timm

    dims = ViTDims.from_timm(timm.create_model("vit_tiny_patch16_224", img_size=64, pretrained=False))
    schedule = parse_schedule(2, 12)
    assert math.isclose(r2["flop_bound"], vit_flops(dims, blocks_only=True) / vit_flops(dims, schedule, blocks_only=True))
    assert math.isclose(r2["baseline_gflops"], vit_flops(dims) / 1e9) and math.isclose(
        r2["tome_gflops"], vit_flops(dims, schedule) / 1e9)


def test_csv_matches_json(both_modes):
    _, data, rows = both_modes
    assert len(rows) == len(data["results"])
    for row, ref in zip(rows, data["results"]):
        assert list(row) == list(bench.FIELDS)
        assert row["mode"] == ref["mode"] and row["r"] == ref["r"]
        assert math.isclose(float(row["ratio"]), ref["ratio"])
        assert row["schedule"] == " ".join(str(v) for v in ref["schedule"])


def test_plot_draws_each_model_and_mode_against_the_flop_bound(both_modes):
    rows, argv = both_modes[1]["results"], both_modes[1]["argv"]
    with Image.open(argv[argv.index("--plot") + 1]) as image:
        assert image.format == "PNG" and image.size == (720, 540)
    lines = {line.get_label(): line for line in bench.plot_ratios(rows, "title").axes[0].lines}
    assert {label for label in lines if not label.startswith("_")} == {
        "vit_tiny_patch16_224, infer", "vit_tiny_patch16_224, train", "the FLOP bound"}
    xs, ys = lines["the FLOP bound"].get_data()
    assert xs[0] == ys[0] == 1.0 and xs[1] == ys[1] >= max(max(row["ratio"], row["flop_bound"]) for row in rows)
    for mode in ("infer", "train"):
        xs, ys = lines[f"vit_tiny_patch16_224, {mode}"].get_data()
        assert list(xs) == [row["flop_bound"] for row in rows if row["mode"] == mode]  # r=0 first: bound 1.0
        assert list(ys) == [row["ratio"] for row in rows if row["mode"] == mode]


def test_pair_zips_and_table_prints(capsys):
    rc = bench.main(TINY + ["--r", "1", "3@-1", "--pair", "--mode", "infer", "--no-prop-attn", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "prop_attn=off" in out and "FLOP bound" in out
    assert out.count("vit_tiny_patch16_224") == 2 and "3@-1" in out


def test_run_benchmark_is_importable_and_takes_tuples():
    rows = bench.run_benchmark([("vit_tiny_patch16_224", (3, -1.0))], device="cpu", img_size=64, batch_size=1,
                               warmup=0, steps=1, modes=["infer"])
    assert len(rows) == 1
    assert rows[0]["schedule"] == parse_schedule((3, -1.0), 12) and rows[0]["schedule"][0] == 6
    assert rows[0]["flop_bound"] > 1.0


def test_make_cases_cross_product_and_pair():
    assert len(bench.make_cases(["a", "b"], [1, 2, 3], pair=False)) == 6
    assert [(c.model, c.r) for c in bench.make_cases(["a", "b"], [1, 2], pair=True)] == [("a", 1), ("b", 2)]
    assert [c.r for c in bench.make_cases(["a", "b"], [5], pair=True)] == [5, 5]


@pytest.mark.parametrize("args, words", [
    (["--model", "vit_tiny_patch16"], ["unknown timm model", "vit_tiny_patch16_224"]),
    (["--model", "resnet18"], ["ResNet", "not a timm VisionTransformer"]),
    (["--model", "vit_tiny_patch16_224", "resnet18"], ["resnet18"]),  # found before timing the first model
    (["--r", "-1"], ["r=-1"]),
    (["--r", "abc"], ["r='abc'"]),
    (["--r", "2@-3"], ["inflect"]),
    (["--r", "99"], ["r=99 is not possible for this model", "at most 98 of its 196 patch tokens merge in a layer"]),
    (["--r", "1", "2", "3", "--model", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "--pair"], ["--pair"]),
    (["--img-size", "70"], ["img_size=70"]),
    (["--mode", "fast"], ["--mode"]),
    (["--batch-size", "0"], ["argument --batch-size: '0' is not allowed: use an integer >= 1"]),
    (["--steps", "x"], ["argument --steps: 'x' is not allowed: use an integer >= 1"]),
    (["--warmup", "-1"], ["argument --warmup: '-1' is not allowed: use an integer >= 0"]),
    (["--threads", "0"], ["argument --threads: '0' is not allowed"]),
    (["--dtype", "fp8"], ["--dtype"]),
    (["--compile", "fastest"], ["argument --compile: invalid choice: 'fastest'", "reduce-overhead"]),
    (["--sdpa", "triton"], ["--sdpa"]),
    (["--compile", "--compile-scope", "layers"], ["--compile-scope", "regions"]),
    (["--compile-scope", "regions"], ["compile_scope='regions'", "--compile"]),
    (["--device", "tpu"], ["device"]),
    (["--cuda-graphs"], ["cuda_graphs needs a CUDA device, not cpu"]),
    (["--cuda-graphs", "--compile", "reduce-overhead"], ["'reduce-overhead'", "graphs of its own", "default"]),
    (["--cuda-graphs", "--compile", "max-autotune"], ["'max-autotune'", "max-autotune-no-cudagraphs"]),
    (["--cuda-graphs", "--dtype", "fp16"], ["cuda_graphs training needs bf16 or fp32"]),
    (["--cuda-graphs", "--compile"], ["cuda_graphs needs a CUDA device, not cpu"]),  # the mode itself is allowed
    (["--output", "/nonexistent-dir/bench.json"], ["/nonexistent-dir", "does not exist"]),
    (["--output", __file__ + "/bench.json"], [f"'{__file__}' is not a directory"]),
    (["--plot", "/nonexistent-dir/bench.png"], ["/nonexistent-dir", "does not exist"]),
    (["--output", "/tmp"], ["'/tmp'", "is a directory"]),
    (["--csv", "/tmp"], ["'/tmp'", "is a directory"]),
    (["--output", "/proc/bench.json"], ["cannot write '/proc/bench.json'"]),  # after the run, a traceback
    (["--output", "/tmp/same.out", "--csv", "/tmp/same.out"], ["the same file", "name each its own"]),
    (["--plot", "bench"], ["--plot 'bench'", ".png", ".svg"]),
    (["--plot", "bench.xyz"], ["--plot 'bench.xyz'", ".png"]),
    (["--runtime", "tensorrt"], ["--runtime"]),
    (["--runtime", "onnxruntime", "--mode", "both", "--dtype", "bf16"],
     ["runtime=onnxruntime times fp32 inference on the CPU: mode train, dtype bf16 cannot apply"]),
    (["--runtime", "onnxruntime", "--compile", "--auto-min-batch"], ["compile, auto_min_batch cannot apply"]),
])
def test_bad_input_is_one_error_line_and_exit_2(args, words, capsys):
    defaults = ["--model", "vit_tiny_patch16_224", "--device", "cpu", "--steps", "1", "--warmup", "0", "--quiet"]
    assert bench.main(defaults + args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    for word in words:
        assert word in lines[0]


def test_cpu_timer_min_stat_and_threads_restored(tmp_path):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "b.json"
    rc = bench.main(TINY + ["--r", "2", "--mode", "infer", "--timer", "cpu", "--stat", "min", "--threads", "1",
                            "--output", str(out), "--quiet"])
    assert rc == 0 and torch.get_num_threads() == threads
    data = json.loads(out.read_text())
    assert data["machine"]["torch_threads"] == 1
    row = data["results"][0]
    assert row["timer"] == "cpu" and row["stat"] == "min" and row["tome_ims"] > 0


def test_onnxruntime_times_both_exported_models_and_checks_their_logits(tmp_path, capsys):
    """Both sides exported as ``train.py export --onnx`` writes them and run by onnxruntime: inference only by
    default, the logits of each within export's tolerance of its eager model, the merges in the exported graph
    (its logits are the patched model's, far from timm's)."""
    out = tmp_path / "onnx.json"
    rc = bench.main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--device", "cpu", "--batch-size", "3",
                     "--steps", "2", "--warmup", "1", "--r", "2", "--runtime", "onnxruntime", "--output", str(out),
                     "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "onnxruntime" in printed.splitlines()[0]
    (row,) = json.loads(out.read_text())["results"]
    assert row["runtime"] == "onnxruntime" and row["mode"] == "infer" and row["schedule"] == [2] * 12
    assert row["tokens_in"] == 17 and row["tokens_out"] < row["tokens_in"]
    assert row["baseline_max_diff"] < 1e-4 and row["tome_max_diff"] < 1e-4
    assert row["same_merges"] is None and row["recompiles"] == 0
    assert row["tome_ims"] > 0 and row["baseline_first_s"] > 0 and row["tome_first_s"] > 0
    assert f"{row['baseline_max_diff']:.1e} / {row['tome_max_diff']:.1e}" in printed

    torch.manual_seed(0)
    base, tome, _ = bench.build_pair(bench.BenchCase("vit_tiny_patch16_224", 2), img_size=64, prop_attn=True,
                                     device=torch.device("cpu"))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert (base.eval()(images) - tome.eval()(images)).abs().max() > 100 * 1e-4


def test_output_check_under_autocast_compares_with_fp32():
    """bf16 autocast against fp32 eager: the logits differ, and the check says by how much."""
    import torch

    row, = bench.run_benchmark([("vit_tiny_patch16_224", 4)], device="cpu", img_size=64, batch_size=3, dtype="bf16",
                               warmup=0, steps=1, modes=["infer"])
    # logits of about 1 in size; bf16 keeps 8 bits: 7.8e-3 and 7.9e-3 measured, not 0 (that would be fp32 against itself)
    assert 1e-3 < row["tome_max_diff"] < 5e-2 and 1e-3 < row["baseline_max_diff"] < 5e-2
    # a fraction of 3 images: all 3 merged as in fp32 here (2026-11-27); one near-tied match may flip elsewhere
    assert round(row["same_merges"] * 3) == pytest.approx(row["same_merges"] * 3) and row["same_merges"] > 0.5
    assert row["ops_max_diff"] == 0.0 and row["same_merges_as_ops"] == 1.0  # on a CPU the ops are all there is
    model = apply_tome(bench._create("vit_tiny_patch16_224", 64, "cpu"), r=4)
    x = torch.randn(3, 3, 64, 64)
    runner = bench._Runner(model, "infer", x, None, torch.device("cpu"), torch.float32, False)
    checks = bench.check_outputs(runner, runner)
    assert checks == {"baseline_max_diff": 0.0, "tome_max_diff": 0.0, "same_merges": 1.0, "ops_max_diff": 0.0,
                      "same_merges_as_ops": 1.0}
    # at the measured dtype PyTorch's ops are the measured path itself here (no kernels on a CPU): no difference
    assert row["ops_max_diff"] == 0.0 and row["same_merges_as_ops"] == 1.0


def test_output_check_holds_the_kernels_to_pytorchs_ops(monkeypatch, tmp_path):
    """With the matching and merge kernels standing in on the CPU (Triton's interpreter, timed as the faster) the
    measured forward runs them, and the check against PyTorch's ops sees the same merges and logits to fp32
    rounding."""
    from tome_train.tome import kernels, merge

    references = {merge.plan_layer, merge._weighted_merge}
    for path in list(kernels.FastestPath.paths):  # times that tests run before this one left
        monkeypatch.setattr(path, "seconds", {})
    for path in (merge._plan_layer, merge._merge_rows):
        monkeypatch.setattr(path, "device_types", ("cpu",))
        monkeypatch.setattr(path, "choices", {})
        monkeypatch.setattr(path, "seconds", {})
        monkeypatch.setattr(path, "broken", False)
    monkeypatch.setattr(kernels, "seconds_per_call",
        lambda fn, device, args: 2e-6 if fn in references else 1e-6)
    out = tmp_path / "bench.json"
    assert bench.main(TINY + ["--r", "2", "--mode", "infer", "--batch-size", "3", "--output", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    row, = data["results"]
    # each merging layer kept them (17 tokens, r 2: 8 layers merge), and the JSON says what they were timed at
    assert row["fused_kernels"] == {"fused_merge": "8/8", "fused_plan_layer": "8/8"}
    times = data["fused_kernel_times"]
    assert sorted(times) == ["fused_merge", "fused_plan_layer"] and len(times["fused_merge"]) == 8
    assert {(t["ops_us"], t["kernel_us"], t["dtype"]) for t in times["fused_merge"]} == {(2.0, 1.0, "float32")}
    assert [t["shape"] for t in times["fused_merge"]] == [[3 * n, 192] for n in range(17, 1, -2)]  # rows of x
    assert row["same_merges_as_ops"] == row["same_merges"] == 1.0
    assert row["ops_max_diff"] <= 1e-5 and row["tome_max_diff"] <= 1e-5


def test_same_merges_is_the_fraction_of_images_with_the_references_sizes():
    sizes = torch.tensor([[[1.0], [3.0]], [[2.0], [2.0]]])
    assert bench._same_merges(sizes, sizes.clone()) == 1.0
    assert bench._same_merges(sizes, torch.tensor([[[1.0], [3.0]], [[1.0], [3.0]]])) == 0.5
    assert bench._same_merges(sizes, sizes[:, :1]) == 0.0  # another token count
    assert bench._same_merges(None, None) == 1.0  # neither merged
    assert bench._same_merges(sizes, None) == 0.0


@pytest.mark.parametrize("timings, expected", [
    ([(1, 2.0, 1.0), (2, 1.5, 1.6), (4, 1.0, 2.0)], 2),  # merging pays off from batch 2 on
    ([(1, 0.5, 1.0), (2, 2.0, 1.0), (4, 1.0, 2.0)], 4),  # faster at 1 but not at 2: only from 4
    ([(1, 0.5, 1.0), (2, 0.5, 1.0)], 1),
    ([(1, 2.0, 1.0), (8, 2.0, 2.0)], 9),  # never faster (a tie is no gain): beyond what was measured
])
def test_choose_min_batch(timings, expected):
    assert bench.choose_min_batch(timings) == expected
    assert bench.choose_min_batch(list(reversed(timings))) == expected


def test_calibrate_min_batch_sets_what_it_measured():
    from tome_train.tome import tome_state

    model = apply_tome(bench._create("vit_tiny_patch16_224", 64, "cpu"), r=2)
    messages = []
    min_batch, rows = bench.calibrate_min_batch(model, device="cpu", max_batch=6, warmup=0, steps=1,
                                                log=messages.append)
    assert [row["batch_size"] for row in rows] == [1, 2, 4, 6]
    assert min_batch == tome_state(model).min_batch
    assert min_batch == bench.choose_min_batch([(r["batch_size"], r["merged_ms"], r["unmerged_ms"]) for r in rows])
    assert len(messages) == 1 and f"min_batch={min_batch}" in messages[0]
    with pytest.raises(bench.BenchError, match="patched"):
        bench.calibrate_min_batch(bench._create("vit_tiny_patch16_224", 64, "cpu"), device="cpu")
    with pytest.raises(bench.BenchError, match="max_batch=0 is not allowed"):
        bench.calibrate_min_batch(model, device="cpu", max_batch=0)
    with pytest.raises(bench.BenchError, match="dtype='fp8' is not allowed"):
        bench.calibrate_min_batch(model, device="cpu", dtype="fp8")
    # timed on the model's own input: one channel, float64 (it fed three channels of float32 to any model)
    gray = apply_tome(timm.create_model("vit_tiny_patch16_224", img_size=32, in_chans=1, depth=2), r=2).double()
    assert [row["batch_size"] for row in bench.calibrate_min_batch(gray, device="cpu", max_batch=2, warmup=0,
                                                                   steps=1)[1]] == [1, 2]


def test_auto_min_batch_row_says_whether_it_merged(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(TINY + ["--r", "2", "--mode", "infer", "--auto-min-batch", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "calibrating min_batch up to batch 2" in err
    said, = re.findall(r"min_batch=(\d+): ", err)
    row, = json.loads(out.read_text())["results"]
    assert row["min_batch"] == int(said) and row["merging"] == (row["min_batch"] <= 2)  # batch 2 merges from there
    # the figures of what ran: unmerged below min_batch, where they were the schedule's
    assert (row["flop_bound"] > 1) == row["merging"] and (row["tokens_out"] < row["tokens_in"]) == row["merging"]
    assert row["same_merges"] == 1.0 and row["tome_max_diff"] == 0.0


def test_sdpa_preference_sets_the_backend_order(tmp_path):
    """The order is PyTorch's to apply (a CPU keeps its fused kernel whatever the order); here: that
    the preferred backend comes first inside the context, the default order after, and the rows say it."""
    import torch
    from torch.nn.attention import SDPBackend

    default = torch._C._get_sdp_priority_order()
    with bench._sdpa_preference("cudnn"):
        order = torch._C._get_sdp_priority_order()
        assert order[0] == int(SDPBackend.CUDNN_ATTENTION) and sorted(order) == sorted(default)
    assert torch._C._get_sdp_priority_order() == default
    out = tmp_path / "b.json"
    assert bench.main(TINY + ["--r", "2", "--mode", "both", "--sdpa", "math", "--output", str(out), "--quiet"]) == 0
    assert [row["sdpa"] for row in json.loads(out.read_text())["results"]] == ["math", "math"]


def test_variant_probe_swaps_the_candidates_in_for_one_run_each(load_script, tmp_path):
    """scripts/variant_probe.py: the bench once per variant, each run with the variant's functions standing
    in for the library's and the library restored after (on the CPU every variant runs PyTorch's ops)."""
    from tome_train.tome import attention, kernels, merge, timm_patch

    probe = load_script("variant_probe")

    def library_paths():
        return (merge._most_similar, merge._merge_rows, merge._merge_rows_backward, attention._size_biased_attention,
                attention._trained_size_biased_attention, merge._plan_merge, merge._size_weights, merge._plan_layer,
                merge._merge_norm_rows.broken)

    library = library_paths()
    assert library[8] is False
    with probe.swapped("no_fused_merge"):
        assert library_paths() == (library[0], merge._weighted_merge, merge._weighted_merge_backward, *library[3:8],
                                   True)
    with probe.swapped("no_fused_merge_norm"):
        assert library_paths() == (*library[:8], True)
    with probe.swapped("no_plan_beside"):
        assert timm_patch._merging_first_half.broken and library_paths() == library
    assert not timm_patch._merging_first_half.broken
    library_rule = timm_patch.plans_beside_attention
    with probe.swapped("plan_beside_in_graphs"):
        assert timm_patch.plans_beside_attention is probe.plans_beside_attention_in_graphs
        assert library_paths() == library
    assert timm_patch.plans_beside_attention is library_rule
    with probe.swapped("no_triton_attention"):
        assert library_paths() == (*library[:3], attention._masked_attention, attention._packed_masked_attention,
                                   *library[5:])
    with probe.swapped("no_fused_plan"):
        assert library_paths() == (*library[:5], merge.plan_merge, merge.size_weights, merge.plan_layer, False)
    with probe.swapped("no_fused_layer"):
        assert library_paths() == (*library[:7], merge.plan_layer, False)
    with probe.swapped("torch_ops_only"):
        assert kernels.FastestPath.enabled is False
    assert library_paths() == library and kernels.FastestPath.enabled

    out = tmp_path / "variants.json"
    variants = list(probe.SWAPS)
    probe.main(["--device", "cpu", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--r", "2",
                "--infer-batch-size", "2", "--train-batch-size", "2", "--warmup", "0", "--steps", "1",
                "--variants", *variants, "--output", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(row["variant"], row["mode"]) for row in rows] == [(v, m) for v in variants for m in ("infer", "train")]
    for row in rows:
        assert row["ratio"] > 0 and row["tome_ims"] > 0, row
        if row["mode"] == "infer":  # the candidate's forward against its own eager fp32 forward
            assert row["same_merges"] == 1.0 and row["tome_max_diff"] <= 1e-5
    assert library_paths() == library

    # --cuda-graphs reaches the bench, which refuses it without a GPU: said in each variant's row
    probe.main(["--device", "cpu", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--r", "2", "--mode", "infer",
                "--variants", "plan_beside_in_graphs", "--cuda-graphs", "--output", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["variant"] == "plan_beside_in_graphs" and row["error"] == "cuda_graphs needs a CUDA device, not cpu", row


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_replay_the_whole_step_on_each_side():
    """--cuda-graphs: each side's step is captured once and replayed; a replayed training step still
    updates the weights, and the rows say so."""
    import copy

    base = bench._create("vit_tiny_patch16_224", 64, "cuda")
    tome = apply_tome(copy.deepcopy(base), 2)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    target = torch.randint(0, 10, (4,), device="cuda")
    for model in (base, tome):
        runner = bench._Runner(model, "train", x, target, torch.device("cuda"), torch.bfloat16, None, cuda_graph=True)
        runner.first_step()
        assert runner.graph is not None
        weight = model.head.weight.detach().clone()
        runner.step()
        assert not torch.equal(model.head.weight, weight)
    rows = bench.run_benchmark([("vit_tiny_patch16_224", 2)], device="cuda", dtype="bf16", batch_size=4, img_size=64,
                               warmup=1, steps=2, cuda_graphs=True)
    assert [row["mode"] for row in rows] == ["infer", "train"]
    assert all(row["cuda_graphs"] and row["ratio"] > 0 for row in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_replay_compiled_regions_and_the_eager_merges_between_them():
    """--cuda-graphs --compile --compile-scope regions: the ToMe side's compiled halves of each block and the eager
    merges between them are captured in one graph per step, compiled during the warm-up, never again."""
    rows = bench.run_benchmark([("vit_tiny_patch16_224", 2)], device="cuda", dtype="bf16", batch_size=4, img_size=64,
                               warmup=1, steps=2, compile=True, compile_scope="regions", cuda_graphs=True)
    assert [row["mode"] for row in rows] == ["infer", "train"]
    assert all(row["cuda_graphs"] and row["compile_scope"] == "regions" and row["recompiles"] == 0 for row in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_reduce_overhead_records_the_whole_patched_model():
    """torch.compile(model, mode="reduce-overhead"), as trainer.compile=reduce-overhead runs it: CUDA graph trees
    record the patched model's forward and backward (nothing the ops it calls cache is left in the graphs' memory
    pool), inference and training, without recompiling."""
    rows = bench.run_benchmark([("vit_tiny_patch16_224", 2)], device="cuda", dtype="bf16", batch_size=4, img_size=64,
                               warmup=2, steps=2, compile="reduce-overhead")
    assert [row["mode"] for row in rows] == ["infer", "train"]
    assert all(row["recompiles"] == 0 and row["ratio"] > 0 for row in rows)


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def gpu_script() -> str:
    """scripts/bench_gpu.sh with its continuation lines joined."""
    return (SCRIPTS / "bench_gpu.sh").read_text().replace("\\\n", " ")


def gpu_script_words(args: str) -> list[str]:
    """A command line of scripts/bench_gpu.sh as the shell passes it on, its model arrays (``"${B[@]}"``) expanded."""
    arrays = {name: shlex.split(body) for name, body in re.findall(r"^(\w+)=\((.*)\)$", gpu_script(), re.M)}
    words = []
    for word in shlex.split(args):
        array = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
        words += arrays[array.group(1)] if array else [word]
    return words


def gpu_script_steps() -> dict[str, list[str]]:
    """Each ``step NAME ARGS...`` of scripts/bench_gpu.sh: the benchmark command lines a GPU run will make."""
    return {name: words for name, *words in map(gpu_script_words, re.findall(r"^step (.*)$", gpu_script(), re.M))}


class _SettingsAccepted(Exception):
    pass


@pytest.mark.parametrize("name", sorted(gpu_script_steps()))
def test_every_gpu_script_step_passes_the_benchmarks_checks(name, monkeypatch):
    """A GPU run is short and rare: every step of scripts/bench_gpu.sh must get past the benchmark's checks of its
    options (as on a CUDA device) and reach the measurement, which is stopped there."""
    monkeypatch.setattr(bench, "resolve_device", lambda device: torch.device(device))

    def stop(*args, **kwargs):
        raise _SettingsAccepted

    monkeypatch.setattr(bench, "build_pair", stop)
    with pytest.raises(_SettingsAccepted):
        bench.main(["--device", "cuda", "--quiet"] + gpu_script_steps()[name])


def gpu_script_probes() -> dict[str, tuple[str, list[str]]]:
    """Each probe a step of scripts/bench_gpu.sh runs (``run_step NAME LIMIT python3 scripts/PROBE.py ARGS``):
    the probe's name and its arguments."""
    return {name: (probe, gpu_script_words(args))
            for name, probe, args in re.findall(r"run_step (\w+) \d+ python3 scripts/(\w+)\.py (.*?)(?: && gather)?$",
                                                gpu_script(), re.M)}


@pytest.mark.parametrize("name", sorted(gpu_script_probes()))
def test_every_gpu_script_probe_call_parses(name, load_script, monkeypatch):
    """Each probe's arguments in scripts/bench_gpu.sh are ones the probe takes: its parser accepts them all (an
    unknown option or a bad value would exit 2 there), and the probe is stopped right after."""
    parse_args = argparse.ArgumentParser.parse_args

    def parsed(parser, args=None, namespace=None):
        raise _SettingsAccepted(parse_args(parser, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parsed)
    probe, args = gpu_script_probes()[name]
    with pytest.raises(_SettingsAccepted):
        load_script(probe).main(args)


def test_the_gpu_scripts_profile_step_is_valid_python():
    source, = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", gpu_script(), re.S)
    compile(source, "bench_gpu.sh profile step", "exec")


def test_train_py_bench_is_named_as_called(capsys):
    """``train.py bench --help`` showed the usage of ``python -m tome_train.bench``, a command the user had not typed."""
    from tome_train.cli import main

    assert main(["bench", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: train.py bench [-h]")
