#!/usr/bin/env bash
# The GPU checks, for a machine with a GPU and torch (and pytest) installed, in stages that each
# fit one device call; results go to $OUT (default: bench-gpu/), each command's output as it
# runs, so a stage cut short keeps what it finished.
#     bash benchmarks/gpu_check.sh [tests] [bench] [extra]       (no stage named: all three)
#   tests  the CUDA tests (and the CPU tests of the graphs' fallback)
#   bench  epochs plain and DGS, README flags and M3Net's sizes, with graphs
#   extra  the README flags without CUDA graphs, the shaping alone, step profiles
# $OUT/status.txt lists each command and its exit status; the script exits 1 if any failed.
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAGES=${*:-tests bench extra}
failed=0

run() {   # run NAME COMMAND...: the output to the screen and $OUT/NAME.log, the exit status to status.txt
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$OUT/status.txt"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status" | tee -a "$OUT/status.txt"
    [ "$status" -eq 0 ] || failed=1
}

run gpu nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run versions "$PY" -c "import importlib.util, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(),
    '| pytest', 'found' if importlib.util.find_spec('pytest') else 'MISSING: the tests stage cannot run')"

for stage in $STAGES; do
    case $stage in
    tests)
        run cuda_tests "$PY" -m pytest -q -rs tests/test_cuda.py tests/test_rnn.py tests/test_graph_fallback.py
        ;;
    bench)
        # README flags, batch 8: plain vs DGS, IEMOCAP and MELD (real-size synthetic data, made
        # under data/bench on first use).
        run bench_cuda "$PY" benchmarks/bench_train.py --Dataset IEMOCAP MELD --device cuda --steps 10 --epochs 3 \
            --stall-seconds 1 --json "$OUT/bench_cuda.json"
        # M3Net's own sizes (the reference runs out of memory on an 80 GB card here).
        run bench_cuda_m3net "$PY" benchmarks/bench_train.py --Dataset MELD IEMOCAP --device cuda --num_L 3 --num_K 4 \
            --batch-size 16 --steps 5 --epochs 1 --paired-rounds 1 --stall-seconds 1 --json "$OUT/bench_cuda_m3net.json"
        ;;
    extra)
        run bench_cuda_no_graphs "$PY" benchmarks/bench_train.py --Dataset IEMOCAP MELD --device cuda --steps 10 \
            --epochs 3 --stall-seconds 1 --no-cuda-graphs --json "$OUT/bench_cuda_no_graphs.json"
        # The gradient shaping alone (MMPareto + OGM-GE at real parameter sizes).
        run bench_shaping "$PY" benchmarks/bench_shaping.py --device cuda
        # Where a step's time goes on the GPU: host time, kernel launches and GPU time per phase.
        for dataset in MELD IEMOCAP; do
            for config in dgs plain; do
                run "profile_${dataset}_$config" "$PY" benchmarks/profile_step.py --Dataset "$dataset" \
                    --config "$config" --device cuda
            done
        done
        ;;
    *)
        echo "gpu_check.sh: no stage '$stage' (tests, bench, extra)" | tee -a "$OUT/status.txt"
        failed=1
        ;;
    esac
done
exit "$failed"
