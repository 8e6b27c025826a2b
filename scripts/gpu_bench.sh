#!/usr/bin/env bash
# Issue #19's GPU measurements on a machine that has only torch, transformers and timm (a lent GPU box
# with no package index), in one call:
#   bash scripts/gpu_bench.sh fetch      # here, once: torchao's wheel into .whl/ (git-ignored), for int8/fp8
#   bash scripts/gpu_bench.sh [TABLES]   # there, from the repository root, with .whl/ (and runs/demo, below)
# 1. infer/speed.py's tables at LLaDA-8B's shape in bf16 (TABLES: infer/benchmark.py --tables, default all),
#    each printed as it is measured with its seconds, compilation included;
# 2. when runs/demo/caption/model and runs/demo/world/test are there (scripts/demo.sh; carry both): the demo
#    model's test answers in each weight format on this device (fp32, bf16, bf16 static = CUDA graphs,
#    bf16 + int8, bf16 + fp8): VQA accuracy and answers identical to fp32's and to bf16 eager's. The answers
#    come back in quality.tgz for CIDEr (pycocoevalcap needs Java: score them where it is installed).
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

python3 infer/benchmark.py --speed --shape "${SHAPE:-8b}" --dtype "${DTYPE:-bfloat16}" --tables "$tables" 2>&1 |
    tee "$out/speed_${SHAPE:-8b}.md"

model=${MODEL:-runs/demo/caption/model}
world=${WORLD:-runs/demo/world/test}
[ -d "$model" ] && [ -f "$world/qa.json" ] || { echo "no $model or $world: no quality check"; exit 0; }
world=$(cd "$world" && pwd)
answers=$(mktemp -d)
printf '%s\n' "| demo model, $world | VQA accuracy | VQA as fp32 | captions as fp32 | VQA as bf16 | captions as bf16 |" \
    "|---|---|---|---|---|---|" | tee "$out/quality.md"
for spec in "fp32:--dtype float32" "bf16:--dtype bfloat16" "bf16_static:--dtype bfloat16 --static" \
            "bf16_int8:--dtype bfloat16 --quantize int8" "bf16_fp8:--dtype bfloat16 --quantize fp8"; do
    name=${spec%%:*}
    for task in qa captions; do
        # shellcheck disable=SC2086  # the flags are words
        python3 infer/infer.py --model "$model" --input "$world/$task.json" --output "$answers/${name}_$task.jsonl" \
            --batch-size 32 ${spec#*:} 2>&1 | tail -n 2 | grep -v "answering" || true
    done
    (cd "$site" && python3 - "$answers" "$name" "$world") <<'EOF' 2>&1 | tee -a "$out/quality.md" || true
import json, sys
from pathlib import Path

from mmdlm.infer.evaluate import load_predictions, load_references, score

answers, name, world = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
def read(fmt, task):
    path = answers / f"{fmt}_{task}.jsonl"
    return {r["id"]: (r["answer"], r["forward_passes"]) for r in map(json.loads, path.open())} if path.exists() else {}
def same(task, other):
    mine, theirs = read(name, task), read(other, task)
    if not mine or not theirs:
        return "-"
    text = sum(mine[k][0] == theirs.get(k, (None,))[0] for k in mine)
    both = sum(mine[k] == theirs.get(k) for k in mine)
    return f"{text}/{len(mine)} ({both} with the same forwards)"
qa = answers / f"{name}_qa.jsonl"
vqa = score(load_predictions(qa), load_references(world / "qa.json"), "vqa")["vqa"] if qa.exists() else float("nan")
print(f"| {name} | {vqa:.2f} | {same('qa', 'fp32')} | {same('captions', 'fp32')} | {same('qa', 'bf16')} | "
      f"{same('captions', 'bf16')} |")
EOF
done
tar czf "$out/quality.tgz" -C "$answers" .
