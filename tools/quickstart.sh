#!/usr/bin/env bash
# The README's main job: set up .venv if needed, then run the offline quickstart.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/tools/setup_env.sh"
cd "$ROOT"
exec "${REGIONSPOT_VENV:-$ROOT/.venv}/bin/python" "$ROOT/tools/quickstart.py" "$@"
