"""Training curves in one image: `mmdlm-plot RUN [RUN ...] [-o curves.png]`.

Reads each run's `<output_dir>/metrics.jsonl` (train/metrics.py writes it on rank 0) and draws, over
optimizer steps: the loss (faint: every step; solid: a moving average), the loss per quarter of the
masking ratio t, each module's learning rate, the gradient norm and the tokens per second. Several
runs share the axes, one colour each, to compare them. A step logged twice counts once (the last).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from mmdlm.errors import UserError, report_user_errors


class PlotError(UserError):
    """A run folder without readable metrics."""


def read_metrics(run: Path) -> list[dict]:
    """Return a run's metrics records in step order, one per step (the last one written)."""
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise PlotError(f"{run}: no metrics.jsonl (pass a training output_dir or its metrics.jsonl)")
    by_step = {}
    for number, line in enumerate(path.read_text().splitlines(keepends=True), 1):
        if not line.endswith("\n") or not line.strip():
            continue  # blank, or the line a running training is writing now
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError) as error:
            raise PlotError(f"{path} line {number}: not a metrics record ({error})") from None
    if not by_step:
        raise PlotError(f"{path}: no steps logged yet")
    return [by_step[step] for step in sorted(by_step)]


def moving_average(values: list[float | None], window: int) -> list[float | None]:
    """Return the mean of the last `window` values that are not None at each index (None before the first)."""
    out, recent = [], []
    for value in values:
        if value is not None:
            recent = [*recent[-(window - 1):], value] if window > 1 else [value]
        out.append(sum(recent) / len(recent) if recent else None)
    return out


def next_token_span(records: list[dict]) -> tuple[int, int] | None:
    """Return the first and last step of a run's opening next-token steps (no loss per t logged), if any."""
    diffusion = (k for k, r in enumerate(records) if any(v is not None for v in r.get("loss_by_t") or []))
    first = next(diffusion, len(records))
    return (records[0]["step"], records[first - 1]["step"]) if first else None


def plot(runs: dict[str, list[dict]], window: int = 0):
    """Return the matplotlib Figure of the runs' curves (`window` steps of smoothing; 0: about 2% of a run)."""
    try:
        import matplotlib
    except ImportError as error:
        raise PlotError("drawing the curves needs matplotlib: pip install -e '.[eval]'") from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    loss_ax, by_t_ax, lr_ax, norm_ax, speed_ax, legend_ax = axes.flat
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, records) in enumerate(runs.items()):
        colour, steps = colours[k % len(colours)], [r["step"] for r in records]
        smooth = window or max(1, len(records) // 50)
        loss = [r.get("loss") for r in records]
        loss_ax.plot(steps, loss, color=colour, alpha=0.25, linewidth=0.7)
        loss_ax.plot(steps, moving_average(loss, smooth), color=colour, label=name)
        buckets = max(len(r.get("loss_by_t") or []) for r in records)  # train/metrics.py's T_BUCKETS
        for bucket, style in zip(range(buckets), itertools.cycle(("-", "--", "-.", ":"))):
            values = [(r.get("loss_by_t") or [None] * buckets)[bucket] for r in records]
            if any(v is not None for v in values):
                by_t_ax.plot(steps, moving_average(values, smooth), color=colour, linestyle=style,
                             label=f"{name}: t {bucket / buckets:.2f}-{(bucket + 1) / buckets:.2f}")
        modules = sorted({m for r in records for m in (r.get("lr_by_module") or {})})
        for module, style in zip(modules, ("-", "--", ":", "-.")):
            lr_ax.plot(steps, [(r.get("lr_by_module") or {}).get(module) for r in records], color=colour,
                       linestyle=style, label=f"{name}: {module}")
        next_token = next_token_span(records)
        if next_token:  # the next-token warm-up (ar_warmup_steps): no masking ratio, another loss
            for ax in (loss_ax, norm_ax):
                ax.axvspan(*next_token, color=colour, alpha=0.08, linewidth=0)
        norms = [r.get("grad_norm") for r in records]
        norm_ax.plot(steps, norms, color=colour, alpha=0.25, linewidth=0.7)
        norm_ax.plot(steps, moving_average(norms, smooth), color=colour)
        speed_ax.plot(steps, moving_average([r.get("tokens_per_s") for r in records], smooth), color=colour)
    titles = {loss_ax: "loss (faint: each step; shaded: next-token warm-up)", by_t_ax: "loss per masking ratio t",
              lr_ax: "learning rate", norm_ax: "gradient norm", speed_ax: "tokens / s"}
    for ax, title in titles.items():
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    loss_ax.set_yscale("log")
    by_t_ax.set_yscale("log")
    norm_ax.set_yscale("log")
    legend_ax.axis("off")
    handles = [h for ax in (loss_ax, by_t_ax, lr_ax) for h in ax.get_legend_handles_labels()[0]]
    labels = [lab for ax in (loss_ax, by_t_ax, lr_ax) for lab in ax.get_legend_handles_labels()[1]]
    legend_ax.legend(handles, labels, loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="training output_dir(s) (or their metrics.jsonl)")
    parser.add_argument("-o", "--output", default=None, help="image to write (default: <first run>/curves.png)")
    parser.add_argument("--window", type=int, default=0, help="moving-average steps (default: 2%% of a run)")
    args = parser.parse_args(argv)

    def run() -> int:
        if args.window < 0:
            raise PlotError(f"--window {args.window}: give 0 (automatic) or more")
        paths = [Path(r) for r in args.runs]
        runs = {}
        for path in paths:
            name = path.name if path.is_dir() else path.parent.name
            runs[name if name not in runs else str(path)] = read_metrics(path)
        out = Path(args.output) if args.output else (paths[0] if paths[0].is_dir() else paths[0].parent) / "curves.png"
        fig = plot(runs, args.window)
        fig.savefig(out, dpi=100)
        import matplotlib.pyplot as plt  # (plot() imported it, on the Agg backend)

        plt.close(fig)  # pyplot keeps every figure until it is closed: a caller may plot again
        print(f"training curves: {out}")
        return 0

    return report_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())
