"""Shared fixtures: tiny random SAM and CLIP, and a synthetic LVIS-format dataset in a temp folder."""
import os
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # train_net.py is importable from tests (load tools/ scripts by path)

warnings.filterwarnings("ignore", category=UserWarning, module="clip")
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from detectron2.config import get_cfg  # noqa: E402

import regionspot  # noqa: E402,F401
from regionspot import add_regionspot_config  # noqa: E402
from regionspot.synthetic import make_synthetic_lvis, register_synthetic_lvis  # noqa: E402

CONFIG_DIR = os.path.join(ROOT, "configs")
# Unit tests use the quickstart model with *random* tiny encoders (fast, and independent of the
# shipped pretrained files); tests of the quickstart itself use its own config.
TINY_CONFIG = os.path.join(CONFIG_DIR, "quickstart", "RegionSpot-tiny-random_synthetic.yaml")
QUICKSTART_CONFIG = os.path.join(CONFIG_DIR, "quickstart", "RegionSpot-tiny_synthetic.yaml")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own text-embedding cache, so cache hits are never inherited."""
    monkeypatch.setenv("REGIONSPOT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)


def tiny_cfg(*opts):
    """A frozen config of the tiny quickstart model on the CPU, plus `opts`."""
    cfg = get_cfg()
    add_regionspot_config(cfg)
    cfg.merge_from_file(TINY_CONFIG)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def synthetic_val(synthetic_root):
    """A registered 6-image synthetic LVIS-format set: its dataset name."""
    name = "test_synthetic_val"
    json_path = make_synthetic_lvis(synthetic_root, "val", num_images=6, seed=3)
    register_synthetic_lvis(name, json_path, synthetic_root)
    return name
