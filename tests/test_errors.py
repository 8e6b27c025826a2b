"""Every command's main: a UserError (config, data, inference, evaluation) is one line and exit code 2; anything
else is a bug and keeps its traceback."""

import importlib
import json
from pathlib import Path

import pytest
import torch

from mmdlm.config import ConfigError
from mmdlm.data.errors import DataError
from mmdlm.errors import UserError, report_user_errors
from mmdlm.infer.evaluate import EvalError
from mmdlm.infer.infer import InferError
from mmdlm.train.metrics import TrainingDiverged

# (module with main, the function main's work goes through, argv)
COMMANDS = [
    ("mmdlm.train.train", "train", ["--config", "configs/train/demo_sft.yaml"]),
    ("mmdlm.infer.infer", "run", ["--model", "m", "--image", "a.png", "--question", "Q?"]),
    ("mmdlm.infer.evaluate", "load_predictions", ["--predictions", "p", "--references", "r"]),
    ("mmdlm.infer.benchmark", "with_model", ["--model", "m", "--data", "d"]),
    ("mmdlm.data.cli", "_check", ["check", "x.json"]),
    ("mmdlm.llada", "load_llada", ["src", "dst"]),
    ("mmdlm.train.export", "export_checkpoint", ["--run", "r"]),
    ("mmdlm.train.estimate", "shape_of", []),
]


def test_every_user_error_class_derives_from_one_base():
    for cls in (ConfigError, DataError, InferError, EvalError, TrainingDiverged):
        assert issubclass(cls, UserError)


def patched(monkeypatch, module_name: str, attr: str, error: Exception):
    module = importlib.import_module(module_name)

    def fail(*args, **kwargs):
        raise error

    if module_name == "mmdlm.data.cli":  # the subcommand is bound by argparse: patch the parser's default
        build = module.build_parser

        def parser():
            p = build()
            p._subparsers._group_actions[0].choices["check"].set_defaults(run=fail)
            return p

        monkeypatch.setattr(module, "build_parser", parser)
    else:
        monkeypatch.setattr(module, attr, fail)
    if module_name == "mmdlm.train.train":
        monkeypatch.setattr(module, "parse_args", lambda argv: (None, False))
    return module.main


@pytest.mark.parametrize("module_name, attr, argv", COMMANDS)
def test_a_user_error_is_one_line_and_exit_2(monkeypatch, capsys, module_name, attr, argv):
    main = patched(monkeypatch, module_name, attr, DataError("qa.json entry id=3: image 'a.png' not found"))
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: qa.json entry id=3: image 'a.png' not found\n"


@pytest.mark.parametrize("module_name, attr, argv", COMMANDS)
def test_a_bug_keeps_its_traceback(monkeypatch, module_name, attr, argv):
    # A ValueError from inside the model (a shape bug) is not the user's fault: it propagates.
    main = patched(monkeypatch, module_name, attr, ValueError("shape [4, 16] does not match [4, 17]"))
    with pytest.raises(ValueError, match=r"shape \[4, 16\]"):
        main(argv)


def test_a_diverged_run_exits_3(monkeypatch, capsys):
    main = patched(monkeypatch, "mmdlm.train.train", "train", TrainingDiverged("3 non-finite losses in a row"))
    assert main([]) == 3 and capsys.readouterr().err == "error: 3 non-finite losses in a row\n"


def test_real_bad_input_is_one_line(tmp_path, capsys):
    """Not patched: a bad config key, a missing checkpoint, a missing model YAML, a broken converter input."""
    from mmdlm.llada import main as convert
    from mmdlm.train.estimate import main as estimate
    from mmdlm.train.export import main as export
    from mmdlm.train.train import main as train

    turns = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    (tmp_path / "qa.json").write_text(json.dumps([{"id": "0", "conversations": turns}]))
    cases = [
        (train, ["--config", "configs/train/demo_sft.yaml", "--set", "optim.lrr=1"], "unknown key(s) ['lrr']"),
        (export, ["--run", str(tmp_path)], "no complete checkpoint"),
        (estimate, ["--model", str(tmp_path / "nope.yaml")], "config file not found"),
        (convert, [str(tmp_path), str(tmp_path / "out")], "no config.json"),
        (train, ["--config", "configs/train/finetune.yaml", "--set", "init_from=runs/nope/model", "--set",
                 f"output_dir={tmp_path / 'run'}", "--set", f"data.json=[{tmp_path / 'qa.json'}]"],
         f"init_from=runs/nope/model (relative to {Path.cwd()}) is not a model folder"),
    ]
    for main, argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


class Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        if index == 1:
            raise DataError("qa.json entry id=1: image 'b.png' unreadable (cannot identify image file 'b.png')")
        return index


def test_an_error_from_a_dataloader_worker_is_its_own_one_line(capsys):
    """PyTorch re-raises a worker's error as "Caught DataError in DataLoader worker process 0." + the worker's
    traceback: the one line printed is the worker's message."""

    def command():
        list(torch.utils.data.DataLoader(Failing(), batch_size=1, num_workers=1))

    assert report_user_errors(command) == 2
    assert capsys.readouterr().err == ("error: qa.json entry id=1: image 'b.png' unreadable (cannot identify image "
                                       "file 'b.png')\n")
