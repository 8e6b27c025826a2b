"""Weight files people share: safetensors' `save_file` creates them mode 0600 whatever the umask (it writes a
private temporary file and renames it), so on a shared cluster nobody but the writer could read an exported
or converted model. Every folder of weights this project writes goes through `readable` once written."""

from __future__ import annotations

import os
from pathlib import Path


def readable(folder: Path) -> None:
    """Give the .safetensors files in `folder` the mode the umask gives any new file (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).glob("*.safetensors"):
        os.chmod(path, 0o666 & ~umask)


class ReadableWeights:
    """Mixin before PreTrainedModel: `save_pretrained` leaves weight files as readable as the umask says."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        readable(Path(save_directory))
