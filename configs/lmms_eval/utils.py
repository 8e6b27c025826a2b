"""Task functions of the mmdlm VQA tasks (lmms-eval loads them through the YAML files' `!function`).

A document is one entry of a LLaVA JSON split: {"id", "image", "conversations", optional "answers"}.
"""

from __future__ import annotations

from pathlib import Path

from lmms_eval.tasks.vqav2.utils import vqav2_process_results
from PIL import Image


def _turns(doc: dict, role: str) -> list[str]:
    return [t["value"] for t in doc["conversations"] if t["from"] in role.split("|")]


def doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[Image.Image]:
    """Return the entry's images, read from the task's image_folder."""
    folder = Path((lmms_eval_specific_kwargs or {}).get("image_folder", "."))
    paths = doc.get("image") or []
    return [Image.open(folder / p).convert("RGB") for p in ([paths] if isinstance(paths, str) else paths)]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """Return the last question, without its `<image>` placeholders (the model places its images itself)."""
    kwargs = lmms_eval_specific_kwargs or {}
    question = _turns(doc, "human|user")[-1].replace("<image>", "").strip()
    return f"{kwargs.get('pre_prompt', '')}{question}{kwargs.get('post_prompt', '')}"


def references(doc: dict) -> list[str]:
    """Return the entry's reference answers: its "answers" list, else its last gpt turn."""
    return list(doc.get("answers") or _turns(doc, "gpt|assistant")[-1:])


def doc_to_target(doc: dict) -> str:
    return references(doc)[0]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Return {"vqa_accuracy": score} of the answer, by lmms-eval's VQAv2 scorer.

    That scorer takes the VQA set's ten human answers and leaves each out in turn; one reference
    stands for ten equal answers (then the score is an exact match after normalisation, as
    infer/evaluate.py has it). Each answer gets its own id: the scorer leaves out by inequality.
    """
    refs = references(doc)
    refs = refs * 10 if len(refs) == 1 else refs
    vqa_doc = {"question_id": doc.get("id"), "answers": [{"answer": a, "answer_id": k} for k, a in enumerate(refs)]}
    return {"vqa_accuracy": vqav2_process_results(vqa_doc, results)["exact_match"]}


def add_choices(dataset):
    """Return the split with a "choices" column: every answer the split gives to a question of the same type."""
    by_type: dict[str, set[str]] = {}
    for doc in dataset:
        by_type.setdefault(doc.get("question_type"), set()).add(doc_to_target(doc))
    return dataset.map(lambda doc: {"choices": sorted(by_type[doc.get("question_type")])})


def doc_to_choice(doc: dict) -> list[str]:
    return doc["choices"]


def choice_index(doc: dict) -> int:
    return doc["choices"].index(doc_to_target(doc))


def choice_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """Return {"choice_accuracy": 1 or 0}: whether the most likely choice is the reference.

    By argmax of the log-likelihoods: lmms-eval's built-in multiple_choice scoring takes the
    argmin, because its bundled models return a loss there; mmdlm returns log-probabilities, as
    lmms-eval's `loglikelihood` contract says.
    """
    likelihoods = [ll for ll, _ in results]
    return {"choice_accuracy": float(likelihoods.index(max(likelihoods)) == choice_index(doc))}
