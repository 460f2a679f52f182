#!/usr/bin/env bash
# Fetch, on a machine with pip access, the wheels bench/gpu_check.sh needs on a bare CUDA machine that has
# torch, lightning, torchmetrics, transformers, sentencepiece, rich and matplotlib but none of lmexp's other
# dependencies: Hydra and its plugins (Hydra imports every plugin at start-up), Optuna 2.10 and its database
# layer, submitit and seqeval. Python 3.12, x86-64 Linux; one version of each, no dependency resolution there.
#   bash bench/gpu_wheels.sh      # -> .whl/ (add /.whl/ to .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/.."
binary=(
    hydra-core==1.3.8 omegaconf==2.3.1 hydra-submitit-launcher==1.2.0 submitit==1.5.4
    hydra-optuna-sweeper==1.3.0 optuna==2.10.1 alembic==1.13.3 SQLAlchemy==1.4.54 Mako==1.4.3
    greenlet==3.5.6 cmaes==0.13.1 colorlog==6.12.0 cliff==4.17.0 autopage==0.6.0 cmd2==4.3.1
    stevedore==5.10.0 prettytable==3.18.0 pyperclip==1.11.0 wcwidth==0.9.4 zstandard==0.25.0
)
pure_sources=(antlr4-python3-runtime==4.9.3 seqeval==1.2.2)  # published as sources only: built into wheels here
platforms=()
for n in 17 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl "${binary[@]}"
python3 -m pip wheel --no-deps -w .whl "${pure_sources[@]}"
ls .whl
