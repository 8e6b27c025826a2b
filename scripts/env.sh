#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: creates .venv with the project installed (editable) when it is
# missing or when pyproject.toml changed since the last install, then activates it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.mmdlm-installed"  # "<sha256 of pyproject.toml> <extras installed>"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
# The extras a command needs: the tests need them all; demo.sh asks for fewer (MMDLM_EXTRAS=eval: no gradio,
# fastapi, playwright, torchao, ruff). torch dominates the install either way (README, Quick start).
extras="${MMDLM_EXTRAS:-dev,lora,eval,serve,quant}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[env] creating $venv (first run installs torch and friends: a few minutes)"
    "${PYTHON:-python3}" -m venv "$venv"
fi
read -r have_hash have_extras 2>/dev/null < "$stamp" || true
[ "${have_hash:-}" = "$want" ] || have_extras=""
union="$(printf '%s\n' ${have_extras//,/ } ${extras//,/ } | sort -u | paste -sd, -)"
if [ "${have_hash:-}" != "$want" ] || [ "$union" != "${have_extras:-}" ]; then
    # pip's notes about this machine's local package mirrors are noise to a user: filter them.
    if ! "$venv/bin/python" -m pip install -q -e "$root[$union]" 2>&1 | { grep -v "ignored: it is neither" || true; }; then
        echo "[env] pip install failed (see above)" >&2
        exit 1
    fi
    echo "$want $union" > "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
# DeepSpeed picks the CPU accelerator where there is no GPU; these keep 2-core runs quiet and sane.
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR=cpu
fi
export TOKENIZERS_PARALLELISM=false
cd "$root"
