#!/usr/bin/env bash
# Every GPU check and benchmark in one bounded run, for a GPU host with lorafleet's worker
# dependencies installed (CI has no GPU, so these run only here). PYTHON picks the
# interpreter (default python3).
#
#     bash scripts/gpu_session.sh [RESULTS_DIR] [BUDGET_S] [STEP...]
#
# Steps (default: tests adapters_graphs), each cut off at what is left of
# BUDGET_S (default 540 s, under a 10-minute call):
#   tests            the compiled kernel and CUDA engine tests (about 65 s on an H100 before
#                    the static-meta, add_lora and graph tests were added)
#   bench_kernels    the kernel benchmark table (about 55 s)
#   bench_attention  paged decode attention kernel vs the gather + SDPA path
#   adapters         the GPU suite's adapter-count rows, 256 requests, eager (about 255 s)
#   adapters_graphs  the same rows with decode steps from CUDA graphs
#   peft             the GPU suite's PEFT row, 1 round (about 6 min: run it in its own call)
#   peft_graphs      the same with CUDA graphs
#   profile          where an engine step's host time goes, 4 layers (about 60 s)
#   profile_graphs   the same with decode steps from CUDA graphs
#   pipelining       pipelined vs read-back-at-once steps, graphs on, 256 requests, 8 adapters
# On a host without lorafleet's pure-Python dependencies, source scripts/gpu_host_env.sh
# first.
# Logs and tables go to RESULTS_DIR (default ./gpu-results); a short summary is printed last.
set -u
out=${1:-gpu-results}
budget=${2:-540}
steps=("${@:3}")
((${#steps[@]})) || steps=(tests adapters_graphs)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }

step() { # step NAME MAX_SECONDS COMMAND...: runs COMMAND for at most min(MAX, time left)
    local name=$1 max=$2
    shift 2
    local limit
    limit=$(left)
    ((limit > max)) && limit=$max
    if ((limit < 20)); then
        echo "== $name: skipped (no time left)"
        return
    fi
    echo "== $name (at most ${limit}s)"
    timeout -k 5 "$limit" "$@" >"$out/$name.log" 2>&1
    echo "   exit status $?"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >"$out/gpu.txt" 2>&1
for name in "${steps[@]}"; do
    case $name in
    tests) step tests 220 "$py" -m pytest -m gpu -p no:cacheprovider -q \
        tests/test_kernels.py tests/test_attention.py tests/test_engine_cuda.py ;;
    bench_kernels) step bench_kernels 120 "$py" benchmarks/bench_kernels.py ;;
    bench_attention) step bench_attention 120 "$py" benchmarks/bench_attention.py ;;
    adapters) step adapters 320 "$py" benchmarks/run_all.py --gpu --only adapters \
        --requests 256 --rounds 2 --tiers 128:512 --out "$out/adapters.md" ;;
    adapters_graphs) step adapters_graphs 320 "$py" benchmarks/run_all.py --gpu --only adapters \
        --requests 256 --rounds 2 --tiers 128:512 --cuda-graphs --out "$out/adapters_graphs.md" ;;
    peft) step peft 540 "$py" benchmarks/run_all.py --gpu --only peft --rounds 1 \
        --out "$out/peft.md" ;;
    peft_graphs) step peft_graphs 540 "$py" benchmarks/run_all.py --gpu --only peft --rounds 1 \
        --cuda-graphs --out "$out/peft_graphs.md" ;;
    profile) step profile 120 "$py" benchmarks/profile_engine.py --gpu --layers 4 --top 40 ;;
    profile_graphs) step profile_graphs 120 "$py" benchmarks/profile_engine.py --gpu --layers 4 \
        --top 40 --cuda-graphs ;;
    pipelining) step pipelining 240 "$py" benchmarks/bench_pipelining.py --gpu --cuda-graphs \
        --rounds 2 ;;
    *) echo "unknown step $name (see the header)" && exit 2 ;;
    esac
done

echo "== summary ($(($(date +%s) - start))s)"
cat "$out/gpu.txt"
tail -n 2 "$out/tests.log" 2>/dev/null
grep -E "^\| decode T=(64|256) A=64 \| both" "$out/bench_kernels.log" 2>/dev/null
grep -E "^\| [0-9]+ x [0-9]+ \|" "$out/bench_attention.log" 2>/dev/null
for name in adapters adapters_graphs peft peft_graphs; do
    grep -hE "adapters N=|peft:" "$out/$name.log" 2>/dev/null | sed "s/^/$name: /"
done
grep -H "###" "$out/profile.log" "$out/profile_graphs.log" 2>/dev/null
grep -hE "tokens/s|ratio" "$out/pipelining.log" 2>/dev/null | sed "s/^/pipelining: /"
