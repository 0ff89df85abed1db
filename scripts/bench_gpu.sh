#!/usr/bin/env bash
# The GPU table of docs/performance.md in one run (about 12 minutes on one H100, compilation most of it; BUDGET
# cuts it shorter): ToMe against unpatched timm (fused attention), side by side, at the paper's settings
# (proportional attention on).
#
#   bash scripts/bench_gpu.sh                    # every step; results.json, profile.json and a log under $OUT
#                                                # (default: bench-gpu/)
#   bash scripts/bench_gpu.sh infer_b latency    # only the steps named (to split the run across calls)
#   BUDGET=540 bash scripts/bench_gpu.sh         # start no step, and cut the running one, 540 s after the start
#
# Needs a CUDA machine with torch and timm; nothing is built. The ToMe patch follows timm's current
# Attention (gate, attn_dim): where the machine's timm is older, put the wheel this repository is
# tested with into .whl/ beforehand (`pip download --no-deps --only-binary=:all: timm==1.0.31 -d .whl`)
# and it is installed into /tmp/site first. Steps run in order of importance; each adds its rows to
# results.json (keyed by step) as soon as it ends, and a failing step does not stop the next, so a
# cut-short run still returns what it had, in three files (and targets.md: the issue's targets, met or not).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-gpu}
steps_dir=$(mktemp -d)
mkdir -p "$out"
deadline=$((SECONDS + ${BUDGET:-100000}))
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

steps=" $* "
want() { [ "$steps" = "  " ] || [[ "$steps" == *" $1 "* ]]; }

seconds_for() {  # seconds_for LIMIT: LIMIT, or less where the budget ends sooner
    local left=$((deadline - SECONDS - 5))
    echo $((left < $1 ? left : $1))
}

gather() {  # the steps' JSON files, oldest first, as one results.json
    python3 -c 'import json, pathlib, sys
steps = sorted(pathlib.Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stat().st_mtime)
json.dump({p.stem: json.loads(p.read_text()) for p in steps}, open(sys.argv[2], "w"), indent=1)' \
        "$steps_dir" "$out/results.json"
}

run_step() {  # run_step NAME LIMIT COMMAND...: one timed step, its output appended to the log
    local name=$1 limit; limit=$(seconds_for "$2"); shift 2
    if [ "$limit" -lt 20 ]; then echo "== $name skipped: budget spent" | tee -a "$out/log"; return 0; fi
    echo "== $name (at most $limit s)" | tee -a "$out/log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/log" || echo "== $name failed (exit ${PIPESTATUS[0]})" | tee -a "$out/log"
}

step() {  # step NAME ARGS...: one benchmark run (at most 240 s)
    local name=$1; shift
    want "$name" || return 0
    echo "== $name: $*" >>"$out/log"
    run_step "$name" 240 python3 -m tome_train.bench --device cuda --output "$steps_dir/$name.json" "$@"
    gather
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/log"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/log"

B=(--model vit_base_patch16_224 --r 16)
L=(--model vit_large_patch16_224 --r 8)
# First the issue's table. Inference: fp16 autocast, batch 256, eager. Training steps (forward, backward, fused
# AdamW, bf16 autocast, batch 128 for B and 64 for L) with each side's whole step captured as one CUDA graph,
# uncompiled: eager training is bound by the host's launches on both sides, the graph shows what the kernels give.
step infer_b "${B[@]}" --mode infer --dtype fp16 --batch-size 256 --warmup 5 --steps 20
step train_b_graphs "${B[@]}" --mode train --dtype bf16 --batch-size 128 --warmup 5 --steps 20 --cuda-graphs
step infer_l "${L[@]}" --mode infer --dtype fp16 --batch-size 256 --warmup 5 --steps 20
step train_l_graphs "${L[@]}" --mode train --dtype bf16 --batch-size 64 --warmup 5 --steps 20 --cuda-graphs
# torch.compile on both sides, each whole step then captured as one CUDA graph: the ToMe side by compile_tome
# (compile time about timm's), so its eager merges between the compiled regions replay with them instead of
# being launched one by one (the regions alone were host-bound: compile_b_train_regions).
step compile_b_train_regions_graphs "${B[@]}" --mode train --dtype bf16 --batch-size 128 --warmup 3 --steps 10 \
    --compile --compile-scope regions --cuda-graphs
step compile_b_infer_regions_graphs "${B[@]}" --mode infer --dtype fp16 --batch-size 256 --warmup 3 --steps 10 \
    --compile --compile-scope regions --cuda-graphs
# Batch 1 latency; the ToMe side first measures from which batch merging pays off (--auto-min-batch).
step latency "${B[@]}" --mode infer --dtype fp16 --batch-size 1 --warmup 10 --steps 50 --auto-min-batch
# The compiled targets for ViT-L too (the issue asks the same ratios of both models), after ViT-B's.
step compile_l_train_regions_graphs "${L[@]}" --mode train --dtype bf16 --batch-size 64 --warmup 3 --steps 10 \
    --compile --compile-scope regions --cuda-graphs
step compile_l_infer_regions_graphs "${L[@]}" --mode infer --dtype fp16 --batch-size 256 --warmup 3 --steps 10 \
    --compile --compile-scope regions --cuda-graphs
# Where each model spends its GPU time (ViT-B r16; inference: batch 256, fp16; training: forward and
# backward, batch 128, bf16): top kernels as JSON.
want profile && run_step profile 150 python3 - "$out/profile.json" <<'EOF'
import json, sys, time, torch
from torch.profiler import ProfilerActivity, profile
from tome_train.bench import build_pair, BenchCase

case, cuda = BenchCase("vit_base_patch16_224", 16), torch.device("cuda")
base, tome, _ = build_pair(case, img_size=None, prop_attn=True, device=cuda)
def forward_infer(model):
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        model.eval()(images)


def step_train(model):  # forward and backward (no optimizer step), bf16 autocast, batch 128
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.train()(images[:128]).float().logsumexp(-1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


images = torch.randn(256, 3, 224, 224, device="cuda")
result = {}
for name, model in (("timm", base), ("tome", tome)):
    for mode, run in (("infer", forward_infer), ("train", step_train)):
        for _ in range(3):
            run(model)
        torch.cuda.synchronize()
        start = time.perf_counter()  # wall time of a step outside the profiler: above GPU time = host-bound
        for _ in range(5):
            run(model)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) / 5 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(model)
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in events)
        result[f"{name}_{mode}"] = {
            # device work only: the profile also lists the runtime's launch calls (cudaLaunchKernel, ...)
            "total_ms": total / 1e3, "wall_ms": wall_ms,
            "kernels": sum(e.count for e in events if e.self_device_time_total > 0),
            "top": [[e.key[:90], e.count, round(e.self_device_time_total / 1e3, 3)] for e in events[:30]]}
        print(name, mode, f"{total / 1e3:.2f} ms GPU time, {wall_ms:.2f} ms wall, "
              f"{result[f'{name}_{mode}']['kernels']} kernel launches")
# A ToMe step must never wait for the GPU (a device-to-host copy stalls the launch queue): name the first op that does.
torch.cuda.set_sync_debug_mode("error")
try:
    forward_infer(tome)
    step_train(tome)
    result["tome_host_sync"] = None
except RuntimeError as err:
    result["tome_host_sync"] = str(err).splitlines()[0]
torch.cuda.set_sync_debug_mode(0)
print("ToMe step waits for the GPU at:", result["tome_host_sync"])
json.dump(result, open(sys.argv[1], "w"), indent=1)
EOF
# Then what explains it: eager training (host-bound) and inference under graphs (both models); ToMe's own work in
# one layer; the attention candidates; the whole model with each kernel swapped out.
step train_b "${B[@]}" --mode train --dtype bf16 --batch-size 128 --warmup 5 --steps 20
step infer_b_graphs "${B[@]}" --mode infer --dtype fp16 --batch-size 256 --warmup 5 --steps 20 --cuda-graphs
step infer_l_graphs "${L[@]}" --mode infer --dtype fp16 --batch-size 256 --warmup 5 --steps 20 --cuda-graphs
# ToMe's own work in one layer at ViT-B's shape (matching, merge, merge backward): PyTorch's ops against fused
# Triton kernels.
want merge && run_step merge 90 python3 scripts/merge_probe.py --device cuda --output "$steps_dir/merge.json" && gather
# The first half of a merging layer as a CUDA graph, ViT-L's and ViT-B's: would the plan hide behind attention on a
# second stream?
want overlap && run_step overlap 60 python3 scripts/overlap_probe.py --heads 16 --r 8 --tokens 189 125 61 \
    --output "$steps_dir/overlap.json" && gather
want overlap_b && run_step overlap_b 60 python3 scripts/overlap_probe.py --heads 12 --r 16 --tokens 181 117 37 \
    --output "$steps_dir/overlap_b.json" && gather
# ViT-B inference under whole-step CUDA graphs, the plan beside attention inside the capture too (the library plans
# after attention there): does the second stream capture and replay, and is the step faster than the library's?
want variants_b_graphs && run_step variants_b_graphs 150 python3 scripts/variant_probe.py --device cuda --mode infer \
    --cuda-graphs --variants library plan_beside_in_graphs --warmup 3 --steps 10 \
    --output "$steps_dir/variants_b_graphs.json" && gather
# A first step's Triton builds, one after another and in a pool of 16 threads, each from an empty cache (the steps
# above share one): ViT-B and ViT-L inference, batch 256, fp16.
want builds_b && run_step builds_b 120 python3 scripts/build_probe.py "${B[@]}" --batch-size 256 --workers 1 16 \
    --output "$steps_dir/builds_b.json" && gather
want builds_l && run_step builds_l 120 python3 scripts/build_probe.py "${L[@]}" --batch-size 256 --workers 1 16 \
    --output "$steps_dir/builds_l.json" && gather
# The tests that need a GPU, on kernels compiled as the library runs them (not Triton's interpreter): the device
# timer, CUDA graphs and compiled CUDA graphs, the plan beside attention on real streams; and, on this machine's
# torch, that a compiled graph calls the library's plan and merge ops (torch 2.11's Dynamo once hid them).
want gpu_tests && run_step gpu_tests 240 env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py tests/test_bench.py tests/test_compile.py \
    -k "on_a_gpu or cuda_graphs or reduce_overhead or two_ops_in_the_graph"
# One attention layer at ViT-B's shape: every way onto the fused kernels (backends, mask layouts) against
# plain attention, at 197, 117 and 37 tokens; the Triton kernels also with other blocks than the library's
# (forward 64x32, backward 128x32): the forward's earlier 128x64 and 64x64, the backward at 64 rows per program.
want attention && run_step attention 150 python3 scripts/attention_probe.py --device cuda \
    --blocks 128x64 64x64 64x32/64x32 64x32/64x16 --output "$steps_dir/attention.json" && gather
# The whole model (ViT-B r16, inference and training) with each candidate of the two probes swapped in.
want variants && run_step variants 200 python3 scripts/variant_probe.py --device cuda --warmup 3 --steps 10 \
    --output "$steps_dir/variants.json" && gather
# Training as the trainer runs it with trainer.compile=reduce-overhead (whole model compiled, CUDA graphs): eager
# ToMe training is bound by the host, not the GPU. The matching, merge and attention (with its backward) are
# custom ops running the eager choice, the Triton kernels included.
step compile_b_train_cudagraphs "${B[@]}" --mode train --dtype bf16 --batch-size 128 --warmup 3 --steps 10 \
    --compile reduce-overhead
# torch.compile(model) on both sides, inference: first step = compile time (the matching, merge and attention
# are custom ops running the eager choice, so compilation has less to do), recompiles must stay 0.
step compile_b_infer "${B[@]}" --mode infer --dtype fp16 --batch-size 256 --warmup 3 --steps 10 --compile
# The same layer under torch.compile, the token count static and dynamic (as compile_tome has it), against
# plain attention compiled: does inductor's stride rule for the bias cost the compiled ToMe model its speed?
want attention_compiled && run_step attention_compiled 120 python3 scripts/attention_probe.py --device cuda \
    --variants plain plain_compiled bias bias_compiled bias_compiled_dynamic --tokens 197 117 \
    --output "$steps_dir/attention_compiled.json" && gather
# torch.compile, the ToMe side by compile_tome (attention and MLP compiled once for all blocks with a
# dynamic token count, merging eager), the timm side whole: ratios, compile time (first_ratio), recompiles.
step compile_b_infer_regions "${B[@]}" --mode infer --dtype fp16 --batch-size 256 --warmup 3 --steps 10 \
    --compile --compile-scope regions
step compile_b_train_regions "${B[@]}" --mode train --dtype bf16 --batch-size 128 --warmup 3 --steps 10 \
    --compile --compile-scope regions
# The same with each region under CUDA graphs (one per token count), the launches of the eager merge left.
step compile_b_train_regions_cudagraphs "${B[@]}" --mode train --dtype bf16 --batch-size 128 --warmup 3 \
    --steps 10 --compile reduce-overhead --compile-scope regions
# Eager ViT-L training, host-bound like ViT-B's.
step train_l "${L[@]}" --mode train --dtype bf16 --batch-size 64 --warmup 5 --steps 20
# torch.compile(model) on both sides, training: first step = compile time, recompiles must stay 0.
# Last, as the slowest: a step cut short by the budget loses only its own rows.
step compile_b_train "${B[@]}" --mode train --dtype bf16 --batch-size 128 --warmup 3 --steps 10 --compile
# Batch 1 under CUDA graphs (compile mode reduce-overhead), where launches no longer cost per kernel;
# min_batch calibrated as in the eager latency step.
step latency_cudagraphs "${B[@]}" --mode infer --dtype fp16 --batch-size 1 --warmup 10 --steps 50 \
    --compile reduce-overhead --auto-min-batch
# Last, what the run says of issue 7's targets (no GPU, a second): targets.md.
[ -s "$out/results.json" ] && python3 scripts/speed_targets.py "$out/results.json" --markdown "$out/targets.md" \
    | tee -a "$out/log"
echo "== done" | tee -a "$out/log"
