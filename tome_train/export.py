"""Export a trained run so the model runs outside the framework.

``python train.py export --checkpoint PATH --out DIR [--ema] [--r R] [--onnx]`` writes
- ``model.safetensors`` + ``config.json``: timm's own export format (``timm.models.save_for_hf``),
  loadable by plain timm: ``timm.create_model("local-dir:DIR", pretrained=True)``;
- ``tome.json``: the ToMe settings it was trained and is meant to run with, and the run's
  accuracy/throughput trade-off table when it was measured on these very weights;
- ``model.onnx`` (``--onnx``): the patched model at the chosen r, checked with onnxruntime.

``tome_train.load_exported(DIR)`` returns the patched model ready for inference.
Everything is written into a scratch folder first and moved into place at the end, so a
failed export leaves ``DIR`` as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, and_more, eval_schedule, schedule_of
from .tome.schedule import ScheduleError, ViTDims, check_fits, schedule_from_text, schedule_text

if TYPE_CHECKING:
    import torch

ONNX_TOLERANCE = 1e-4
# what an export writes: a folder holding these alone, its tome.json among them, is an earlier export
EXPORT_FILES = ("config.json", "model.safetensors", "tome.json", "model.onnx")
OUT_ALLOWED = "pass a folder (new, empty, or an earlier export)"
# timm's pretrained_cfg fields that describe the architecture's published weights, not a run's
SOURCE_WEIGHTS_FIELDS = ("tag", "license", "description", "origin_url", "paper_name", "paper_ids", "notes",
                         "label_names", "label_descriptions", "label_offset")


class ExportError(ValueError):
    """Bad export input; the message is one line for the user."""


def read_checkpoint(path: Path, ema: bool) -> tuple[dict, dict, list[str] | None, int | None]:
    """The run config, the timm state dict (raw or EMA), the data's class names (None where the source knew none,
    or the checkpoint predates them) and the global step of a Lightning checkpoint (``best-*.ckpt``, ``last.ckpt`` or
    a signal's ``signal_ckpt_N.ckpt``)."""
    if path.is_dir():
        raise ExportError(f"--checkpoint {path}: is a folder; pass a checkpoint file (a run's checkpoints/last.ckpt)")
    if not path.is_file():
        raise ExportError(f"--checkpoint {path}: no such file")
    import torch  # after the checks that need none: a mistyped path is refused at once

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"--checkpoint {path}: not a checkpoint ({type(e).__name__})") from None
    config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or "state_dict" not in ckpt:
        raise ExportError(f"--checkpoint {path}: not a tome-train Lightning checkpoint (no config or state_dict)")
    from .models import network_weights

    state = network_weights(ckpt["state_dict"], ema)
    if not state:
        raise ExportError(f"--checkpoint {path}: has no EMA weights (its run set no optim.ema_decay)" if ema
                          else f"--checkpoint {path}: has no model weights")
    from .data import ImageDataModule

    return config, state, ckpt.get(ImageDataModule.__qualname__, {}).get("class_names"), ckpt.get("global_step")


def build_trained_model(config: dict, state: dict, path: Path):
    """The run config of ``config`` and its model with the weights ``state``, in eval mode."""
    from .models import build_model

    cfg = OmegaConf.create(config)
    model = build_model(OmegaConf.merge(cfg.model, {"checkpoint": None}))
    does_not_fit = f"--checkpoint {path}: weights do not fit {cfg.model.arch}"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ, one per line after the first: the first names the problem
        problems = [line.strip() for line in str(e).split("\n\t")[1:]] or [str(e)]
        raise ExportError(f"{does_not_fit}: {problems[0]}{and_more(problems)}") from None
    for keys, where in ((missing, "the model, not in the checkpoint"), (unexpected, "the checkpoint, not in the model")):
        if keys:
            raise ExportError(f"{does_not_fit}: {keys[0]}{and_more(keys)} is in {where}")
    return cfg, model.eval()


def stored_schedule(r) -> int | list[int] | str:
    """``r`` as ``tome.json`` stores it, in a form that ``--r`` and :func:`load_exported` take back: an integer, a
    per-layer list, or (r, inflect) as the text ``16@-1`` (JSON has no tuple: ``[16, -1.0]`` reads as a per-layer
    list)."""
    return schedule_text(r) if isinstance(r, tuple) else r


def matching_tradeoff(checkpoint: Path, global_step: int | None, weights: str) -> tuple[list[dict] | None, str | None]:
    """The trade-off table the run measured on exactly the weights exported, those of ``checkpoint`` at
    ``global_step`` (``weights``: "raw" or "ema"), from the ``tradeoff.json`` beside or above it, and None; else None
    and why there is none for these weights."""
    checkpoint = Path(os.path.abspath(checkpoint))  # the run folder above a relative checkpoints/last.ckpt
    for run_dir in (checkpoint.parent, checkpoint.parent.parent):
        record, table = run_dir / "tradeoff.json", run_dir / "tradeoff.csv"
        if record.is_file():
            try:
                measured = json.loads(record.read_text())
                measured_weights, measured_step, rows = measured["weights"], measured["global_step"], measured["rows"]
            except (ValueError, TypeError, KeyError) as e:  # edited by hand, or written by something else
                return None, f"{record} cannot be read ({type(e).__name__}: {e})"
            if measured_weights != weights:
                return None, f"{record} was measured on the {measured_weights} weights, not the {weights} ones"
            if measured_step != global_step:
                return None, f"{record} was measured at step {measured_step}, not the checkpoint's {global_step}"
            return rows, None
        if table.is_file():  # a run folder from before tradeoff.json
            return None, f"{table} does not say which weights it was measured on, so cannot be matched to these"
    return None, f"no tradeoff.json beside or above {checkpoint}: the run measured none"


def write_onnx(model, example: torch.Tensor, path: Path) -> None:
    """Write ``model`` to ``path`` as ONNX, traced on ``example`` ``[B, 3, H, W]`` (B >= 2), the batch dimension
    dynamic."""
    import torch

    with warnings.catch_warnings():
        # the tracer notes that token counts become constants: they are, for a fixed input size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter handles our gathers exactly
        torch.onnx.export(
            model, (example,), str(path), input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18, dynamo=False,
        )


def onnx_session(path: Path, threads: int | None = None):
    """An onnxruntime session of ``path`` on the CPU (``threads`` intra-op threads; ``None``: onnxruntime's
    choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # intermediate shapes are symbolic in the graph; not a problem
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(model, img_size: int, path: Path, batch_size: int = 2) -> float:
    """Write ``model.onnx`` (batch dimension dynamic) and return the max abs difference
    between onnxruntime and PyTorch on random inputs, the same in every call."""
    import torch

    # the same inputs in every export: the difference it prints is the model's, not the draw's
    inputs = torch.Generator().manual_seed(0)
    write_onnx(model, torch.randn(batch_size, 3, img_size, img_size, generator=inputs), path)
    session = onnx_session(path)
    check = torch.randn(batch_size + 1, 3, img_size, img_size, generator=inputs)
    with torch.no_grad():
        expected = model(check).numpy()
    got = session.run(None, {"images": check.numpy()})[0]
    return float(abs(got - expected).max())


def add_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Add ``metadata`` to the ONNX model at ``path``: its ``metadata_props``, which onnxruntime reads as
    ``session.get_modelmeta().custom_metadata_map``. The weights, in the file or beside it, are left as they are."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def check_out(out: Path) -> Path:
    """The folder an export into ``out`` writes: ``out`` resolved (``.`` has no name to make a scratch folder beside;
    through a symbolic link, the folder it names, so that the link names the new export). An export fills a new or
    empty folder or replaces an earlier export (a folder of :data:`EXPORT_FILES` alone, its ``tome.json`` among them);
    a file, or a folder holding anything else, is the user's, and is refused, not replaced."""
    folder = out.resolve()
    if not folder.exists():
        existing = next(p for p in folder.parents if p.exists())
        if not existing.is_dir():
            raise ExportError(f"--out {out}: is under the file {existing}; {OUT_ALLOWED}")
        return folder
    if not folder.is_dir():
        raise ExportError(f"--out {out}: is a file; {OUT_ALLOWED}")
    held = list(folder.iterdir())
    foreign = sorted(p.name for p in held if p.name not in EXPORT_FILES or not p.is_file())
    if foreign:
        raise ExportError(f"--out {out}: holds {foreign[0]}{and_more(foreign)}, which an export does not write; "
                          f"{OUT_ALLOWED}")
    if held and not (folder / "tome.json").is_file():
        raise ExportError(f"--out {out}: holds no tome.json, so is no earlier export; {OUT_ALLOWED}")
    return folder


def export(checkpoint: Path, out: Path, ema: bool = False, r=None, onnx: bool = False) -> dict:
    """Export ``checkpoint`` into ``out`` (see :func:`check_out`); returns what was written and checked."""
    folder = check_out(out)
    config, state, class_names, global_step = read_checkpoint(checkpoint, ema)
    weights = "ema" if ema else "raw"
    tradeoff, no_tradeoff = matching_tradeoff(checkpoint, global_step, weights)
    try:
        cfg, model = build_trained_model(config, state, checkpoint)
        run_r_key = "tome.r_eval" if cfg.tome.r_eval is not None else "tome.r_train"
        trained_r = schedule_of(cfg.tome.r_train)
        img_size, prop_attn, data = cfg.model.img_size, cfg.tome.prop_attn, cfg.data
        preprocessing = {"input_size": [3, img_size, img_size], "interpolation": data.interpolation,
                         "crop_pct": data.crop_pct, "mean": list(data.mean), "std": list(data.std)}
        model_config = {"pretrained_cfg": {"tag": cfg.name, "description": f"tome-train run of recipe {cfg.name}"}}
    except ConfigError as e:
        raise ExportError(f"--checkpoint {checkpoint}: {e}") from None
    except OmegaConfBaseException as e:  # a config without a section or key that every run's has
        raise ExportError(f"--checkpoint {checkpoint}: not a tome-train run's config ({str(e).splitlines()[0]})") from None
    try:
        run_r = r if r is not None else eval_schedule(cfg.tome)
        schedule = check_fits(run_r, ViTDims.from_timm(model))
    except ScheduleError as e:
        raise ExportError(f"--r: {e}" if r is not None else
                          f"--checkpoint {checkpoint}: {run_r_key}: {e}; --r R exports at another r") from None

    # made where a folder exists, not in out's parent: a failed export leaves no folders made for it behind
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=next(p for p in folder.parents if p.is_dir())))
    try:
        from timm.models import save_for_hf

        # the weights are this run's: nothing of the architecture's default weights (their tag, license, paper) holds
        model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in SOURCE_WEIGHTS_FIELDS}
        if class_names is not None and len(class_names) == model.num_classes:
            model_config["label_names"] = list(class_names)
        save_for_hf(model, str(staging), safe_serialization=True, model_config=model_config, data_config=preprocessing)
        tome = {
            "r": stored_schedule(run_r),
            "schedule": schedule,
            "prop_attn": prop_attn,
            "trained_r": stored_schedule(trained_r),
            "weights": weights,
            "recipe": cfg.name,
            "tradeoff": tradeoff,
        }
        (staging / "tome.json").write_text(json.dumps(tome, indent=2))
        result = {"out": str(out), "files": ["model.safetensors", "config.json", "tome.json"],
                  "no_tradeoff": no_tradeoff}
        if onnx:
            from .tome import UnsupportedModelError, apply_tome

            try:
                patched = apply_tome(model, r=schedule, prop_attn=prop_attn)
            except UnsupportedModelError as e:
                raise ExportError(f"--onnx: {e}") from None
            diff = export_onnx(patched, img_size, staging / "model.onnx")
            if diff > ONNX_TOLERANCE:
                raise ExportError(f"ONNX check failed: max abs diff {diff:.2e} > {ONNX_TOLERANCE:g}")
            # what config.json and tome.json tell timm users, for those of the ONNX file alone
            about = {"recipe": cfg.name, "preprocessing": preprocessing,
                     "tome": {k: v for k, v in tome.items() if k != "tradeoff"}}
            if "label_names" in model_config:
                about["label_names"] = model_config["label_names"]
            add_onnx_metadata(staging / "model.onnx",
                              {key: value if isinstance(value, str) else json.dumps(value) for key, value in about.items()})
            result["files"].append("model.onnx")
            result["onnx_max_abs_diff"] = diff
        _share_as_umask_allows(staging)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            staging.rename(folder)
            shutil.rmtree(old)
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(folder)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _share_as_umask_allows(folder: Path) -> None:
    """The modes a plain ``mkdir`` and ``open`` would have given ``folder`` and its files: ``mkdtemp`` makes the folder
    its user's alone (0700), and safetensors writes through such a temporary file (0600), where an export is to be
    read by others (a team's models folder, a server's account)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def load_exported(path: str | Path, r=None):
    """The exported model, ToMe-patched at its stored schedule, in eval mode; or at ``r``, in any form a config or
    ``export --r`` takes (``13``, ``(16, -1)``, ``"16@-1"``, ``[8, 8, 4]``, tome.json's ``r``). An ``r`` asking a
    layer for more merges than the model's first can make raises :class:`ScheduleError`, as ``export --r`` refuses
    it (the core would cap it silently)."""
    import timm

    from .tome import apply_tome

    path = Path(path)
    tome = json.loads((path / "tome.json").read_text())
    model = timm.create_model(f"local-dir:{path}", pretrained=True)
    schedule = check_fits(tome["schedule"] if r is None else schedule_of(r), ViTDims.from_timm(model))
    return apply_tome(model, r=schedule, prop_attn=tome["prop_attn"]).eval()


def main(argv: list[str] | None = None) -> int:
    from .arguments import OneLineArgumentParser

    p = OneLineArgumentParser(prog="train.py export", description="Export a trained checkpoint.")
    p.add_argument("--checkpoint", required=True, type=Path, help="Lightning checkpoint of a run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    p.add_argument("--r", default=None, help="schedule to run at: 13, 16@-1, 8,8,4 or [8,8,4] (default: the run's eval r)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx, checked with onnxruntime")
    args = p.parse_args(argv)
    try:
        if not args.out:  # Path("") is Path("."), the current folder, which "" did not name
            raise ExportError(f"--out '': names no folder; {OUT_ALLOWED}")
        r = schedule_from_text(args.r) if args.r is not None else None
        result = export(args.checkpoint, Path(args.out), ema=args.ema, r=r, onnx=args.onnx)
    except (ExportError, ScheduleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {result['out']}: {', '.join(result['files'])}")
    if result["no_tradeoff"] is not None:
        print(f"tome.json holds no trade-off table: {result['no_tradeoff']}")
    if "onnx_max_abs_diff" in result:
        print(f"ONNX check: onnxruntime vs PyTorch max abs diff {result['onnx_max_abs_diff']:.2e} (<= {ONNX_TOLERANCE:g}): ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
