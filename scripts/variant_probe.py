"""Time whole models with parts of the library swapped out, against unpatched timm.

    python scripts/variant_probe.py --device cuda --output variants.json

``attention_probe.py`` and ``merge_probe.py`` time one layer's op; this runs ``tome_train.bench`` (ViT-B
r16, inference fp16 at batch 256 and training bf16 at batch 128 by default) once per variant, with the
variant's functions standing in for the library's for the length of that run, so that each fused kernel's
worth is measured end to end (on a host-bound step, launches count as much as the kernels' own time):

- ``library``: the library as it is (on a GPU, each fused kernel wherever it measures faster);
- ``torch_ops_only``: PyTorch's ops only (``FastestPath.enabled = False``);
- ``no_fused_match``: PyTorch's ops for the matching, the other kernels where they measure faster;
- ``no_fused_layer``: no one-kernel layer (the key mean, matching, rows and weights each on their own path);
- ``no_fused_plan``: PyTorch's ops from the row maxima to the merge's rows and weights (and no one-kernel
  layer), the other kernels where they measure faster;
- ``no_fused_merge``: PyTorch's ops for the merge (and the norm after it) and its backward, the other kernels
  where they measure faster;
- ``no_fused_merge_norm``: in inference the merge kernels, then PyTorch's norm, not the one kernel for both;
- ``no_plan_beside``: in inference the plan after attention, not on a second stream beside it;
- ``plan_beside_in_graphs``: the plan beside attention wherever it was chosen, inside CUDA-graph captures too (the
  library plans after attention there until a GPU run shows the two streams capture and replay as they run
  eagerly: with ``--cuda-graphs``, this variant's row, or its error);
- ``no_triton_attention``: SDPA's mask for proportional attention, the other kernels where they measure
  faster.

``--cuda-graphs`` captures each side's whole step as one CUDA graph (``bench --cuda-graphs``; a GPU).

Rows: the bench's rows (``ratio`` against timm, both sides' images/s, the output check) with ``variant``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

from tome_train import bench
from tome_train.tome import attention, kernels, merge, timm_patch


def plans_beside_attention_in_graphs(state: "timm_patch.ToMeState", x: torch.Tensor) -> bool:
    """:func:`timm_patch.plans_beside_attention` without its rule against CUDA-graph captures."""
    return (state.compile_mode is None and not torch.is_grad_enabled()
            and timm_patch._merging_first_half.applies(x.device))


SWAPS = {
    "library": {},
    "torch_ops_only": {(kernels.FastestPath, "enabled"): False},
    "no_fused_match": {(merge, "_most_similar"): merge.most_similar},
    "no_fused_layer": {(merge, "_plan_layer"): merge.plan_layer},
    "no_fused_plan": {(merge, "_plan_layer"): merge.plan_layer, (merge, "_plan_merge"): merge.plan_merge,
                      (merge, "_size_weights"): merge.size_weights},
    "no_fused_merge": {(merge, "_merge_rows"): merge._weighted_merge,
                       (merge, "_merge_rows_backward"): merge._weighted_merge_backward,
                       (merge._merge_norm_rows, "broken"): True},
    # held broken, the path is not taken: the merge hands the MLP no norm, as before the kernel
    "no_fused_merge_norm": {(merge._merge_norm_rows, "broken"): True},
    "no_plan_beside": {(timm_patch._merging_first_half, "broken"): True},
    "plan_beside_in_graphs": {(timm_patch, "plans_beside_attention"): plans_beside_attention_in_graphs},
    "no_triton_attention": {(attention, "_size_biased_attention"): attention._masked_attention,
                            (attention, "_trained_size_biased_attention"): attention._packed_masked_attention},
}


@contextlib.contextmanager
def swapped(variant: str):
    """The library's functions (or a path's settings) replaced by the variant's, restored on exit."""
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
    p.add_argument("--cuda-graphs", action="store_true", help="each side's whole step as one CUDA graph")
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
                                                  steps=args.steps, modes=[mode], cuda_graphs=args.cuda_graphs)
            except Exception as err:  # a kernel that does not build or run here: said in its row
                results = [{"model": args.model, "r": args.r, "mode": mode, "error": str(err).splitlines()[0][:200]}]
            for row in results:
                row["variant"] = variant
                rows.append(row)
                print(json.dumps({k: row.get(k) for k in ("variant", "mode", "ratio", "baseline_ims", "tome_ims",
                                                           "tome_max_diff", "same_merges", "fused_kernels", "error")}),
                      file=sys.stderr)
            if args.output:  # after every run: a run cut short keeps the variants it finished
                json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                           "rows": rows}, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
