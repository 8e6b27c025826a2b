"""Metrics: the VQA normalisation and soft score, exact match, CIDEr, and the command's errors."""

import json

import pytest

from mmdlm.infer.evaluate import caption_tokens, cider, exact_match, main, normalize_answer, score, vqa_score


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("Two dogs!", "2 dogs"),
        ("The Red Circle.", "red circle"),
        ("black/white", "black white"),  # a mark inside a word becomes a space
        ("yes, sir", "yes sir"),  # one touching a space is dropped
        ("1,000 birds", "1000 birds"),  # digit-comma-digit: every mark dropped
        ("1.5", "1.5"),
        ("none", "0"),
        ("dont know", "don't know"),
        ("its well", "its well"),  # spellings that are words of their own stay
        ("  an apple\n", "apple"),
    ],
)
def test_vqa_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


def test_soft_score_averages_leave_one_out_subsets():
    refs = ["2"] * 3 + ["3"] * 7
    # leaving a "2" out leaves 2 matches (2/3), leaving a "3" out leaves 3 (1): (3 * 2/3 + 7) / 10
    assert vqa_score("two", refs) == pytest.approx(0.9)
    assert vqa_score("3", refs) == 1.0
    assert vqa_score("4", refs) == 0.0
    assert vqa_score("Two.", ["2"]) == 1.0 and vqa_score("2 dogs", ["2"]) == 0.0  # one reference: exact match


def test_exact_match_and_score_table():
    assert exact_match("A red circle.", ["red circle", "blue"]) == 1.0
    predictions = {"a": "yes", "b": "no"}
    references = {"a": ["yes"], "b": ["yes"], "c": ["no"]}
    assert score(predictions, references, "vqa") == {"vqa": 50.0}
    assert score(predictions, references, "exact") == {"exact": 50.0}


def test_cider_rewards_consensus():
    refs = {"a": ["a red circle on the left"], "b": ["two blue squares"], "c": ["one green triangle"]}
    perfect, per_item = cider({k: v[0] for k, v in refs.items()}, refs)
    worse, _ = cider({"a": "a red circle", "b": "two green squares", "c": "one green triangle"}, refs)
    # identical text scores 10 on each n-gram order it has (b and c have no 4-grams: 7.5)
    assert per_item == pytest.approx({"a": 10.0, "b": 7.5, "c": 7.5}) and perfect == pytest.approx(25 / 3)
    assert 0 < worse < perfect
    assert caption_tokens("A red, circle.") == "a red circle"


def test_command_scores_files_and_rejects_bad_ones(tmp_path, capsys):
    refs = tmp_path / "qa.json"
    refs.write_text(json.dumps([{"id": "q1", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                {"from": "gpt", "value": "Two"}]},
                                {"id": "q2", "answers": ["red"] * 10}]))
    preds = tmp_path / "answers.jsonl"
    preds.write_text(json.dumps({"id": "q1", "answer": "2"}) + "\n" + json.dumps({"id": "q2", "answer": "blue"}) + "\n")
    assert main(["--predictions", str(preds), "--references", str(refs)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "vqa: 50.00" and captured.err == ""
    preds.write_text(json.dumps({"id": "q2", "answer": "red"}) + "\n")  # a run that stopped after one question
    assert main(["--predictions", str(preds), "--references", str(refs)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "vqa: 100.00" and "note: 1 of the 2 questions answered" in captured.err
    preds.write_text('{"id": "q1"}\n')
    assert main(["--predictions", str(preds), "--references", str(refs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "answers.jsonl line 1" in err[0] and "'answer'" in err[0]
    preds.write_text(json.dumps({"id": "zz", "answer": "x"}))
    assert main(["--predictions", str(preds), "--references", str(refs)]) == 2
    assert "no reference" in capsys.readouterr().err
    preds.write_text(json.dumps({"id": "q2", "answer": "red"}) + "\n" + json.dumps({"id": "q2", "answer": "x"}) + "\n")
    assert main(["--predictions", str(preds), "--references", str(refs)]) == 2
    assert "answers.jsonl line 2: a second answer for id 'q2'" in capsys.readouterr().err
    entries = json.loads(refs.read_text())
    refs.write_text(json.dumps([*entries, {"id": "q1", "answers": ["3"]}]))  # two questions, one id: which scores?
    preds.write_text(json.dumps({"id": "q1", "answer": "2"}) + "\n")
    assert main(["--predictions", str(preds), "--references", str(refs)]) == 2
    assert "qa.json entry id=q1: id 'q1' is also entry #0's" in capsys.readouterr().err


def test_command_scores_each_question_type(tmp_path, capsys):
    def entry(i, kind, answer):
        return {"id": f"q{i}", "question_type": kind, "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": answer}]}

    refs = tmp_path / "qa.json"
    refs.write_text(json.dumps([entry(1, "colour", "red"), entry(2, "colour", "blue"), entry(3, "count", "3")]))
    preds = tmp_path / "answers.jsonl"
    preds.write_text("\n".join(json.dumps({"id": i, "answer": a}) for i, a in [("q1", "red"), ("q2", "red"),
                                                                               ("q3", "three")]))
    assert main(["--predictions", str(preds), "--references", str(refs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["vqa: 66.67", "vqa[colour]: 50.00", "vqa[count]: 100.00"]
