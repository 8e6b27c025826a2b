"""mmdlm: multimodal masked-diffusion vision-language models.

Importing the package registers its model types with transformers' Auto classes ("mmdlm": the
whole model, "mmdlm_lm": the language model alone), so that after `import mmdlm`,
`AutoConfig.from_pretrained(folder)` and `AutoModel.from_pretrained(folder)` load a model folder.
"""

from mmdlm.model import DiffusionLM, DLMConfig
from mmdlm.multimodal import MMDLM, MMDLMConfig  # importing them registers both model types

__all__ = ["MMDLM", "MMDLMConfig", "DiffusionLM", "DLMConfig"]
