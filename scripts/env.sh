#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: creates .venv with the project installed (editable) when it is
# missing or when pyproject.toml changed since the last install, then activates it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.mmdlm-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    echo "[env] creating $venv (first run installs torch and friends: a few minutes)"
    "${PYTHON:-python3}" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # pip's notes about this machine's local package mirrors are noise to a user: filter them.
    if ! "$venv/bin/python" -m pip install -q -e "$root[dev,lora,eval,serve,quant]" 2>&1 | { grep -v "ignored: it is neither" || true; }; then
        echo "[env] pip install failed (see above)" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
# DeepSpeed picks the CPU accelerator where there is no GPU; these keep 2-core runs quiet and sane.
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR=cpu
fi
export TOKENIZERS_PARALLELISM=false
cd "$root"
