"""lmms-eval model `mmdlm`: evaluate a model folder with lmms-eval's own tasks and scorers.

    pip install -e ".[lmms-eval]"
    lmms-eval --model mmdlm --model_args pretrained=runs/demo/caption/model,threshold=0.9 \\
        --tasks mmdlm_demo_vqa --include_path configs/lmms_eval --batch_size 16

lmms-eval finds the class through the package's entry point (group `lmms_eval.models`, see
pyproject.toml), which returns its manifest; no fork of lmms-eval. Requests are answered as
infer.py answers them (same chat prompt, images, sampler): `generate_until` runs the batched
sampler with the task's `max_new_tokens` as the canvas length and cuts the text at the task's
`until` strings; `loglikelihood` is the Monte-Carlo estimate of the masked-diffusion bound
(infer/likelihood.py) of the reply: by default the continuation as the model's whole answer, i.e.
the generation canvas (continuation, end of turn, EOS padding to gen_length), every position of
it masked and scored; `scored=continuation` scores the continuation's tokens alone, right after
the prompt (LLaDA's base-model evaluation). A chat model never saw an answer with nothing after
it: on the fitted tiny model of the tests, the continuation alone put "2" above the fitted
"red", the reply ranked every fitted answer first. Without lmms-eval installed the class still
answers request objects that carry lmms-eval's `args` tuples (the unit tests use that); it is
then not registered anywhere.

model_args: pretrained (the folder), device, dtype (float32 | bfloat16 | float16; default: as
saved), batch_size, gen_length (when the task sets no max_new_tokens), block_length, steps,
threshold (0: LLaDA's fixed steps), cache (auto | none | prefix | block), confidence,
mc_draws / mc_batch_size / seed / scored (the likelihood estimate). A task's generation_kwargs
may set block_length, steps and threshold too; they win over model_args.
"""

from __future__ import annotations

import argparse
import json

import torch
from PIL import Image
from tqdm import tqdm

from mmdlm.errors import UserError
from mmdlm.infer.infer import DTYPES, TASK_DEFAULTS, Answerer, InferError, load_model, sampler_config
from mmdlm.infer.likelihood import LikelihoodConfig, answer_loglikelihood

try:
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # lmms-eval absent: the class still answers requests, unregistered
    _LmmsBase = object

SCORED = ("reply", "continuation")


def manifest():
    """Return lmms-eval's registration of the model `mmdlm` (what the `lmms_eval.models` entry point loads)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mmdlm", simple_class_path=f"{__name__}.MMDLMEval")


class MMDLMEval(_LmmsBase):
    """An mmdlm model folder behind lmms-eval's `lmms` interface (a "simple" model: text prompt + images)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 8, max_batch_size: int | None = None, gen_length: int = 16,
                 block_length: int | None = None, steps: int | None = None, threshold: float = 0.9,
                 cache: str = "auto", confidence: str = "probability", mc_draws: int = 64,
                 mc_batch_size: int = 32, seed: int = 0, scored: str = "reply"):
        super().__init__()
        if scored not in SCORED:
            raise UserError(f"model_args scored={scored!r}: use one of {SCORED}")
        self.scored = scored
        self.task_dict = getattr(self, "task_dict", {})  # lmms-eval's evaluator fills it: task -> split -> docs
        if dtype is not None and dtype not in DTYPES:
            raise UserError(f"model_args dtype={dtype!r}: use one of {sorted(DTYPES)}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_model(pretrained, device, dtype)
        self.answerer = Answerer(model, tokenizer)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # lmms-eval may pass "auto"
        self.defaults = dict(gen_length=int(gen_length), block_length=block_length, steps=steps,
                             threshold=threshold, cache=cache, confidence=confidence)
        self.likelihood = LikelihoodConfig(draws=int(mc_draws), batch_size=int(mc_batch_size), seed=int(seed))
        try:
            self.likelihood.validate()
        except ValueError as error:
            raise UserError(f"model_args: {error}") from error

    def sampler_config(self, gen_kwargs: dict):
        """Return the SamplerConfig of a task's generation_kwargs, model_args filling what it leaves out."""
        options = {**self.defaults, **{k: gen_kwargs[k] for k in ("block_length", "steps", "threshold")
                                        if gen_kwargs.get(k) is not None}}
        gen_length = int(gen_kwargs.get("max_new_tokens") or options["gen_length"])
        block_length = options["block_length"] or TASK_DEFAULTS["vqa"]["block_length"]
        sampled = gen_kwargs.get("do_sample", False) or gen_kwargs.get("temperature")
        args = argparse.Namespace(
            gen_length=gen_length, block_length=min(int(block_length), gen_length),
            steps=None if options["steps"] is None else int(options["steps"]),
            threshold=float(options["threshold"]), factor=None, confidence=options["confidence"],
            cache=options["cache"], no_early_stop=False,
            temperature=float(gen_kwargs.get("temperature") or 0.0) if sampled else 0.0,
        )
        try:
            return sampler_config(args, "vqa", self.answerer)
        except InferError as error:
            raise InferError(f"{error} (max_new_tokens={gen_length}: set block_length in model_args or the "
                             "task's generation_kwargs to a divisor of it)") from error

    def visuals(self, doc_to_visual, doc_id, task, split) -> list[Image.Image]:
        """Return the images of a request's document, as RGB."""
        if doc_to_visual is None:
            return []
        found = doc_to_visual(self.task_dict[task][split][doc_id])
        flat = []
        for item in found if isinstance(found, (list, tuple)) else [found]:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        if not all(isinstance(v, Image.Image) for v in flat):
            kinds = sorted({type(v).__name__ for v in flat if not isinstance(v, Image.Image)})
            raise UserError(f"task {task}: mmdlm answers about images; doc_to_visual gave {kinds}")
        return [v.convert("RGB") for v in flat]

    def generate_until(self, requests) -> list[str]:
        """Return one answer per request: (context, generation_kwargs, doc_to_visual, doc_id, task, split)."""
        groups: dict[str, list[int]] = {}  # requests sharing generation_kwargs share a sampler config
        for k, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(k)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="mmdlm generate_until", disable=getattr(self, "rank", 0) != 0)
        for indexes in groups.values():
            gen_kwargs = dict(requests[indexes[0]].args[1] or {})
            config = self.sampler_config(gen_kwargs)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            for start in range(0, len(indexes), self.batch_size):
                chunk = indexes[start : start + self.batch_size]
                turns = [[{"from": "human", "value": prompt_text(requests[k].args[0])}] for k in chunk]
                images = [self.visuals(*requests[k].args[2:6]) for k in chunk]
                for k, answer in zip(chunk, self.answerer.answer(turns, images, config)):
                    results[k] = cut_at_stops(answer.text, until)
                bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Return (log-probability estimate, is greedy) per request: (context, continuation, doc_to_visual, ...)."""
        answerer = self.answerer
        if answerer.autoregressive:
            raise UserError("loglikelihood: the autoregressive twin has no masked-diffusion bound to estimate")
        results = []
        for request in tqdm(requests, desc="mmdlm loglikelihood", disable=getattr(self, "rank", 0) != 0):
            context, target, *visual = request.args
            images = self.visuals(*visual[:4]) if visual else []  # ("", choice) requests carry no document
            if callable(target):
                doc_to_visual, doc_id, task, split = visual[:4]
                target = target(self.task_dict[task][split][doc_id])
            prompt = answerer.prompt_ids([{"from": "human", "value": prompt_text(context)}], images)
            # The assistant turn starts right after the chat header, as every training answer does: a
            # word-boundary space that harnesses put before a continuation has no place there.
            answer = answerer.chat.text_ids(str(target).lstrip())
            if self.scored == "reply":  # the whole canvas the sampler would fill: end of turn, EOS padding
                answer += [answerer.special.eot]
                answer += [answerer.special.eos] * (self.defaults["gen_length"] - len(answer))
            if len(prompt) + len(answer) > answerer.context:
                raise InferError(f"loglikelihood: prompt ({len(prompt)} tokens, images included) + continuation "
                                 f"({len(answer)}) is over the model's context of {answerer.context}")
            embeds, _ = answerer.prefix([prompt], [images])
            results.append(answer_loglikelihood(answerer.model.lm, embeds, torch.tensor(answer), answerer.special.mask,
                                                self.likelihood, prefix_dlm=answerer.prefix_dlm))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mmdlm answers single-round tasks (generate_until, loglikelihood)")


def prompt_text(context) -> str:
    """Return a request's context as one string (a few tasks pass a list of strings)."""
    return "\n".join(context) if isinstance(context, (list, tuple)) else str(context)


def cut_at_stops(text: str, until: list[str]) -> str:
    """Return `text` up to the first occurrence of any non-empty stop string."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[: min(ends)] if ends else text
