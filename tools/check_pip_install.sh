#!/usr/bin/env bash
# Check that `pip install -e .` and `pip install .` work in an environment that already has
# detectron2 and the rest of the stack (a user's own environment), offline.
#
# The user's environment is stood in for by the project's .venv (or $PYTHON's environment): a new,
# empty venv sees its packages through a path file, as if they were installed there. pip then runs
# with --no-index, so every requirement in setup.py must be met by what is installed (a missing
# or excluded version, e.g. setuptools 82, fails here), and --no-build-isolation, so the build
# uses the installed setuptools instead of downloading one. Nothing is installed into .venv
# itself: pip leaves distributions outside the new venv alone. Then, from an unrelated directory,
# `import regionspot` must come from the right place and `regionspot.model_zoo` must read a config
# through its _BASE_ chain.
#
#   tools/check_pip_install.sh            # uses .venv/bin/python
#   PYTHON=/path/to/env/bin/python tools/check_pip_install.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_PY="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

SITE="$("$ENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
BASE_PY="$("$ENV_PY" -c 'import sys; print(sys._base_executable)')"
mkdir -p "$WORK/elsewhere"

check() {  # check <venv> <expected location of regionspot>
  (cd "$WORK/elsewhere" && PYTHONWARNINGS=ignore "$1/bin/python" - "$2" <<'EOF'
import os, sys
import regionspot
from regionspot import model_zoo
where = os.path.realpath(regionspot.__file__)
assert where.startswith(os.path.realpath(sys.argv[1])), f"regionspot imported from {where}, not {sys.argv[1]}"
cfg = model_zoo.get_config("lvis_eval/RegionSpot-BL_lvis-val_glip-t-boxes.yaml")
assert cfg.MODEL.META_ARCHITECTURE == "RegionSpot" and cfg.MODEL.REGIONSPOT.CLIP.NAME == "ViT-L/14", cfg.MODEL
print(f"  ok: regionspot from {where}; {len(model_zoo.list_configs())} model-zoo configs from "
      f"{model_zoo.config_root()}")
EOF
  )
}

for mode in editable regular; do
  VENV="$WORK/venv-$mode"
  "$BASE_PY" -m venv --without-pip "$VENV"
  VSITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$SITE" > "$VSITE/user_environment.pth"  # the user's packages (detectron2, torch, ...)
  if [ "$mode" = editable ]; then args=(-e "$ROOT"); expect="$ROOT"; else args=("$ROOT"); expect="$VSITE"; fi
  echo "[check_pip_install] pip install ${args[*]} (offline, into a venv on top of $SITE)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-build-isolation \
      "${args[@]}"
  check "$VENV" "$expect"
done
echo "[check_pip_install] both installs work"
