"""Scores for generated answers: VQA accuracy, exact match, and CIDEr for captions.

    python infer/evaluate.py --predictions answers.jsonl --references test/qa.json [--metric auto]

VQA accuracy follows the VQA challenge (EvalAI): both sides normalised (case, punctuation, number
words to digits, articles, contractions), then min(1, matching references / 3) averaged over the
leave-one-out subsets of the references; with a single reference it is exact match after the same
normalisation. One difference from the reference script: it normalises only when the references
disagree, this always does, so "Two." scores against "2" as lmms-eval's processor also has it.
CIDEr is pycocoevalcap's (CIDEr-D) on lowercased, punctuation-stripped whitespace tokens: its PTB
tokenizer needs Java. Its IDF comes from the evaluated references, so tiny sets give noisy CIDEr.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mmdlm.data.llava import entry_id, entry_name, repeated_id
from mmdlm.errors import UserError, report_user_errors

# Punctuation the VQA normaliser removes; "." and "'" are handled apart (decimals, contractions).
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # the reference keeps the dot of "1.5", drops that of "2."
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NUMBERS = {"none": "0"} | {w: str(i) for i, w in enumerate(_NUMBER_WORDS)}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he'll", "he's", "how'd", "how'll", "how's", "i'd",
    "i'd've", "i'll", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "it's", "let's", "ma'am", "mightn't",
    "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd",
    "she'd've", "she'll", "she's", "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'll",
    "somebody's", "someone'd", "someone'll", "someone's", "something'd", "something'll", "something's", "that'd",
    "that's", "there'd", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "wasn't",
    "we'd", "we'd've", "we'll", "we're", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't",
    "would've", "wouldn't", "wouldn't've", "y'all", "y'all'd've", "you'd", "you'd've", "you'll", "you're",
    "you've",
)
# Answers typed without the apostrophe ("dont") are mapped to the written form ("don't"), except where
# that spelling is a word of its own ("its", "well", "were").
_WORDS_TOO = {"hell", "id", "ill", "its", "lets", "shed", "shell", "wed", "well", "were"}
_CONTRACTION_OF = {c.replace("'", ""): c for c in _CONTRACTIONS if c.replace("'", "") not in _WORDS_TOO}


class EvalError(UserError):
    """A predictions or references file that cannot be scored; the message names it and the fix."""


def normalize_answer(text: str) -> str:
    """Return a VQA answer in the challenge's canonical form ("Two dogs!" -> "2 dogs")."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original, keep_glued = text, _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        # A mark touching a space in the original is dropped; one inside a word ("black/white") becomes
        # a space; a digit-comma-digit anywhere makes every mark dropped (the reference's rule).
        dropped = mark + " " in original or " " + mark in original or keep_glued
        text = text.replace(mark, "" if dropped else " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTION_OF.get(w, w) for w in words if w not in _ARTICLES)


def vqa_score(prediction: str, references: list[str]) -> float:
    """Return the VQA accuracy of one answer: soft leave-one-out score, exact match for one reference."""
    if not references:
        raise EvalError("a question has no reference answer")
    answer = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if len(refs) == 1:
        return float(answer == refs[0])
    scores = []
    for left_out in range(len(refs)):
        matches = sum(r == answer for k, r in enumerate(refs) if k != left_out)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def exact_match(prediction: str, references: list[str]) -> float:
    """Return 1.0 when the normalised answer equals any normalised reference."""
    return float(normalize_answer(prediction) in {normalize_answer(r) for r in references})


def caption_tokens(text: str) -> str:
    """Return a caption as lowercase words separated by single spaces, punctuation removed."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def cider(predictions: dict[str, str], references: dict[str, list[str]]) -> tuple[float, dict[str, float]]:
    """Return (corpus CIDEr-D, per-id scores) of `predictions` against `references`, same ids."""
    from pycocoevalcap.cider.cider import Cider

    ids = sorted(predictions)
    gts = {i: [caption_tokens(r) for r in references[i]] for i in ids}
    res = {i: [caption_tokens(predictions[i])] for i in ids}
    corpus, per_item = Cider().compute_score(gts, res)
    return float(corpus), {i: float(s) for i, s in zip(ids, per_item)}


def score(predictions: dict[str, str], references: dict[str, list[str]], metric: str) -> dict[str, float]:
    """Return {metric: value} over the ids of `predictions` (vqa / exact as a percentage, cider as is)."""
    missing = sorted(set(predictions) - set(references))
    if missing:
        raise EvalError(f"{len(missing)} prediction id(s) have no reference, first {missing[0]!r}")
    if not predictions:
        raise EvalError("no predictions to score")
    if metric == "cider":
        return {"cider": cider(predictions, references)[0]}
    fn = vqa_score if metric == "vqa" else exact_match
    return {metric: 100 * sum(fn(predictions[i], references[i]) for i in predictions) / len(predictions)}


def load_references(path: str | Path) -> dict[str, list[str]]:
    """Return {id: reference answers} of a LLaVA JSON set: an entry's "answers" list, else its last gpt turn."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvalError(f"{path}: cannot read the references ({error})") from error
    if not isinstance(entries, list):
        raise EvalError(f"{path}: the top level must be a list of LLaVA entries")
    out, seen = {}, {}
    for index, entry in enumerate(entries):
        repeated = repeated_id(seen, entry, index)
        if repeated:
            raise EvalError(f"{entry_name(path, entry, index)}: {repeated}")
        answers = entry.get("answers") if isinstance(entry, dict) else None
        if answers is None and isinstance(entry, dict):
            turns = [t.get("value") for t in entry.get("conversations", []) if t.get("from") in ("gpt", "assistant")]
            answers = turns[-1:]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise EvalError(f"{entry_name(path, entry, index)}: no reference answer ('answers' list or a gpt turn)")
        out[entry_id(entry, index)] = list(answers)
    return out


def load_types(path: str | Path) -> dict[str, str]:
    """Return {id: question_type} for the entries of a LLaVA JSON set that carry one (the demo world's do)."""
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    return {entry_id(e, i): str(e["question_type"]) for i, e in enumerate(entries) if "question_type" in e}


def load_predictions(path: str | Path) -> dict[str, str]:
    """Return {id: answer} of a JSON-lines file written by infer.py (`{"id", "answer", ...}` per line)."""
    path = Path(path)
    out = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise EvalError(f"{path}: cannot read the predictions ({error})") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, answer = str(row["id"]), str(row["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise EvalError(f"{path} line {number}: expected a JSON object with 'id' and 'answer' ({error})") from error
        if key in out:
            raise EvalError(f"{path} line {number}: a second answer for id {key!r}; keep one answer per question")
        out[key] = answer
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True, help="answers.jsonl written by infer.py --output")
    parser.add_argument("--references", required=True, help="the LLaVA JSON set the questions came from")
    parser.add_argument("--metric", choices=["auto", "vqa", "exact", "cider"], default="auto",
                        help="auto: cider for a captions file (name contains 'caption'), vqa otherwise")
    args = parser.parse_args(argv)
    metric = args.metric
    if metric == "auto":
        metric = "cider" if "caption" in Path(args.references).name else "vqa"

    def run() -> int:
        predictions, references = load_predictions(args.predictions), load_references(args.references)
        result = score(predictions, references, metric)
        if metric != "cider":  # and one line per question type, where the set names them
            types = load_types(args.references)
            for kind in sorted({types[i] for i in predictions if i in types}):
                subset = {i: a for i, a in predictions.items() if types.get(i) == kind}
                result[f"{metric}[{kind}]"] = score(subset, references, metric)[metric]
        for name, value in result.items():
            print(f"{name}: {value:.2f}")
        if len(predictions) < len(references):  # a run that stopped early scores a subset: say so
            print(f"note: {len(predictions)} of the {len(references)} questions answered; the scores are over "
                  "those (infer.py --resume answers the rest)", file=sys.stderr)
        return 0

    return report_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())
