#!/usr/bin/env bash
# The main job on the built-in demo, end to end on one CPU machine:
#   1. draw the demo world (scenes, VQA pairs, captions, shards, tokenizer)
#   2. train the tiny model: tower (per-cell labels), SFT on the questions (projector + LM; no align
#      stage, whose projector, aligned to a random LM, slowed SFT down: see configs/train/demo_sft.yaml),
#      then captions (configs/train/demo_caption.yaml); the demo model is runs/demo/caption/model, and
#      runs/demo/curves.png shows the training curves (mmdlm-plot)
#   3. evaluate VQA accuracy and caption CIDEr on the held-out test split
#   4. draw a fresh scene, answer a question about it and describe it with infer.py
# Creates the virtual environment first when it is missing. Outputs go to runs/demo/.
# MMDLM_DEMO_CAPTIONS=0 skips the caption stage (about 3 minutes on 2 CPU cores): the demo model is then
# runs/demo/sft/model, which answers questions but does not caption.
set -euo pipefail
export MMDLM_EXTRAS="${MMDLM_EXTRAS:-eval}"  # the demo needs no test, server or quantisation packages
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out=runs/demo
mkdir -p "$out"
say() { printf '\n== %s\n' "$*"; }

say "1/4 demo world -> $out/world"
# 20,000 training scenes: with 2,000 the model memorised its training images (training loss 0.14)
# and answered held-out questions at chance.
mmdlm-data synth --out "$out/world" --n 20000 --n-val 200 --n-test 300 --seed 0

say "2/4 training (tower, sft, caption)"
rm -rf "$out/tower" "$out/tower_features" "$out/sft" "$out/caption"
mmdlm-pretrain-tower --config configs/train/demo_tower.yaml
mmdlm-train --config configs/train/demo_sft.yaml
model="$out/sft/model" tasks="qa"
if [ "${MMDLM_DEMO_CAPTIONS:-1}" != 0 ]; then
    mmdlm-train --config configs/train/demo_caption.yaml
    model="$out/caption/model" tasks="qa captions"
fi
mmdlm-plot "$out/sft" $([ "$tasks" = qa ] || echo "$out/caption") -o "$out/curves.png"  # loss, lr, grad norm

say "3/4 evaluation on the held-out test split"
for task in $tasks; do
    python infer/infer.py --model "$model" --input "$out/world/test/$task.json" --output "$out/test_${task}_answers.jsonl" \
        --batch-size 32
    python infer/evaluate.py --predictions "$out/test_${task}_answers.jsonl" --references "$out/world/test/$task.json" \
        | tee "$out/test_${task}_scores.txt"
done

say "4/4 a question and a caption about a freshly drawn image"
mmdlm-data synth --out "$out/fresh" --n 1 --seed 2026 > /dev/null
image="$out/fresh/test/images/$(ls "$out/fresh/test/images" | head -n 1)"
question=$(python -c "import json,sys; e=json.load(open(sys.argv[1]))[0]; print(e['conversations'][0]['value'].replace('<image>','').strip())" "$out/fresh/test/qa.json")
echo "image:    $image"
echo "question: $question"
python infer/infer.py --model "$model" --image "$image" --question "$question"
[ "$tasks" = qa ] || python infer/infer.py --model "$model" --image "$image" --caption
