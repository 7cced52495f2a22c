#!/usr/bin/env bash
# Runs the README's offline shell examples as written (the quickstart first, when its trained head
# is missing), so they cannot go stale. The predictor example (README.md, continued in
# docs/GETTING_STARTED.md) is run by tests/test_predictor.py.
#   ./tools/check_readme.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/tools/setup_env.sh"
[ -f output/quickstart/model_final.pth ] || ./tools/quickstart.sh
# The block after "# Offline, after the quickstart" in the README's Demo section, up to its fence.
script="$(awk '/^# Offline, after the quickstart/{on=1; next} on && /^```/{exit} on' README.md)"
[ -n "$script" ] || { echo "check_readme.sh: no offline demo example found in README.md" >&2; exit 1; }
echo "$script" >&2
PATH="$ROOT/.venv/bin:$PATH" bash -euo pipefail -c "$script"
python_ok="$("$ROOT/.venv/bin/python" -c "import json; r = json.load(open('output/results.json')); print(len(r))")"
[ "$python_ok" -gt 0 ] || { echo "check_readme.sh: the demo wrote no detections" >&2; exit 1; }
echo "check_readme.sh: README offline examples ran ($python_ok detections in output/results.json)" >&2
