"""Time whole models with the probes' candidate kernels swapped into the library, against unpatched timm.

    python scripts/variant_probe.py --device cuda --output variants.json

``attention_probe.py`` and ``merge_probe.py`` time one layer's op; this runs ``tome_train.bench`` (ViT-B
r16, inference fp16 at batch 256 and training bf16 at batch 128 by default) once per variant, with the
variant's functions standing in for the library's for the length of that run:

- ``library``: the library as it is (on a GPU, its fused merge kernels wherever they measure faster);
- ``torch_ops_only``: the library with PyTorch's ops only (``FastestPath.enabled = False``);
- ``bias_in_qk``: proportional attention as one more head dimension, no mask (``attention_probe.py``);
- ``triton_match``: the matching scores' row max as one Triton kernel (``merge_probe.py``);
- ``triton_match_bias_in_qk``: both;
- ``flex``: proportional attention as a FlexAttention score modification (``attention_probe.py``).

Rows: the bench's rows (``ratio`` against timm, both sides' images/s, the output check) with ``variant``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

import attention_probe
import merge_probe
from tome_train import bench
from tome_train.tome import attention, kernels, merge


def _attention_without_mask(attend):
    """``proportional_attention`` computed by ``attend(q, k, v, size)`` where there is a size and nothing else."""
    library = attention.proportional_attention

    def proportional_attention(q, k, v, size, attn_bias=None, dropout_p=0.0):
        if size is None or attn_bias is not None or dropout_p:
            return library(q, k, v, size, attn_bias, dropout_p)
        return attend(q, k, v, size)

    return proportional_attention


SWAPS = {  # in the order they run: the cheap ones first, FlexAttention (compiled per token count) last
    "library": {},
    "torch_ops_only": {(kernels.FastestPath, "enabled"): False},
    "bias_in_qk": {(attention, "proportional_attention"): _attention_without_mask(attention_probe.bias_in_qk)},
    "triton_match": {(merge, "most_similar"): merge_probe.triton_match},
}
SWAPS["triton_match_bias_in_qk"] = {**SWAPS["triton_match"], **SWAPS["bias_in_qk"]}
SWAPS["flex"] = {(attention, "proportional_attention"): _attention_without_mask(attention_probe.flex_bias)}


@contextlib.contextmanager
def swapped(variant: str):
    """The library's functions replaced by the variant's, restored on exit."""
    saved = {(module, name): getattr(module, name) for module, name in SWAPS[variant]}
    try:
        for (module, name), fn in SWAPS[variant].items():
            setattr(module, name, fn)
        yield
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--variants", nargs="+", choices=list(SWAPS), default=list(SWAPS))
    p.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    p.add_argument("--infer-batch-size", type=int, default=256)
    p.add_argument("--train-batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    settings = {"infer": (args.infer_batch_size, "fp16" if cuda else "fp32"),
                "train": (args.train_batch_size, "bf16" if cuda else "fp32")}
    rows = []
    for variant in args.variants:
        for mode in args.mode:
            batch_size, dtype = settings[mode]
            try:
                with swapped(variant):
                    results = bench.run_benchmark([(args.model, args.r)], device=args.device, dtype=dtype,
                                                  batch_size=batch_size, img_size=args.img_size, warmup=args.warmup,
                                                  steps=args.steps, modes=[mode])
            except Exception as err:  # a kernel that does not build or run here: said in its row
                results = [{"model": args.model, "r": args.r, "mode": mode, "error": str(err).splitlines()[0][:200]}]
            for row in results:
                row["variant"] = variant
                rows.append(row)
                print(json.dumps({k: row.get(k) for k in ("variant", "mode", "ratio", "baseline_ims", "tome_ims",
                                                           "tome_max_diff", "same_merges", "error")}), file=sys.stderr)
            if args.output:  # after every run: a run cut short keeps the variants it finished
                json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                           "rows": rows}, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
