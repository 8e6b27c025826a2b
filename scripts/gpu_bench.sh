#!/usr/bin/env bash
# Issue #19's GPU measurements on a machine that has only torch, transformers and timm (a lent GPU box
# with no package index), in one call:
#   bash scripts/gpu_bench.sh fetch      # here, once: torchao's wheel into .whl/ (git-ignored), for int8/fp8
#   bash scripts/gpu_bench.sh preflight  # here, before spending device minutes: the GPU box's torch and
#                                        # transformers in .venv-gpubox/; the static-path tests, then every
#                                        # table with the static step (and transformers' Llama) compiled
#                                        # on this CPU by inductor, as on the GPU bar the CUDA graphs
#   bash scripts/gpu_bench.sh [TABLES]   # there, from the repository root, with .whl/ (and runs/demo, below)
# 1. infer/speed.py's tables at LLaDA-8B's shape in bf16 (TABLES: infer/benchmark.py --tables; by default
#    forward,vqa,batch,quant), each printed as it is measured with its seconds, compilation included;
# 2. when runs/demo/caption/model and runs/demo/world/test are there (scripts/demo.sh; carry both): the demo
#    model's test answers in each weight format on this device (infer/formats.py: fp32, bf16, bf16 static =
#    CUDA graphs, bf16 + int8, bf16 + fp8): VQA accuracy and answers identical to fp32's and to bf16 eager's.
#    The answers come back in quality.tgz for CIDEr (pycocoevalcap needs Java: score them where it runs);
# 3. last (they may not fit in the call): the `fusion` table (the static step with q/k/v and gate/up fused, as
#    inference runs it, and as trained), then the `tuned` table, bf16 and int8 with the step compiled by
#    max-autotune (--autotune), with inductor's autotuning choices (Triton or cuBLAS per matmul).
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
if [ "${1:-}" = preflight ]; then  # the versions the device tool lists for the lent H200 box (KINDS.md)
    [ -x .venv-gpubox/bin/python ] || python3 -m venv .venv-gpubox
    .venv-gpubox/bin/python -m pip install -q torch==2.11.0 transformers==5.17.0 timm pytest 2>&1 |
        { grep -v "ignored: it is neither" || true; }
    PATH="$PWD/.venv-gpubox/bin:$PATH" exec bash "$0" preflight-run
fi
tables=(${1:+--tables "$1"})  # default: benchmark.py's (forward,vqa,batch,quant)
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

if [ "${1:-}" = preflight-run ]; then  # the static path compiled here too: what the GPU run compiles, bar CUDA graphs
    root=$PWD
    cd "$site"  # where `mmdlm` is the link tree, not the repository's folder of that name
    python3 -m pytest -q -p no:cacheprovider "$root/tests/test_sampling_static.py" "$root/tests/test_speed_bench.py"
    python3 -c "import runpy, sys, transformers; from mmdlm import sampling; sampling.GRAPH_DEVICES = ('cuda', 'cpu')
transformers.GenerationMixin._valid_auto_compile_criteria = lambda *a, **k: True  # the AR baseline compiled too
sys.argv = ['$root/infer/benchmark.py', *sys.argv[1:]]; runpy.run_path(sys.argv[0], run_name='__main__')" \
        --speed --shape small --dtype bfloat16 --repeats 1 --tables forward,vqa,batch,quant,tuned,fusion
    echo "preflight passed: torch $(python3 -c 'import torch; print(torch.__version__)')"
    exit 0
fi
python3 infer/benchmark.py --speed --shape "${SHAPE:-8b}" --dtype "${DTYPE:-bfloat16}" "${tables[@]}" --repeats 5 2>&1 |
    tee "$out/speed_${SHAPE:-8b}.md" || echo "a table failed (its traceback is above); the quality check still runs"

model=${MODEL:-runs/demo/caption/model}
world=${WORLD:-runs/demo/world/test}
if [ -d "$model" ] && [ -f "$world/qa.json" ]; then
    answers=$(mktemp -d)
    python3 infer/formats.py --model "$model" --world "$world" --out "$answers" | tee "$out/quality.md" ||
        true  # a format that fails has printed its error (stderr) and an empty row
    tar czf "$out/quality.tgz" -C "$answers" .
else
    echo "no $model or $world: no quality check"
fi
# Last, as they may not finish in the call: the step on the projections unfused against fused (fusion), then bf16
# and int8 with the step compiled by max-autotune (--autotune)
python3 infer/benchmark.py --speed --shape "${SHAPE:-8b}" --dtype "${DTYPE:-bfloat16}" --tables fusion,tuned \
    --repeats 5 2>&1 |
    tee -a "$out/speed_${SHAPE:-8b}.md"
