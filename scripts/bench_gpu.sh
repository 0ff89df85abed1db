#!/usr/bin/env bash
# The GPU table of docs/performance.md in one run, under 10 minutes on one H100 (compilation most of it): ToMe against
# unpatched timm (fused attention), side by side, at the paper's settings (proportional attention on).
#
#   bash scripts/bench_gpu.sh            # every step; JSON files and a log under $OUT (default: bench-gpu/)
#   bash scripts/bench_gpu.sh infer_b latency    # only the steps named (to split the run across calls)
#
# Needs a CUDA machine with torch and timm; nothing is built. The ToMe patch follows timm's current
# Attention (gate, attn_dim): where the machine's timm is older, put the wheel this repository is
# tested with into .whl/ beforehand (`pip download --no-deps --only-binary=:all: timm==1.0.31 -d .whl`)
# and it is installed into /tmp/site first. Every step writes its own JSON and a failing step does
# not stop the next, so a cut-short run still returns what it had.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

steps=" $* "
want() { [ "$steps" = "  " ] || [[ "$steps" == *" $1 "* ]]; }

step() {  # step NAME ARGS...: one benchmark run (at most $limit seconds), its table appended to the log
    local name=$1; shift
    want "$name" || return 0
    echo "== $name: $*" | tee -a "$out/log"
    timeout "${limit:-240}" python3 -m tome_train.bench --device cuda --output "$out/$name.json" "$@" 2>&1 | tee -a "$out/log" \
        || echo "== $name failed (exit ${PIPESTATUS[0]})" | tee -a "$out/log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/log"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/log"

B=(--model vit_base_patch16_224 --r 16)
L=(--model vit_large_patch16_224 --r 8)
# Inference, fp16 autocast, batch 256.
step infer_b "${B[@]}" --mode infer --dtype fp16 --batch-size 256 --warmup 5 --steps 20
step infer_l "${L[@]}" --mode infer --dtype fp16 --batch-size 256 --warmup 5 --steps 20
# Training steps (forward, backward, fused AdamW), bf16 autocast, batch 128 (B) and 64 (L).
step train_b "${B[@]}" --mode train --dtype bf16 --batch-size 128 --warmup 5 --steps 20
step train_l "${L[@]}" --mode train --dtype bf16 --batch-size 64 --warmup 5 --steps 20
# The same with cuDNN attention first: unlike flash it takes the proportional-attention bias.
step infer_b_cudnn "${B[@]}" --mode infer --dtype fp16 --batch-size 256 --warmup 5 --steps 20 --sdpa cudnn
step train_b_cudnn "${B[@]}" --mode train --dtype bf16 --batch-size 128 --warmup 5 --steps 20 --sdpa cudnn
# Batch 1 latency; the ToMe side first measures from which batch merging pays off (--auto-min-batch).
step latency "${B[@]}" --mode infer --dtype fp16 --batch-size 1 --warmup 10 --steps 50 --auto-min-batch
# Where the ToMe forward spends its GPU time (ViT-B r16, batch 256, fp16): top kernels as JSON.
want profile && timeout 120 python3 - "$out/profile.json" <<'EOF' 2>&1 | tee -a "$out/log"
import json, sys, torch
from torch.profiler import ProfilerActivity, profile
from tome_train.bench import build_pair, BenchCase

base, tome, _ = build_pair(BenchCase("vit_base_patch16_224", 16), img_size=None, prop_attn=True,
                           device=torch.device("cuda"))
x = torch.randn(256, 3, 224, 224, device="cuda")
result = {}
for name, model in (("timm", base.eval()), ("tome", tome.eval())):
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(x)
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.self_device_time_total for e in events)
    result[name] = {"total_ms": total / 1e3, "kernels": sum(e.count for e in events),
                    "top": [[e.key[:90], e.count, round(e.self_device_time_total / 1e3, 3)] for e in events[:25]]}
    print(name, f"{total / 1e3:.2f} ms GPU time, {result[name]['kernels']} kernel launches")
json.dump(result, open(sys.argv[1], "w"), indent=1)
EOF
# torch.compile on both sides: the same ratios, first step = compile time, recompiles must stay 0.
# Last, as the slowest: a step cut short by its time limit loses only its own JSON.
step compile_b_infer "${B[@]}" --mode infer --dtype fp16 --batch-size 256 --warmup 3 --steps 10 --compile
step compile_b_train "${B[@]}" --mode train --dtype bf16 --batch-size 128 --warmup 3 --steps 10 --compile
# Batch 1 under CUDA graphs (compile mode reduce-overhead), where launches no longer cost per kernel.
step latency_cudagraphs "${B[@]}" --mode infer --dtype fp16 --batch-size 1 --warmup 10 --steps 50 \
    --compile reduce-overhead
echo "== done" | tee -a "$out/log"
