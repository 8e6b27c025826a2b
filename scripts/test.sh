#!/usr/bin/env bash
# The whole test suite (lint + pytest). Creates the virtual environment first when it is missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# The web demo's test drives the system's Chromium (Debian's package): install it where we may.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing chromium for the browser test (apt-get, about a minute)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null ||
        echo "[test] could not install chromium: tests/test_web.py will fail" >&2
fi
ruff check .
python -m pytest tests "$@"
