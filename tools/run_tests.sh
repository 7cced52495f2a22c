#!/usr/bin/env bash
# Run the test suite (CPU, tiny random SAM and CLIP). Sets up .venv first if it is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/tools/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q tests "$@"
