"""Issue 7's speed targets, met or not, from what the benchmark wrote: for each run, the rows that measure a
target and whether they meet it; then, for each target, the latest run that measured it; and with ``--plot`` each
target's ratio over the runs, against its threshold.

    python scripts/speed_targets.py docs/gpu-runs/*/results.json docs/gpu-runs/*/*/results.json \
        docs/cpu-runs/*/*.json --markdown docs/targets.md --plot docs/targets.png

A file is either one ``python -m tome_train.bench --output`` file or ``scripts/bench_gpu.sh``'s ``results.json``
(that file per step). A run is one file, named by its folder and dated by its first row's machine; within a run
a target takes its best row (eager or under whole-step CUDA graphs: both sides are measured the same way in a
row). Files or steps without benchmark rows (the probes) are passed over.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Target:
    """One line of the issue's target list: the rows that measure it, and what they must reach."""

    name: str
    model: str
    r: str
    mode: str
    batch_size: int
    dtype: str
    device: str
    min_ratio: float | None = None  # ToMe's throughput over timm's, at least
    min_of_bound: float | None = None  # the ratio over the schedule's FLOP bound, at least
    compiled: bool = False  # torch.compile on both sides: also no recompiles and compile time at most MAX_FIRST_RATIO

    def measures(self, row: dict) -> bool:
        return (row.get("model") == self.model and str(row.get("r")) == self.r and row.get("mode") == self.mode
                and row.get("batch_size") == self.batch_size and row.get("dtype") == self.dtype
                and row.get("img_size") == 224
                and str(row.get("device", "")).split(":")[0] == self.device
                and row.get("prop_attn") is True and row.get("runtime", "torch") == "torch"
                and bool(row.get("compile")) == self.compiled)

    @property
    def needs(self) -> str:
        parts = [f">= {self.min_ratio:.2f}x" if self.min_ratio is not None
                 else f">= {self.min_of_bound:.0%} of the bound"]
        if self.compiled:
            parts.append(f"compile <= {MAX_FIRST_RATIO}x, 0 recompiles")
        return ", ".join(parts)

    def met(self, row: dict) -> bool:
        # the tables print ratios to two decimals: a batch-1 row at 1.00x (merging off: the same ops on both sides)
        # is not slower
        ok = (round(row["ratio"], 2) >= self.min_ratio if self.min_ratio is not None
              else row["ratio_of_bound"] >= self.min_of_bound)
        if self.compiled:
            ok = ok and row.get("recompiles") == 0 and row.get("first_ratio", float("inf")) <= MAX_FIRST_RATIO
        return ok

    def value(self, row: dict) -> float:
        return row["ratio"] if self.min_ratio is not None else row["ratio_of_bound"]


MAX_FIRST_RATIO = 1.5
S, B, L = ("vit_small_patch16_224", "13"), ("vit_base_patch16_224", "16"), ("vit_large_patch16_224", "8")
TARGETS = (
    Target("ViT-B/16 r16 inference, fp16, batch 256", *B, "infer", 256, "fp16", "cuda", min_ratio=1.8),
    Target("ViT-L/16 r8 inference, fp16, batch 256", *L, "infer", 256, "fp16", "cuda", min_ratio=1.8),
    Target("ViT-B/16 r16 training, bf16, batch 128", *B, "train", 128, "bf16", "cuda", min_ratio=1.7),
    Target("ViT-L/16 r8 training, bf16, batch 64", *L, "train", 64, "bf16", "cuda", min_ratio=1.7),
    Target("compiled ViT-B/16 r16 inference", *B, "infer", 256, "fp16", "cuda", min_ratio=1.8, compiled=True),
    Target("compiled ViT-L/16 r8 inference", *L, "infer", 256, "fp16", "cuda", min_ratio=1.8, compiled=True),
    Target("compiled ViT-B/16 r16 training", *B, "train", 128, "bf16", "cuda", min_ratio=1.7, compiled=True),
    Target("compiled ViT-L/16 r8 training", *L, "train", 64, "bf16", "cuda", min_ratio=1.7, compiled=True),
    Target("ViT-B/16 r16 batch-1 latency, fp16", *B, "infer", 1, "fp16", "cuda", min_ratio=1.0),
    Target("CPU ViT-S/16 r13 inference, fp32, batch 32", *S, "infer", 32, "fp32", "cpu", min_of_bound=0.95),
    Target("CPU ViT-B/16 r16 inference, fp32, batch 32", *B, "infer", 32, "fp32", "cpu", min_of_bound=0.95),
    Target("CPU ViT-S/16 r13 training, fp32, batch 32", *S, "train", 32, "fp32", "cpu", min_of_bound=0.95),
    Target("CPU ViT-B/16 r16 training, fp32, batch 32", *B, "train", 32, "fp32", "cpu", min_of_bound=0.95),
)


@dataclass
class Run:
    """One benchmark file: its name, date and rows (each row carries its ``step``)."""

    name: str
    date: str
    rows: list[dict]


def read_run(path: Path, name: str) -> Run | None:
    """The benchmark rows of ``path`` (one bench output, or a ``results.json`` of steps); ``None`` if it has none."""
    data = json.loads(path.read_text())
    outputs = {"": data} if "results" in data else {step: out for step, out in data.items() if isinstance(out, dict)}
    rows, dates = [], []
    for step, out in outputs.items():
        bench_rows = [row for row in out.get("results", []) if isinstance(row, dict) and "ratio" in row]
        threads = out.get("machine", {}).get("torch_threads")
        rows += [{**row, "step": step, "threads": threads} for row in bench_rows]
        if bench_rows and "date" in out.get("machine", {}):
            dates.append(out["machine"]["date"])
    return Run(name, min(dates, default=""), rows) if rows else None


def run_names(paths: list[Path]) -> list[str]:
    """Each file's folder below the folders all share (``2026-11-27-h100-device-time/run-f2``), or its own name
    where all are in one; a file named other than ``results.json`` adds its stem."""
    parents = [p.resolve().parent for p in paths]
    common = Path(os.path.commonpath(parents))
    names = []
    for path, parent in zip(paths, parents):
        name = parent.relative_to(common).as_posix() if parent != common else parent.name
        names.append(name if path.name == "results.json" else f"{name}/{path.stem}")
    return names


def setting(row: dict) -> str:
    compiled = row.get("compile")
    parts = [f"compiled ({compiled}, {row.get('compile_scope') or 'model'})" if compiled else "uncompiled"]
    if row.get("cuda_graphs"):
        parts.append("each step one CUDA graph")
    if str(row.get("device")) == "cpu":
        threads = row.get("threads")
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}, "
                     f"{'process CPU time' if row.get('timer') == 'cpu' else 'wall clock'}")
    parts.append(f"{row.get('stat', 'median')} of {row.get('steps')} steps")
    if row.get("merging") is False:
        parts.append(f"merging off (min_batch {row.get('min_batch')})")
    return ", ".join(parts)


def best_row(target: Target, run: Run) -> dict | None:
    rows = [row for row in run.rows if target.measures(row)]
    return max(rows, key=lambda row: (target.met(row), target.value(row))) if rows else None


def verdicts(runs: list[Run]) -> list[dict]:
    """For each run and target it measures: its best row's figures and whether it meets the target."""
    out = []
    for run in runs:
        for target in TARGETS:
            row = best_row(target, run)
            if row is not None:
                out.append({"run": run.name, "date": run.date, "target": target.name, "needs": target.needs,
                            "step": row["step"], "setting": setting(row), "value": target.value(row),
                            "ratio": row["ratio"], "first_ratio": row.get("first_ratio"),
                            "recompiles": row.get("recompiles"), "met": target.met(row)})
    return out


def _figure(verdict: dict, target: Target) -> str:
    text = f"{verdict['ratio']:.2f}x" if target.min_ratio is not None else f"{verdict['value']:.0%} of the bound"
    if target.compiled:
        text += f", compile {verdict['first_ratio']:.2f}x, {verdict['recompiles']} recompiles"
    return text


def _where(verdict: dict) -> str:
    return f"{verdict['run']} ({verdict['step']})" if verdict["step"] else verdict["run"]


def markdown(runs: list[Run]) -> str:
    """The latest verdict per target (unmeasured ones named too), then every run's."""
    rows = verdicts(runs)
    by_name = {t.name: t for t in TARGETS}
    lines = ["| target | needs | latest run | setting | measured | met |", "|---|---|---|---|---|---|"]
    for target in TARGETS:
        measured = [v for v in rows if v["target"] == target.name]
        if not measured:
            lines.append(f"| {target.name} | {target.needs} | not measured | | | |")
            continue
        v = max(measured, key=lambda v: v["date"])
        lines.append(f"| {target.name} | {target.needs} | {_where(v)} | {v['setting']} | "
                     f"{_figure(v, target)} | {'**met**' if v['met'] else 'not met'} |")
    lines += ["", "Every run, oldest first:", "", "| run | target | step | setting | measured | met |",
              "|---|---|---|---|---|---|"]
    for v in sorted(rows, key=lambda v: v["date"]):
        lines.append(f"| {v['run']} | {v['target']} | {v['step'] or '-'} | {v['setting']} | "
                     f"{_figure(v, by_name[v['target']])} | {'yes' if v['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], path: Path) -> None:
    """Each GPU ratio target over the runs that measured it (inference and training side by side), its threshold
    dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on_gpu = {t.name for t in TARGETS if t.device == "cuda"}
    rows = [v for v in verdicts(sorted(runs, key=lambda run: run.date)) if v["target"] in on_gpu]
    names = list(dict.fromkeys(v["run"] for v in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, mode in zip(axes, ("infer", "train")):
        shown = [t for t in TARGETS if t.mode == mode and t.device == "cuda" and t.batch_size > 1]
        for target in shown:
            points = [(names.index(v["run"]), v["ratio"]) for v in rows if v["target"] == target.name]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", linestyle="--" if target.compiled else "-", label=target.name)
        for threshold in sorted({t.min_ratio for t in shown}):
            ax.axhline(threshold, color="black", linestyle=":", linewidth=1, label=f"target {threshold}x")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_title("inference" if mode == "infer" else "training")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("ToMe / timm throughput")
        ax.legend(fontsize=7)
    fig.suptitle("Issue 7 on the GPU: ToMe's speed-up over timm, run by run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="benchmark JSON files, one per run")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--plot", type=Path, help="draw each GPU target's ratio over the runs into this PNG")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = []
    for path, name in zip(args.files, run_names(args.files)):
        try:
            run = read_run(path, name)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            print(f"error: {path} is not a benchmark's JSON ({type(err).__name__})", file=sys.stderr)
            return 2
        if run is not None:
            runs.append(run)
    if not runs:
        print(f"error: no benchmark rows in {', '.join(map(str, args.files))}", file=sys.stderr)
        return 2
    table = markdown(runs)
    print(table, end="")
    if args.markdown:
        args.markdown.write_text(table)
    if args.plot:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
