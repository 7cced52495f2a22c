#!/usr/bin/env bash
# Run the test suite (CPU, tiny random SAM and CLIP). Sets up .venv first if it is missing, and
# Chromium for the web demo's browser test (tools/setup_browser.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/tools/setup_env.sh"
"$ROOT/tools/setup_browser.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q tests "$@"
