#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv with the pinned stack.
#
# Why a script: detectron2 has no usable PyPI distribution for Python 3.11
# (see docs/INSTALL.md), so a plain `pip install -e .` is not
# enough on a machine without GitHub access. This script is idempotent: when
# .venv already imports everything it returns at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REGIONSPOT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.regionspot-env-v3"

if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import regionspot, detectron2, segment_anything, clip, lvis, sam2, open_clip, gradio, selenium, onnxruntime, faster_coco_eval" 2>/dev/null; then
  exit 0
fi

echo "[setup_env] creating $VENV (a few minutes on first run)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off)
"${PIP[@]}" --upgrade pip wheel "setuptools>=77.0.3,<81"
# Pin both: an unpinned torch may pull a newer multi-GB CUDA build.
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1

# detectron2's run-time needs (and ours) first: so the resolver never weighs them against the
# fallback wheel's numpy<2 pin below (that pin exists only for its compiled ops, which cannot
# load on this Python anyway; its Python code works with numpy 2).
"${PIP[@]}" pycocotools matplotlib termcolor yacs tabulate cloudpickle tqdm tensorboard \
    "omegaconf>=2.1,<2.4" "hydra-core>=1.1" fvcore iopath opencv-python-headless \
    segment-anything==1.0 openai-clip==1.0.1 lvis==0.5.3 ftfy regex pytest
# The optional backbones (setup.py's extras sam2 and open_clip), so the tests cover them. sam2 is
# an sdist: SAM2_BUILD_CUDA=0 skips its optional CUDA op, and --no-build-isolation builds it
# against the torch above (an isolated build would fetch another multi-GB torch).
SAM2_BUILD_CUDA=0 "${PIP[@]}" --no-build-isolation sam2==1.1.0 "hydra-core>=1.3.2" open-clip-torch==3.3.0
# The web demo (extra web: gradio, which brings gradio_client) and its browser test's driver (selenium).
# Pillow pinned too (gradio allows < 13): the quickstart's synthetic images are drawn with it, so its
# printed figures stay the README's.
"${PIP[@]}" gradio==6.31.0 selenium==4.51.0 pillow==12.3.0
# ONNX export and its check (extra deploy), and the faster LVIS/COCO evaluator (extra fasteval).
"${PIP[@]}" onnx==1.23.2 onnxruntime==1.31.1 onnxscript==0.7.2 faster-coco-eval==1.8.0 orjson==3.13.0
# Every install that runs pip's resolver is above; only --no-deps installs follow. pip re-checks the
# whole environment after each resolver run, and would report the fallback wheel's numpy<2 and
# black pins as an "ERROR: pip's dependency resolver ..." line had it come earlier.
if ! "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  # Fallback route: upstream detectron2 0.7.2 re-uploaded as sal-detectron2 (a
  # cp310 wheel whose Python sources are version independent). We install it
  # without deps (its needs are installed above). A user who installed
  # detectron2 from source never reaches this branch.
  WHEELDIR="$(mktemp -d)"
  "$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: \
      --python-version 3.10 -d "$WHEELDIR" sal-detectron2==0.7.2
  cp "$WHEELDIR"/sal_detectron2-0.7.2-cp310-none-any.whl "$WHEELDIR"/sal_detectron2-0.7.2-py3-none-any.whl
  "${PIP[@]}" --no-deps "$WHEELDIR"/sal_detectron2-0.7.2-py3-none-any.whl
  rm -rf "$WHEELDIR"
fi
"${PIP[@]}" --no-deps -e "$ROOT"
touch "$STAMP"
echo "[setup_env] ready: $VENV" >&2
