"""RegionSpot's shipped configs by name, from any directory, as `detectron2.model_zoo` does it.

    from regionspot import model_zoo
    cfg = model_zoo.get_config("lvis_eval/RegionSpot-BL_lvis-val_glip-t-boxes.yaml")

Names are paths relative to the repository's `configs/` (see `regionspot.utils.config_files`,
which finds them).
"""
from detectron2.config import CfgNode

from .config import get_regionspot_cfg
from .utils.config_files import config_root, get_config_file, list_configs, resolve_config_file

__all__ = ["config_root", "get_config", "get_config_file", "list_configs", "resolve_config_file"]


def get_config(name: str) -> CfgNode:
    """A detectron2 config with RegionSpot's keys and the shipped config `name` merged (not frozen)."""
    return get_regionspot_cfg(get_config_file(name))
