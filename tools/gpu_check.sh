#!/usr/bin/env bash
# One GPU speed check of the --eval-only path (tools/gpu_check.py: tools/benchmark.py --pipeline
# --roofline at 12 and 300 boxes, bf16/fp32, eager/compiled, batch sizes, loader workers; the
# 300-box path with masks also --evaluate: RLE on the device, results shards, final evaluation), in two
# steps for a GPU machine that has Python 3.12 and torch but no package index:
#
#   tools/gpu_check.sh prepare [--list]     # where pip reaches the registry: the wheels the GPU
#                                           # machine lacks -> .gpu_wheels/ (git-ignored, ~12 MB)
#   tools/gpu_check.sh run OUTDIR           # on the GPU machine: installs .gpu_wheels into a temporary
#                                           # folder, measures within a 420 s budget (--budget; about
#                                           # 8 min in all), writes OUTDIR/gpu_check.json and .md
#   tools/gpu_check.sh run OUTDIR --dry-run # the same on the CPU with tiny SAM and CLIP (tests; no
#                                           # time budget: its work is 4 small images per configuration)
#   Then OUTDIR/tensorrt/: TensorRT fp16 engines of the exported ONNX graphs (tools/tensorrt_check.py)
#
# With the device tool:
#   run(command="bash tools/gpu_check.sh run $OUT", carry=[".gpu_wheels"], timeout_s=540)
#
# Environment: PYTHON (prepare: .venv's python, run: python3), GPU_WHEELS (folder, default
# .gpu_wheels), GPU_PYTHON_VERSION (the GPU machine's Python, default 3.12).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${GPU_WHEELS:-$ROOT/.gpu_wheels}"
PYVER="${GPU_PYTHON_VERSION:-3.12}"
# The GPU machine already has torch, torchvision, opencv, matplotlib, pillow, scipy, tqdm, tabulate,
# tensorboard, cloudpickle, portalocker, regex, einops and timm. Versions are tools/setup_env.sh's.
# PyYAML and setuptools<81 are carried in case its own are missing or lack pkg_resources (clip).
BINARY=(segment-anything==1.0 lvis==0.5.3 yacs==0.1.8 termcolor==3.3.0 omegaconf==2.3.1
        hydra-core==1.3.8 ftfy==6.3.1 wcwidth==0.9.4 pycocotools==2.0.11 PyYAML==6.0.4 setuptools==80.10.2)
# The fast evaluation engine (extra fasteval): a manylinux_2_28 wheel, installed apart and allowed
# to fail (an older glibc): the evaluation then runs on the lvis package, with the same figures.
OPTIONAL=(faster-coco-eval==1.8.0)
# Published as sdists only (pure Python): built here into py3-none-any wheels.
SDIST=(openai-clip==1.0.1 fvcore==0.1.5.post20221221 iopath==0.1.10 antlr4-python3-runtime==4.9.3)
# detectron2 by tools/setup_env.sh's route: sal-detectron2's cp310 wheel, renamed py3-none-any
# (its Python sources are version independent; its cp310 _C is not needed).
D2=sal-detectron2==0.7.2

die() { echo "gpu_check: $*" >&2; exit 1; }

prepare() {
  if [ "${1:-}" = "--list" ]; then
    echo "into $WHEELS, for cp${PYVER/./} manylinux x86_64:"
    printf '  wheel: %s\n' "${BINARY[@]}"
    printf '  built from sdist: %s\n' "${SDIST[@]}"
    echo "  renamed py3-none-any: $D2"
    printf '  optional wheel: %s\n' "${OPTIONAL[@]}"
    return
  fi
  local py="${PYTHON:-$ROOT/.venv/bin/python}" tmp="$WHEELS.partial"
  [ -x "$py" ] || py=python3
  rm -rf "$tmp" && mkdir -p "$tmp/built" "$tmp/d2"
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
      --python-version "$PYVER" -d "$tmp" "${BINARY[@]}"
  mkdir -p "$tmp/optional"
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
      --platform manylinux_2_28_x86_64 --python-version "$PYVER" -d "$tmp/optional" "${OPTIONAL[@]}"
  "$py" -m pip wheel --quiet --no-deps -w "$tmp/built" "${SDIST[@]}"
  for f in "$tmp"/built/*.whl; do
    case "$f" in *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$f" "$tmp/" ;; *) die "not pure Python: $f" ;; esac
  done
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp/d2" "$D2"
  mv "$tmp"/d2/sal_detectron2-0.7.2-cp310-none-any.whl "$tmp"/sal_detectron2-0.7.2-py3-none-any.whl
  rmdir "$tmp/built" "$tmp/d2"
  rm -rf "$WHEELS" && mv "$tmp" "$WHEELS"
  ls -l "$WHEELS"
  echo "gpu_check: $(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS"
}

run() {
  [ $# -ge 1 ] || die "usage: tools/gpu_check.sh run OUTDIR [--dry-run] [--budget SECONDS]"
  local py="${PYTHON:-python3}" out="$1"
  shift
  "$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null \
    || die "$py has no torch: set PYTHON to the interpreter that has it"
  # Found without importing them (cheap); pkg_resources (setuptools<81) is what clip imports.
  if ! "$py" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
      detectron2 segment_anything clip lvis fvcore iopath pycocotools omegaconf hydra pkg_resources 2>/dev/null; then
    [ -d "$WHEELS" ] || die "$py lacks detectron2 & co. and there is no $WHEELS: run 'tools/gpu_check.sh prepare' where pip reaches the registry, and carry that folder"
    TARGET="$(mktemp -d)"  # global: the trap runs after this function has returned
    trap 'rm -rf "$TARGET"' EXIT
    if "$py" -m pip --version >/dev/null 2>&1; then
      "$py" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$TARGET" "$WHEELS"/*.whl
      if [ -d "$WHEELS/optional" ]; then
        "$py" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$TARGET" \
            "$WHEELS"/optional/*.whl || echo "gpu_check: faster-coco-eval not installed; the lvis package evaluates" >&2
      fi
    else  # no pip: a wheel is a zip of the files to put on the path
      "$py" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$TARGET" "$WHEELS"/*.whl
    fi
    export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # Our package from the working tree, ahead of any installed copy.
  export PYTHONPATH="$ROOT/projects/RegionSpot${PYTHONPATH:+:$PYTHONPATH}"
  "$py" "$ROOT/tools/gpu_check.py" "$out" "$@"
  # TensorRT fp16 engines of the exported graphs beside PyTorch (tools/tensorrt_check.py; planned
  # only, and said so, where TensorRT is not installed or with --dry-run).
  "$py" "$ROOT/tools/tensorrt_check.py" "$out/tensorrt" "$@"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) shift; run "$@" ;;
  *) die "usage: tools/gpu_check.sh prepare [--list] | run OUTDIR [--dry-run] [--budget SECONDS]" ;;
esac
