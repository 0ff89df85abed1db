"""After training: what did merging buy? Accuracy and throughput over a sweep of ``r``.

Writes ``tradeoff.csv``, ``tradeoff.png`` (top-1 against speedup, with the paper's points
of the recipe) and ``merge_vis.png`` (which patches each final token holds) into the run
directory, and logs the same to wandb as a Table, a line plot and images at the run's step.
``tradeoff.json`` holds the table with what it was measured on, for ``export`` to match to
the weights it exports.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from .tome import flop_bound, max_merges, tome_state, vit_flops

COLUMNS = ["r", "tokens_final", "gflops", "flop_bound", "top1", "top5", "images_per_s", "speedup"]


def sweep_values(cfg: DictConfig, num_tokens: int, num_protected: int, train_r) -> list[int]:
    """``tradeoff.r_values``, or ``num_points`` values from 0 to the largest r the model takes; with r=0, which every
    speedup and FLOP bound is over, and the trained r (where one number), the run's own row."""
    if cfg.tradeoff.r_values is not None:
        values = set(cfg.tradeoff.r_values)
    else:
        r_max = max_merges(num_tokens, num_protected)
        values = {int(round(v)) for v in np.linspace(0, r_max, cfg.tradeoff.num_points)}
    values.add(0)
    if isinstance(train_r, int):
        values.add(train_r)
    return sorted(values)


@torch.inference_mode()
def images_per_s(
    model: torch.nn.Module, images: torch.Tensor, set_r: Callable[[int], object], values: Sequence[int], steps: int,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[int, float]:
    """Inference throughput of ``model`` on one batch at each r of ``values``: one warm-up pass at each, then
    ``steps`` rounds that run every r once, in alternating order, and the median step of each r. Interleaved, a
    machine's drift (a neighbour's load, clocks) falls on every r alike instead of on the ones timed last. Every pass
    runs in ``forward_context()`` (the run's precision: Lightning's ``precision_plugin.forward_context``)."""
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    step_seconds: dict[int, list[float]] = {r: [] for r in values}
    with forward_context():
        for r in values:
            set_r(r)
            model(images)
        for step in range(steps):
            for r in values if step % 2 == 0 else reversed(values):
                set_r(r)
                sync()
                start = time.perf_counter()
                model(images)
                sync()
                step_seconds[r].append(time.perf_counter() - start)
    return {r: images.shape[0] / statistics.median(seconds) for r, seconds in step_seconds.items()}


def _validate_at(trainer, module, datamodule, r) -> dict:
    module.eval_r = r
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return {"top1": metrics["val/top1"], "top5": metrics["val/top5"]}


def measure_tradeoff(trainer, module, datamodule) -> list[dict]:
    """Top-1/top-5 on the validation set and images/s at every r of the sweep (every rank
    validates its share; throughput is measured where it runs)."""
    cfg = module.cfg
    dims = module.dims
    values = sweep_values(cfg, dims.num_tokens, dims.num_protected, module.train_r)
    saved = trainer.loggers, trainer.limit_val_batches, module.eval_r
    trainer.loggers = []  # the sweep must not rewrite the run's val/top1 history
    bar = trainer.progress_bar_callback
    if bar is not None:
        bar.disable()
    if cfg.tradeoff.limit_val_batches is not None:
        trainer.limit_val_batches = cfg.tradeoff.limit_val_batches
    precision = trainer.precision_plugin  # the dtype and autocast the model was trained in
    images = precision.convert_input(
        torch.randn(cfg.tradeoff.batch_size, 3, cfg.model.img_size, cfg.model.img_size, device=module.device))
    rows = []
    try:
        for r in values:
            row = {"r": r, **_validate_at(trainer, module, datamodule, r)}
            schedule = module.set_schedule(r)
            row["tokens_final"] = dims.tokens_per_layer(schedule)[-1]
            row["gflops"] = vit_flops(dims, schedule) / 1e9
            row["flop_bound"] = flop_bound(dims, schedule)
            rows.append(row)
        module.model.eval()
        measured = images_per_s(module.model, images, module.set_schedule, values, cfg.tradeoff.bench_steps,
                                precision.forward_context)
    finally:
        trainer.loggers, trainer.limit_val_batches, module.eval_r = saved
        module.set_schedule(module.train_r)
        if bar is not None:
            bar.enable()
    for row in rows:
        row["images_per_s"] = measured[row["r"]]
    base = next(row["images_per_s"] for row in rows if row["r"] == 0)
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
    return [{k: row[k] for k in COLUMNS} for row in rows]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_record(rows: list[dict], global_step: int, path: Path) -> None:
    """``tradeoff.json``: the table and the weights it was measured on, the run's raw weights (the sweep validates and
    times the module's model, not its EMA copy) at ``global_step``. ``export`` carries the table only with those
    weights; ``tradeoff.csv`` is the same table for people, with nothing but the table in it."""
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(json.dumps({"global_step": global_step, "weights": "raw", "rows": rows}, indent=2))
    os.replace(partial, path)  # a kill while writing leaves the earlier record whole, not half of this one


def format_table(rows: list[dict], train_r=None) -> str:
    """The sweep as a text table, the row of the trained r (an int ``train_r``) marked."""
    head = f"{'r':>12} {'tokens':>6} {'GFLOPs':>8} {'bound':>6} {'top-1':>6} {'top-5':>6} {'im/s':>9} {'speedup':>7}"
    lines = [head]
    for row in rows:
        label = f"{row['r']} (trained)" if row["r"] == train_r else str(row["r"])
        lines.append(
            f"{label:>12} {row['tokens_final']:>6} {row['gflops']:>8.3f} {row['flop_bound']:>5.2f}x "
            f"{row['top1']:>6.2f} {row['top5']:>6.2f} {row['images_per_s']:>9.1f} {row['speedup']:>6.2f}x"
        )
    return "\n".join(lines)


def plot_tradeoff(rows: list[dict], reference: DictConfig, title: str, path: Path, train_r=None) -> None:
    """Top-1 against speed-up, one point per r of the sweep, the run's trained r (an int ``train_r``) starred, the
    paper's pair of points beside them where the recipe quotes them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["speedup"] for r in rows], [r["top1"] for r in rows], "o-", label="this run")
    for row in rows:
        ax.annotate(f"r={row['r']}", (row["speedup"], row["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if row["r"] == train_r:
            ax.plot(row["speedup"], row["top1"], "*", color="C3", markersize=14, label=f"trained at r={train_r}")
    if reference.baseline_top1 is not None and reference.tome_top1 is not None:
        ax.plot([1.0, reference.tome_ims / reference.baseline_ims], [reference.baseline_top1, reference.tome_top1],
                "s--", color="gray", label=f"paper ({reference.source})")
    ax.set_xlabel("speedup over r=0 (images/s ratio)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def merge_visualization(
    model, images: torch.Tensor, mean, std, forward_context: Callable[[], AbstractContextManager] = nullcontext
) -> np.ndarray:
    """Pairs of (input, merged) pictures as one ``uint8`` ``[H, W, 3]`` image.

    Every final token paints the input patches it holds with their average colour, with a
    dark line where neighbouring patches belong to different tokens (the paper's Fig. 4). The
    forward runs in ``forward_context()`` (the run's precision, as in :func:`images_per_s`).
    """
    state = tome_state(model)
    state.trace_source = True
    try:
        with torch.no_grad(), forward_context():
            model(images)
        source = state.source
    finally:
        state.trace_source = False
    p = model.num_prefix_tokens
    grid_h, grid_w = model.patch_embed.grid_size
    ph, pw = images.shape[-2] // grid_h, images.shape[-1] // grid_w
    pixels = images.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    pixels = pixels.clamp(0, 1)
    panels = []
    for b in range(images.shape[0]):
        if source is None:
            owner = torch.arange(grid_h * grid_w)
        else:
            owner = source[b, :, p:].float().cpu().argmax(dim=0)
        owner = owner.reshape(grid_h, grid_w)
        patch_mean = pixels[b].reshape(3, grid_h, ph, grid_w, pw).mean(dim=(2, 4))  # [3, gh, gw]
        painted = torch.zeros(3, grid_h, grid_w)
        for token in owner.unique():
            members = owner == token
            painted[:, members] = patch_mean[:, members].mean(dim=1, keepdim=True)
        painted = painted.repeat_interleave(ph, 1).repeat_interleave(pw, 2)
        owner_px = owner.repeat_interleave(ph, 0).repeat_interleave(pw, 1)
        edge = torch.zeros_like(owner_px, dtype=torch.bool)
        edge[1:, :] |= owner_px[1:, :] != owner_px[:-1, :]
        edge[:, 1:] |= owner_px[:, 1:] != owner_px[:, :-1]
        painted[:, edge] *= 0.3
        panels.append(torch.cat([pixels[b], torch.ones(3, pixels.shape[2], 2), painted], dim=2))
    sheet = torch.cat([torch.cat([panel, torch.ones(3, 2, panel.shape[2])], dim=1) for panel in panels], dim=1)
    scale = max(1, 128 // images.shape[-1])  # small inputs (digits) are enlarged to be seen
    sheet = sheet.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return (sheet.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def trained_summary(rows: list[dict], train_r) -> dict[str, float]:
    """What the run bought at its trained r against r=0, as scalars that wandb's table of runs shows and sorts by:
    ``tradeoff/speedup``, ``tradeoff/flop_bound``, ``tradeoff/top1`` and ``tradeoff/top1_change`` (points). Empty
    unless the sweep holds both (a schedule other than one r per layer is not swept)."""
    by_r = {row["r"]: row for row in rows}
    if not isinstance(train_r, int) or train_r not in by_r or 0 not in by_r:
        return {}
    trained = by_r[train_r]
    return {"tradeoff/speedup": trained["speedup"], "tradeoff/flop_bound": trained["flop_bound"],
            "tradeoff/top1": trained["top1"], "tradeoff/top1_change": trained["top1"] - by_r[0]["top1"]}


def report_tradeoff(trainer, module, datamodule, run_dir: Path) -> list[dict]:
    """Measure the sweep, then on rank 0 print it, write the files and log them to wandb."""
    if trainer.is_global_zero:
        print("measuring the accuracy/throughput trade-off ...")
    rows = measure_tradeoff(trainer, module, datamodule)
    if not trainer.is_global_zero:
        return rows
    cfg = module.cfg
    write_csv(rows, run_dir / "tradeoff.csv")
    write_record(rows, trainer.global_step, run_dir / "tradeoff.json")
    plot_tradeoff(rows, cfg.reference, f"{cfg.name}: ToMe trade-off", run_dir / "tradeoff.png", module.train_r)
    precision = trainer.precision_plugin
    readable = next(batch for batch in datamodule.val_dataloader() if batch is not None)  # imagefolder's may not be
    images = readable[0][: cfg.tradeoff.num_vis_images].to(module.device)
    module.set_schedule(module.eval_r)
    module.model.eval()
    vis = merge_visualization(module.model, precision.convert_input(images), list(cfg.data.mean), list(cfg.data.std),
                              precision.forward_context)
    module.set_schedule(module.train_r)
    from PIL import Image

    Image.fromarray(vis).save(run_dir / "merge_vis.png")
    print("accuracy/throughput trade-off (r swept at evaluation):")
    print(format_table(rows, module.train_r))
    files = ("tradeoff.csv", "tradeoff.json", "tradeoff.png", "merge_vis.png")
    print(f"files: {', '.join(str(run_dir / name) for name in files)}")
    logger = trainer.logger
    if logger is not None and hasattr(logger, "experiment"):
        import wandb

        table = wandb.Table(columns=COLUMNS, data=[[row[c] for c in COLUMNS] for row in rows])
        # at the step of the weights measured: without one, wandb's step metric (trainer/global_step) is the last that
        # this process logged, none in a re-run of a finished run, which then logged at step 0
        logger.log_metrics({
            "tradeoff/table": table,
            "tradeoff/top1_vs_images_per_s": wandb.plot.line(table, "images_per_s", "top1", title="top-1 vs images/s"),
            "tradeoff/plot": wandb.Image(str(run_dir / "tradeoff.png")),
            "tradeoff/merge_vis": wandb.Image(vis, caption=f"r={module.eval_r}: input | merged tokens"),
        }, step=trainer.global_step)
        logger.experiment.summary.update(trained_summary(rows, module.train_r))
    return rows
