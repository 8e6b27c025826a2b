"""train/plot.py: a run's metrics.jsonl drawn as curves (one image, several runs on the same axes)."""

import json
import sys

from PIL import Image

from mmdlm.train.plot import main, moving_average, next_token_span, plot, read_metrics


def record(step, loss, by_t=(None, None, None, None), lrs=None):
    return {"step": step, "loss": loss, "lr": 1e-3, "lr_by_module": lrs or {"projector": 5e-4, "lm": 1e-3},
            "grad_norm": 2.0, "loss_by_t": list(by_t), "tokens_per_s": 100.0}


def write(folder, records):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_two_runs_in_one_image(tmp_path, capsys):
    # Run a: two next-token steps, then diffusion; step 3 logged twice (the later line is the one that counts).
    a = write(tmp_path / "a", [record(1, 4.0), record(2, 3.0), record(3, 9.0, (1.0, None, None, None)),
                               record(3, 2.0, (1.0, None, 2.0, None)), record(4, 1.0, (0.5, 0.7, None, 3.0))])
    b = write(tmp_path / "b", [record(s, 5.0 - s, (1.0, 1.0, 1.0, 1.0), {"lm": 1e-3}) for s in (1, 2, 3)])
    with (b / "metrics.jsonl").open("a") as file:
        file.write('{"step": 4, "lo')  # b is still running: its next line is half written
    records = read_metrics(a)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[2]["loss"] == 2.0
    assert next_token_span(records) == (1, 2) and next_token_span(read_metrics(b)) is None
    assert [r["step"] for r in read_metrics(b)] == [1, 2, 3]
    fig = plot({"a": records, "b": read_metrics(b)}, window=1)
    loss_ax, by_t_ax, lr_ax = fig.axes[:3]
    raw = loss_ax.lines[0]
    assert list(raw.get_xdata()) == [1, 2, 3, 4] and list(raw.get_ydata()) == [4.0, 3.0, 2.0, 1.0]
    assert len(lr_ax.lines) == 3  # a: lm, projector; b: lm
    assert len(by_t_ax.lines) == 4 + 4  # a: each quarter logged at some step; b: all four
    out = tmp_path / "curves.png"
    assert main([str(a), str(b / "metrics.jsonl"), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"training curves: {out}"
    with Image.open(out) as image:
        assert image.size == (1600, 850)
    assert main([str(b)]) == 0 and (b / "curves.png").is_file()  # default: beside the first run's metrics


def test_a_folder_without_metrics_is_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path}: no metrics.jsonl (pass a training output_dir or its metrics.jsonl)"]
    (tmp_path / "metrics.jsonl").write_text("")
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl: no steps logged yet" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl line 2: not a metrics record" in capsys.readouterr().err
    assert main([str(tmp_path), "--window", "-1"]) == 2
    assert "--window -1: give 0 (automatic) or more" in capsys.readouterr().err


def test_moving_average_skips_missing_values():
    assert moving_average([None, 1.0, None, 3.0, 5.0], 2) == [None, 1.0, 1.0, 2.0, 4.0]
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]


def test_without_matplotlib_the_error_names_the_extra(tmp_path, capsys, monkeypatch):
    run = write(tmp_path / "run", [record(1, 1.0)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main([str(run)]) == 2
    assert "drawing the curves needs matplotlib: pip install -e '.[eval]'" in capsys.readouterr().err
