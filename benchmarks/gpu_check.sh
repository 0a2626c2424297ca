#!/usr/bin/env bash
# The GPU checks in one go (the CUDA tests, then the CUDA benchmark at real size), for a machine
# with a GPU and torch already installed. Results go to $OUT (default: bench-gpu/).
#     bash benchmarks/gpu_check.sh
set -o pipefail
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
$PY -m pytest -q tests/test_cuda.py tests/test_rnn.py 2>&1 | tee "$OUT/cuda_tests.log"
# The gradient shaping alone (MMPareto + OGM-GE at real parameter sizes).
$PY benchmarks/bench_shaping.py --device cuda 2>&1 | tee "$OUT/bench_shaping.log"
# README flags, batch 8: plain vs DGS, IEMOCAP and MELD; then the same with the context RNN
# run eagerly (no CUDA graphs), on the same machine.
$PY benchmarks/bench_train.py --Dataset IEMOCAP MELD --device cuda --steps 10 --epochs 3 --stall-seconds 1 \
    --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.log"
$PY benchmarks/bench_train.py --Dataset IEMOCAP MELD --device cuda --steps 10 --epochs 3 --stall-seconds 1 --no-cuda-graphs \
    --json "$OUT/bench_cuda_no_graphs.json" 2>&1 | tee "$OUT/bench_cuda_no_graphs.log"
# M3Net's own sizes (the reference runs out of memory on an 80 GB card here): DGS only.
$PY benchmarks/bench_train.py --Dataset MELD IEMOCAP --device cuda --configs dgs --num_L 3 --num_K 4 \
    --batch-size 16 --steps 5 --epochs 1 --stall-seconds 1 --json "$OUT/bench_cuda_m3net.json" 2>&1 | tee "$OUT/bench_cuda_m3net.log"
# Where a step's time goes on the GPU: host time, kernel launches and GPU time per phase.
for dataset in MELD IEMOCAP; do
    for config in dgs plain; do
        $PY benchmarks/profile_step.py --Dataset $dataset --config $config --device cuda 2>&1 \
            | tee -a "$OUT/profile.log"
    done
done
