#!/usr/bin/env bash
# lmexp's GPU checks as one job on a bare CUDA machine (about 7 minutes on one H100/H200):
#   - python -m bench --gpu: GPT-2 124M (vocab 50257, seq 1024), llama-124m and BERT-base through the full
#     lmexp.train path (bf16-mixed, compile) against Hugging Face's models in a plain loop; trainer=fsdp on the
#     one GPU (speed against trainer=gpu, sharded checkpoint resumed and exported); peak memory of every run;
#   - the tests that need a CUDA GPU (pytest -m gpu).
# Writes <out>/gpu_check.json (the benchmark's results, with the machine and versions) and <out>/gpu_check.log.
#
#   bash bench/gpu_check.sh [--smoke] [out dir]      # --smoke: the same code on the CPU, tiny sizes (tests run it)
#
# Python packages the machine lacks travel as wheels in .whl/ (make them here first with bench/gpu_wheels.sh);
# they are installed into a private directory, never over the machine's own torch.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=""
if [ "${1:-}" = "--smoke" ]; then smoke="--smoke"; shift; fi
out="${1:-${OUT:-bench/out/gpu}}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
started=$(date +%s)

if [ -z "$smoke" ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/lmexp-site .whl/*.whl
    export PYTHONPATH="/tmp/lmexp-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
export LMEXP_CACHE_DIR="${LMEXP_CACHE_DIR:-/tmp/lmexp-cache}"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
python3 -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', \
lightning.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

status=0
python3 -m bench --gpu $smoke --out "$out/gpu_check.json" || status=$?
if [ -z "$smoke" ]; then  # the CPU smoke leaves the GPU tests to the suite, where they skip
    python3 -m pytest -q -m gpu -p no:cacheprovider tests || status=$?
fi
echo "gpu_check: $(( $(date +%s) - started )) s, exit status $status; results in $out/gpu_check.json"
exit $status
