"""The `mmdlm-data` command: `synth` draws the demo world, `check` validates a data set.

    mmdlm-data synth --out DIR --n N --seed S [--world shapes|textures]
    mmdlm-data check PATH [--tokenizer DIR --max-length N --num-image-tokens K]

check exits 0 when clean, 1 when it found problems, 2 when the input cannot be read at all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mmdlm.errors import report_user_errors


def _synth(args: argparse.Namespace) -> int:
    from mmdlm.data.synthetic import WorldOptions, synthesize

    n_val = args.n_val if args.n_val is not None else max(1, args.n // 10)
    n_test = args.n_test if args.n_test is not None else max(1, args.n // 10)
    if args.world == "textures":
        from mmdlm.data.textures import synthesize_textures

        out = synthesize_textures(args.out, args.n, n_test, seed=args.seed, size=args.image_size)
        print(f"wrote {out}: train={args.n} test={n_test} texture images of {args.image_size}px")
        return 0
    options = WorldOptions(noise=args.noise, occlusion=args.occlusion, vocab_size=args.vocab_size)
    start = time.perf_counter()
    out = synthesize(args.out, args.n, n_val, n_test, seed=args.seed, image_size=args.image_size, options=options)
    seconds = time.perf_counter() - start
    print(f"wrote {out}: train={args.n} val={n_val} test={n_test} scenes of {args.image_size}px in {seconds:.1f}s")
    return 0


def model_runs(folder: Path) -> tuple[int | Callable[[tuple[int, int]], int] | None, str | None]:
    """Return (image run length, system prompt) of a model folder: what its collator and infer.py use (the run
    length is a function of the image's size for any-resolution models); (None, None) for a tokenizer folder."""
    config = folder / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("model_type") != "mmdlm":
        return None, None
    import torch

    from mmdlm.multimodal import MMDLM

    with torch.device("meta"):  # the shapes only: no weights read, no memory
        model = MMDLM(MMDLM.config_class.from_pretrained(folder))
    runs = model.num_image_tokens if model.anyres is None else model.image_tokens
    return runs, model.config.system_prompt


def _check(args: argparse.Namespace) -> int:
    from mmdlm.data.check import LengthCheck, check_path

    length = None
    if args.tokenizer or args.max_length:
        if not (args.tokenizer and args.max_length):
            print("error: --tokenizer and --max-length go together", file=sys.stderr)
            return 2
        from mmdlm.data.tokenizer import load_tokenizer

        runs, system = model_runs(Path(args.tokenizer))
        runs = args.num_image_tokens or runs or 64
        length = LengthCheck(load_tokenizer(args.tokenizer), args.max_length, runs, system)
    reports = check_path(args.path, args.image_folder, length)
    for report in reports:
        print("\n".join(report.lines(args.limit)))
    return 1 if any(report.problems for report in reports) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdlm-data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="draw the demo world (splits, shards, tokenizer)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--n", type=int, required=True, help="training scenes")
    synth.add_argument("--n-val", type=int, default=None, help="validation scenes (default n/10)")
    synth.add_argument("--n-test", type=int, default=None, help="test scenes (default n/10)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--world", choices=("shapes", "textures"), default="shapes",
                       help="shapes: the demo world; textures: ten patterns to fine-tune on (train/ and test/ only)")
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--noise", type=float, default=0.03, help="pixel noise std as a fraction of 255")
    synth.add_argument("--occlusion", type=float, default=0.0, help="probability that a shape overlaps a neighbour")
    synth.add_argument("--vocab-size", type=int, default=512, help="size of the demo BPE vocabulary")
    synth.set_defaults(run=_synth)

    check = commands.add_parser("check", help="validate a LLaVA JSON set, a shard set, or a folder of them")
    check.add_argument("path", help="file.json, shard.tar, a brace pattern like docs-{000000..000009}.tar, or a folder")
    check.add_argument("--image-folder", default=None, help="images of a JSON set (default: the JSON's folder)")
    check.add_argument("--tokenizer", default=None,
                       help="tokenizer or model folder, to measure lengths (a model folder adds its system turn)")
    check.add_argument("--max-length", type=int, default=None, help="flag samples longer than this many tokens")
    check.add_argument("--num-image-tokens", type=int, default=None,
                       help="tokens per image run (default: the --tokenizer model folder's, else 64)")
    check.add_argument("--limit", type=int, default=20, help="problem lines to print at most")
    check.set_defaults(run=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0 clean, 1 problems found, 2 unreadable input)."""
    args = build_parser().parse_args(argv)
    return report_user_errors(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
