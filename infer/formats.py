"""One test set answered in several weight formats: VQA accuracy, and which answers stay the same.

    python infer/formats.py --model runs/demo/caption/model --world runs/demo/world/test --out answers/
    python infer/formats.py ... --formats bf16,bf16-static     # CUDA graphs against eager, on a GPU

Each format is one infer.py run in this process over WORLD/qa.json and WORLD/captions.json (when
there), with infer.py's defaults, the format's options (FORMATS) and any option this script does not
know (`--gen-length 32`: passed to infer.py as it is); the answers go to
OUT/<format>_<qa|captions>.jsonl. After each format a Markdown row is printed: VQA accuracy, then
how many VQA answers and captions are the same as the first format's and as the second's, with how
many of those also took the same forwards. A format the machine cannot run (fp8 on a CPU), or whose
run fails, prints its error and leaves its cells empty; the next format still runs. CIDEr needs
pycocoevalcap (and Java for it): run evaluate.py on the caption files where that is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mmdlm.errors import report_user_errors
from mmdlm.infer.evaluate import load_predictions, load_references, score
from mmdlm.infer.infer import main as infer

FORMATS = {
    "fp32": ["--dtype", "float32"],
    "bf16": ["--dtype", "bfloat16"],
    "bf16-static": ["--dtype", "bfloat16", "--static"],  # CUDA graphs on a GPU
    "bf16-int8": ["--dtype", "bfloat16", "--quantize", "int8"],
    "bf16-fp8": ["--dtype", "bfloat16", "--quantize", "fp8"],  # compute capability 8.9+
}
TASKS = ("qa", "captions")


def read(path: Path) -> dict[str, tuple[str, int]]:
    """Return {id: (answer, forward passes)} of an infer.py answers file ({} when it was not written)."""
    if not path.is_file():
        return {}
    return {r["id"]: (r["answer"], r["forward_passes"]) for r in map(json.loads, path.read_text().splitlines())}


def same(mine: dict, theirs: dict) -> str:
    """Return 'k/n (m with the same forwards)': answers of `mine` equal to `theirs`."""
    if not mine or not theirs:
        return "-"
    text = sum(answer == theirs.get(key, (None,))[0] for key, (answer, _) in mine.items())
    both = sum(value == theirs.get(key) for key, value in mine.items())
    return f"{text}/{len(mine)} ({both} with the same forwards)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder written by training")
    p.add_argument("--world", required=True, help="folder with qa.json (and captions.json), images beside them")
    p.add_argument("--out", required=True, help="folder for the answers, one JSON-lines file per format and task")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", help="default: infer.py's (cuda when there is one)")
    args, passed = p.parse_known_args(argv)  # the rest goes to infer.py
    formats = args.formats.split(",")
    if unknown := [f for f in formats if f not in FORMATS]:
        p.error(f"--formats: no format {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    world, out = Path(args.world), Path(args.out)
    tasks = [task for task in TASKS if (world / f"{task}.json").is_file()]
    if "qa" not in tasks:
        p.error(f"--world {world}: no qa.json there")
    references = load_references(world / "qa.json")
    out.mkdir(parents=True, exist_ok=True)
    # The static step compiles once per sampler setting and shape (qa and captions, every batch length): more
    # than torch's default of 8 would fall back to eager, and bf16-static would no longer test the CUDA graphs.
    torch._dynamo.config.recompile_limit = 64
    refs = formats[:2]
    head = " | ".join(f"{task} as {ref}" for ref in refs for task in tasks)
    print(f"| format ({world}) | VQA accuracy | {head} |\n|---|---|{'---|' * len(refs) * len(tasks)}", flush=True)
    for name in formats:
        for task in tasks:
            path = out / f"{name}_{task}.jsonl"
            path.unlink(missing_ok=True)
            options = ["--device", args.device] if args.device else []
            command = ["--model", args.model, "--input", str(world / f"{task}.json"), "--output", str(path),
                       "--batch-size", str(args.batch_size), *options, *FORMATS[name], *passed]
            try:
                failed = infer(command) != 0  # a UserError (fp8 on a CPU): one stderr line, exit code 2
            except Exception as error:  # noqa: BLE001 (out of memory, a kernel this GPU lacks): the next format runs
                print(f"error: {name} {task}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                failed = True
            if failed:  # half a file would score as if complete
                path.unlink(missing_ok=True)
        answers = {task: read(out / f"{name}_{task}.jsonl") for task in tasks}
        vqa = f"{score(load_predictions(out / f'{name}_qa.jsonl'), references, 'vqa')['vqa']:.2f}" \
            if answers["qa"] else "-"
        cells = " | ".join(same(answers[task], read(out / f"{ref}_{task}.jsonl")) for ref in refs for task in tasks)
        print(f"| {name} | {vqa} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(report_user_errors(main))  # a references file that cannot be read: one line, exit code 2
