"""mmdlm: multimodal masked-diffusion language models (LLaDA-V family).

The repository's top-level folders install as one package (pyproject's `package-dir`), so each
folder's import name is `mmdlm.<folder>`:

    mmdlm/     -> mmdlm            model, multimodal, diffusion loss, sampler, cache, configs
    encoders/  -> mmdlm.encoders   vision towers, projector, image processing
    data/      -> mmdlm.data       demo world, LLaVA JSON, shards, tokenizer, template, collator
    train/     -> mmdlm.train      DeepSpeed training, checkpoints, export
    infer/     -> mmdlm.infer      answering, evaluation, benchmarks, server, web demo, lmms-eval plugin

The design card keeps the folders at the top level; the mapping keeps generic names such as
`data` and `train` out of site-packages.

Importing the package registers its model types with transformers' Auto classes ("mmdlm": the
whole model, "mmdlm_lm": the language model alone), so that after `import mmdlm`,
`AutoConfig.from_pretrained(folder)` and `AutoModel.from_pretrained(folder)` load a model folder.
"""

import logging

# transformers imports torchao (the `quant` extra) whenever it is installed, and torchao's import makes torch
# log two deprecation notes about torchao's own code on every command: nothing a user can act on.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from mmdlm.model import DiffusionLM, DLMConfig  # noqa: E402
from mmdlm.multimodal import MMDLM, MMDLMConfig  # noqa: E402 (importing them registers both model types)

__all__ = ["MMDLM", "MMDLMConfig", "DiffusionLM", "DLMConfig"]
