"""Installs the `regionspot` package from projects/RegionSpot."""
from setuptools import find_packages, setup

setup(
    name="regionspot",
    version="0.1.0",
    description="RegionSpot: recognize any region with frozen SAM + CLIP, as a detectron2 extension",
    package_dir={"": "projects/RegionSpot"},
    packages=find_packages("projects/RegionSpot"),
    # The quickstart's tiny pretrained encoders (tools/pretrain_tiny_encoders.py), found through
    # regionspot://pretrained/... from any working directory.
    package_data={"regionspot": ["pretrained/*.pth.gz"]},
    python_requires=">=3.9",
    # detectron2 is deliberately not listed: it has no usable PyPI release
    # (see README, "Installing detectron2"); tools/setup_env.sh installs it.
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "segment-anything",
        "openai-clip",  # OpenAI's own CLIP code (import clip); not the `clip` clipboard package
        "fvcore",
        "iopath",
        "pycocotools",
        "lvis",
        "tqdm",
    ],
)
