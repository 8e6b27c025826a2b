#!/usr/bin/env bash
# Issue #19's GPU measurements on a machine that has only torch, transformers and timm (a lent GPU box
# with no package index), in one call:
#   bash scripts/gpu_bench.sh fetch      # here, once: torchao's wheel into .whl/ (git-ignored), for int8/fp8
#   bash scripts/gpu_bench.sh [TABLES]   # there, from the repository root, with .whl/ (and runs/demo, below)
# 1. infer/speed.py's tables at LLaDA-8B's shape in bf16 (TABLES: infer/benchmark.py --tables, default all),
#    each printed as it is measured with its seconds, compilation included;
# 2. when runs/demo/caption/model and runs/demo/world/test are there (scripts/demo.sh; carry both): the demo
#    model's test answers in each weight format on this device (infer/formats.py: fp32, bf16, bf16 static =
#    CUDA graphs, bf16 + int8, bf16 + fp8): VQA accuracy and answers identical to fp32's and to bf16 eager's.
#    The answers come back in quality.tgz for CIDEr (pycocoevalcap needs Java: score them where it runs).
# Output goes to $OUT/speed_8b.md and $OUT/quality.md as it is printed, when $OUT is set. mmdlm goes on the
# path as a tree of links (no pip, no build). SHAPE=small DTYPE=float32 (MODEL=, WORLD=): the same run on a CPU.
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
out="${OUT:-$site}"
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

python3 infer/benchmark.py --speed --shape "${SHAPE:-8b}" --dtype "${DTYPE:-bfloat16}" --tables "$tables" --repeats 5 2>&1 |
    tee "$out/speed_${SHAPE:-8b}.md" || echo "a table failed (its traceback is above); the quality check still runs"

model=${MODEL:-runs/demo/caption/model}
world=${WORLD:-runs/demo/world/test}
[ -d "$model" ] && [ -f "$world/qa.json" ] || { echo "no $model or $world: no quality check"; exit 0; }
answers=$(mktemp -d)
python3 infer/formats.py --model "$model" --world "$world" --out "$answers" | tee "$out/quality.md" ||
    true  # a format that fails has printed its error (stderr) and an empty row
tar czf "$out/quality.tgz" -C "$answers" .
