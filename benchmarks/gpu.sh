#!/usr/bin/env bash
# The GPU tables of docs/speed.md in one run (about 4-5 minutes on one H100).
#
#   DATA=dir-with-binarized_mnist.npz OUT=dir bash benchmarks/gpu.sh
#
# Run from the repository root on the GPU machine. PYTHON (default: python3) must import torch
# with CUDA; wheels in .whl/ (pyro-ppl and pyro-api: the lent machines have no Pyro) are
# installed into /tmp/site first. On a lent machine, with the data in .carry/:
#
#   DATA=.carry bash benchmarks/gpu.sh          (carry: .carry and .whl)
#
# Writes to $OUT:
#   env.log                 GPU name and driver, torch/CUDA/pyro versions
#   gpu_tests.log           pytest -m gpu tests/test_bench.py (the CUDA-graph loop trains)
#   train_mlp.log           training, 784-400-50 MLP, batches 100 and 256
#   train_vampprior.log     training, GatedDense(300) x 2, batch 100
#   eval_mlp.log            log p(x), K=5000, all 10,000 test images, chunk-bound sweep
#   eval_vampprior.log      the same for the GatedDense network
# Every table goes to the terminal too. A failing GPU test is reported and the tables still run.
set -euo pipefail

DATA=${DATA:?set DATA to the folder holding binarized_mnist.npz}
OUT=${OUT:?set OUT to the folder for the logs}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PYTHON" -c 'import torch, pyro; print("torch", torch.__version__, "cuda", torch.version.cuda,
"pyro", pyro.__version__, "gpu", torch.cuda.get_device_name())'
    nproc
} 2>&1 | tee "$OUT/env.log"

"$PYTHON" -m pytest -q -p no:cacheprovider -p no:benchmark -m gpu tests/test_bench.py 2>&1 \
    | tee "$OUT/gpu_tests.log" || echo "gpu tests FAILED: see $OUT/gpu_tests.log"

bench=("$PYTHON" -m pyrovae bench --dataset binarized-mnist --data-dir "$DATA" --device cuda)

# Training: methods interleaved round by round, medians of 3 epochs after a warm-up epoch.
"${bench[@]}" --train-only --arch mlp --batch-sizes 100 256 --rounds 3 2>&1 \
    | tee "$OUT/train_mlp.log"
"${bench[@]}" --train-only --arch vampprior --batch-sizes 100 --rounds 3 2>&1 \
    | tee "$OUT/train_vampprior.log"

# log p(x), K=5000, all 10,000 test images: chunk bounds 2^24 (the CPU default), 2^26, 2^28
# (the GPU default's cap) and 2^29; one timed round after a warm-up round.
for arch in mlp vampprior; do
    "${bench[@]}" --eval-only --arch "$arch" --num-samples 5000 --eval-n 10000 --eval-rounds 1 \
        --chunk-elements 16777216 67108864 268435456 536870912 2>&1 | tee "$OUT/eval_$arch.log"
done
