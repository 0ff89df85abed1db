"""Input-pipeline benchmark: training images/s per CPU core, ours against timm's own loader.

Generates a few hundred JPEGs (~400x350, smooth random content) under a scratch directory, writes
them as an ImageFolder tree and as shards in the public layout, and times the training loaders with
the DeiT recipes' augmentation and image size as ``recipes/deit_small_r13.yaml`` resolves them (random resized crops,
flips, RandAugment, random erasing; 224x224):

* tome-train webdataset, tome-train webdataset with repeated augmentation x3 (one decode per 3 samples),
* tome-train imagefolder,
* timm: ``timm.data.create_dataset`` + ``create_loader`` (no prefetcher: the CPU path), same transforms.

Each loader runs with no worker processes (one core) and with one worker per core.

    python -m tome_train.data.bench [--images 400] [--measure 1200] [--batch-size 32] [--markdown]
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ..arguments import OneLineArgumentParser, integer_at_least

def deit_augmentation() -> tuple[dict, int]:
    """The recipes' ImageNet training augmentation and DeiT's image size, as the DeiT-S recipe resolves them."""
    from omegaconf import OmegaConf

    from ..config import load_config

    cfg = load_config("deit_small_r13")
    data = OmegaConf.to_container(cfg.data)
    return {k: data[k] for k in ("scale", "ratio", "hflip", "color_jitter", "auto_augment", "interpolation",
                                 "re_prob", "re_mode", "re_count", "crop_pct", "mean", "std")}, cfg.model.img_size


CLASSES = 10


def make_jpegs(root: Path, images: int, classes: int = CLASSES, size=(400, 350), seed: int = 0) -> None:
    """``root/{train,val}/cNN/*.jpg``: smooth random pictures (JPEG sizes like photos, not like noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", max(classes, images // 10))):
        for i in range(n):
            label = i % classes
            folder = root / split / f"c{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize(size, Image.BICUBIC)
            noisy = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{split}_{i:05d}.jpg", quality=90)


def measure(make_loader: Callable[[], Iterable], measure_images: int, warmup_batches: int = 2) -> float:
    """Images/s after ``warmup_batches`` (worker start-up excluded); re-iterates the loader as needed."""
    loader = make_loader()
    it, seen, start = iter(loader), 0, None
    warm = 0
    while seen < measure_images:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        if warm < warmup_batches:
            warm += 1
            if warm == warmup_batches:
                start = time.perf_counter()
            continue
        seen += len(batch[1])
    return seen / (time.perf_counter() - start)


def run(workdir: Path, images: int, measure_images: int, batch_size: int, cores: int, repeats: int = 3
        ) -> list[dict]:
    """One row per (pipeline, workers): the best of ``repeats`` interleaved measurements."""
    import torch
    from omegaconf import OmegaConf

    from ..config import DataConfig
    from .common import fix_posterize
    from .datamodule import ImageDataModule
    from .shards import write_imagefolder_shards

    torch.set_num_threads(1)
    tree, shard_dir = workdir / "imagefolder", workdir / "shards"
    if not (tree / "train").is_dir():
        make_jpegs(tree, images)
    written = write_imagefolder_shards(str(tree), str(shard_dir), train_per_shard=max(1, images // 8),
                                       val_per_shard=images)
    pattern, val_pattern = written["train"]["pattern"], written["val"]["pattern"]
    aug, img_size = deit_augmentation()

    def ours(source: str, workers: int, repeated_aug: int = 1):
        cfg = OmegaConf.structured(DataConfig)
        cfg.merge_with(dict(aug, source=source, root=str(tree if source == "imagefolder" else shard_dir),
                            batch_size=batch_size, num_workers=workers, repeated_aug=repeated_aug,
                            train_shards=pattern, val_shards=val_pattern,
                            train_samples=10**6, val_samples=written["val"]["samples"]))  # one long epoch: no restart
        return lambda: ImageDataModule(cfg, img_size, seed=0).train_dataloader()

    def timm_loader(workers: int):
        from timm.data import create_dataset, create_loader

        def make():
            dataset = create_dataset("", root=str(tree / "train"), is_training=True)
            a = aug
            loader = create_loader(
                dataset, input_size=(3, img_size, img_size), batch_size=batch_size, is_training=True,
                use_prefetcher=False, scale=tuple(a["scale"]), ratio=tuple(a["ratio"]), hflip=a["hflip"],
                color_jitter=a["color_jitter"], auto_augment=a["auto_augment"], interpolation=a["interpolation"],
                re_prob=a["re_prob"], re_mode=a["re_mode"], re_count=a["re_count"], mean=tuple(a["mean"]),
                std=tuple(a["std"]), num_workers=workers, distributed=False, persistent_workers=workers > 0,
                device=torch.device("cpu"),
            )
            fix_posterize(loader.dataset.transform)  # timm + Pillow 13 crash otherwise (see common.py)
            return loader

        return make

    pipelines = []
    for workers in (0, cores):
        pipelines += [
            ("tome-train webdataset", workers, ours("webdataset", workers)),
            ("tome-train webdataset, RA x3", workers, ours("webdataset", workers, 3)),
            ("tome-train imagefolder", workers, ours("imagefolder", workers)),
            ("timm create_dataset + create_loader", workers, timm_loader(workers)),
        ]
    results: dict[tuple[str, int], list[float]] = {}
    for round_ in range(repeats):  # interleaved rounds: background load hits every pipeline alike
        for name, workers, make in pipelines:
            ims = measure(make, measure_images)
            results.setdefault((name, workers), []).append(ims)
            print(f"  round {round_ + 1}: {name:38s} workers={workers}  {ims:7.1f} im/s", flush=True)
    rows = []
    for (name, workers), values in results.items():
        used = max(1, workers)
        best = max(values)
        rows.append({"pipeline": name, "workers": workers, "cores": used, "images_per_s": best,
                     "per_core": best / used, "all": values})
    return rows


def table(rows: list[dict], markdown: bool) -> str:
    head = ["pipeline", "workers", "cores", "im/s", "im/s per core"]
    body = [[r["pipeline"], str(r["workers"]), str(r["cores"]), f"{r['images_per_s']:.1f}", f"{r['per_core']:.1f}"]
            for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*b) for b in body])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineArgumentParser(prog="python -m tome_train.data.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/tome_train_data_bench", help="scratch directory (reused)")
    parser.add_argument("--images", type=integer_at_least(CLASSES), default=400,
                        help=f"training JPEGs to generate (one per class at least: {CLASSES} classes)")
    parser.add_argument("--measure", type=integer_at_least(1), default=1200, help="images timed per pipeline")
    parser.add_argument("--batch-size", type=integer_at_least(1), default=32)
    parser.add_argument("--workers", type=integer_at_least(1), default=len(os.sched_getaffinity(0)),
                        help="workers in the multi-core run")
    parser.add_argument("--repeats", type=integer_at_least(1), default=3,
                        help="interleaved rounds; the table shows the best")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    scratch = Path(args.dir)
    if scratch.exists() and not scratch.is_dir():
        parser.exit(2, f"error: --dir {scratch}: not a directory\n")
    try:
        scratch.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.exit(2, f"error: --dir {scratch}: cannot make it ({e.strerror})\n")
    from ..bench import cpu_name

    print(f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} cores usable; python {platform.python_version()}; "
          f"batch {args.batch_size}, {args.measure} images timed per run, best of {args.repeats}")
    rows = run(scratch, args.images, args.measure, args.batch_size, args.workers, args.repeats)
    print(table(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
