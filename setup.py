"""Installs the `regionspot` package from projects/RegionSpot, with the configs as package data."""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(ROOT, "projects", "RegionSpot", "regionspot")


def packaged_configs():
    """The configs stay at the repository root (configs/), where users and docs look for them;
    the package carries them as regionspot/configs, so `regionspot.model_zoo` works from any
    directory once installed. As detectron2 does for its model zoo: a symlink (so an editable
    install sees edits), or a copy where links are not possible. Returns the package_data globs."""
    source = os.path.join(ROOT, "configs")
    target = os.path.join(PACKAGE, "configs")
    if os.path.isdir(source):  # absent only when building from an unpacked wheel-like tree
        if os.path.islink(target):
            os.unlink(target)
        elif os.path.isdir(target):
            shutil.rmtree(target)  # a stale copy from an earlier build
        try:
            os.symlink(os.path.relpath(source, PACKAGE), target, target_is_directory=True)
        except OSError:
            shutil.copytree(source, target)
    if not glob.glob(os.path.join(target, "*.yaml")):
        raise RuntimeError(f"No configs to ship: {source} is missing or empty.")
    return ["configs/*.yaml", "configs/**/*.yaml"]


setup(
    name="regionspot",
    version="0.1.0",
    description="RegionSpot: recognize any region with frozen SAM + CLIP, as a detectron2 extension",
    license="Apache-2.0",
    package_dir={"": "projects/RegionSpot"},
    packages=find_packages("projects/RegionSpot"),
    # The configs, the quickstart's tiny pretrained encoders (tools/pretrain_tiny_encoders.py),
    # found through regionspot://pretrained/... from any working directory, and the open_clip
    # configs of the tiny test models (CLIP.BACKEND open_clip, CLIP.NAME tiny).
    package_data={"regionspot": packaged_configs() + ["pretrained/*.pth.gz", "modeling/encoders/open_clip_configs/*.json"]},
    # 3.11: the code uses BaseException.add_note.
    python_requires=">=3.11",
    # detectron2 is deliberately not listed: it has no usable PyPI release; install it from source
    # (the official way) or let tools/setup_env.sh install it.
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "numpy",
        "Pillow",
        "segment-anything",
        "openai-clip",  # OpenAI's own CLIP code (import clip); not the `clip` clipboard package
        # openai-clip runs `from pkg_resources import packaging`, and setuptools 82 removed
        # pkg_resources; torch 2.14 needs >= 77.0.3.
        "setuptools>=77.0.3,<82",
        "fvcore",
        "iopath",
        "pycocotools",
        "lvis",
        "tqdm",
    ],
    # Optional backbones (regionspot/utils/extras.py names them in its errors). sam2 is an sdist
    # whose only compiled part is an optional CUDA op: install with SAM2_BUILD_CUDA=0.
    extras_require={
        # selenium drives Chromium in the web demo's browser test (tests/tools/test_web_demo_browser.py).
        "dev": ["pytest", "selenium==4.51.0"],
        "sam2": ["sam2==1.1.0", "hydra-core>=1.3.2"],
        "open_clip": ["open-clip-torch==3.3.0"],
        # tools/web_demo.py; gradio pins its own client (gradio-client==2.7.2, the tests' API driver).
        "web": ["gradio==6.31.0"],
        # tools/export_onnx.py and the onnxruntime predictor (regionspot_deploy, which needs no torch).
        "deploy": ["onnx==1.23.2", "onnxruntime==1.31.1", "onnxscript==0.7.2"],
        # The fast C++ evaluation engine (regionspot/fast_eval.py); without it lvis/pycocotools run.
        "fasteval": ["faster-coco-eval==1.8.0", "orjson==3.13.0"],
    },
)
