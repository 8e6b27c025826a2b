#!/usr/bin/env bash
# Issue #19's GPU tables (infer/speed.py at LLaDA-8B's shape, bf16) on a machine that has only torch,
# transformers and timm, e.g. a lent GPU box with no package index:
#   bash scripts/gpu_bench.sh fetch      # here, once: torchao's wheel into .whl/ (git-ignored), for int8/fp8
#   bash scripts/gpu_bench.sh [TABLES]   # there, from the repository root, .whl/ beside it; TABLES defaults to
#                                        # forward,vqa,batch,quant (infer/benchmark.py --tables)
# mmdlm is put on the path as a tree of links (no pip, no build); the tables print as they are measured and
# go to $OUT/speed_8b.md too when $OUT is set (SHAPE=small DTYPE=float32: the CPU smoke run). Each table prints its seconds, compilation included.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = fetch ]; then  # torchao 0.18 runs on torch >= 2.11; the pin is pyproject's [quant]
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
        -d .whl torchao==0.18.0
    ls -l .whl
    exit 0
fi
tables="${1:-forward,vqa,batch,quant}"
site=$(mktemp -d)
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
fi
mkdir "$site/mmdlm"  # the package layout of pyproject.toml: mmdlm/ plus encoders, data, train, infer inside it
ln -s "$PWD"/mmdlm/*.py "$site/mmdlm/"
for part in encoders data train infer; do ln -s "$PWD/$part" "$site/mmdlm/$part"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>/dev/null || true
(cd "$site" && python3 -c "import torch, transformers, mmdlm.infer.speed as s
print('torch', torch.__version__, 'transformers', transformers.__version__, 'mmdlm from', s.__file__)")
(cd "$site" && python3 -c "import torchao; print('torchao', torchao.__version__)") || echo "no torchao: no int8/fp8 rows"
set -o pipefail
python3 infer/benchmark.py --speed --shape "${SHAPE:-8b}" --dtype "${DTYPE:-bfloat16}" --tables "$tables" 2>&1 |
    tee "${OUT:-$site}/speed_${SHAPE:-8b}.md"
