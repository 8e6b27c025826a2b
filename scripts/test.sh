#!/usr/bin/env bash
# The whole test suite (lint + pytest). Creates the virtual environment first when it is missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ruff check .
python -m pytest tests "$@"
