"""Where RegionSpot's shipped configs are, and how a --config-file argument finds one.

The configs live at the repository root (`configs/`). An installed package carries them as
`regionspot/configs` (setup.py links or copies them there); a source checkout used through
PYTHONPATH reads the root folder itself. Names are paths relative to `configs/`, and `_BASE_`
links resolve because the folder is kept whole. `regionspot.model_zoo` re-exports these and adds
`get_config`; `regionspot.config` reads config files through `resolve_config_file`.
"""
import os
from typing import List

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # regionspot/
# The installed copy first, then the source checkout's root configs/ (projects/RegionSpot/regionspot/ -> ../../..).
_CANDIDATE_ROOTS = (os.path.join(_PACKAGE, "configs"), os.path.join(_PACKAGE, "..", "..", "..", "configs"))
_MARKER = "Base-RegionSpot.yaml"  # every config inherits from it, so a real config root has it


def config_root() -> str:
    """The folder holding the shipped configs."""
    for root in _CANDIDATE_ROOTS:
        if os.path.isfile(os.path.join(root, _MARKER)):
            return os.path.normpath(root)
    raise FileNotFoundError(
        f"RegionSpot's configs are not installed (looked for {_MARKER} in "
        f"{', '.join(os.path.normpath(r) for r in _CANDIDATE_ROOTS)}): reinstall with `pip install .` "
        "from a clone, which ships configs/ as package data."
    )


def list_configs() -> List[str]:
    """Every shipped config name (path relative to configs/, '/' separated), sorted."""
    root = config_root()
    names = []
    for folder, _dirs, files in os.walk(root, followlinks=True):
        for f in files:
            if f.endswith(".yaml"):
                names.append(os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/"))
    return sorted(names)


def _normalise(name: str) -> str:
    name = name.replace("\\", "/")
    if name.startswith("configs/"):  # the path as written in the README, from the clone's root
        name = name[len("configs/"):]
    if not name.endswith(".yaml"):
        name += ".yaml"
    return name


def get_config_file(name: str) -> str:
    """The absolute path of a shipped config, e.g. "RegionSpot-BL.yaml" or
    "lvis_eval/RegionSpot-BL_lvis-val_glip-t-boxes.yaml" (a leading "configs/" and the ".yaml"
    may be given or left out)."""
    rel = _normalise(name)
    path = os.path.join(config_root(), *rel.split("/"))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{name!r} is not a RegionSpot model-zoo config. Available: {', '.join(list_configs())}."
        )
    return path


def resolve_config_file(config_file: str) -> str:
    """`config_file` itself if that file exists, else the model-zoo config of that name.

    This is how every entry point (train_net.py, the tools, `RegionSpotPredictor.from_config_file`)
    reads its --config-file, so "RegionSpot-BL.yaml" works from any directory."""
    if os.path.isfile(config_file):
        return config_file
    try:
        return get_config_file(config_file)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"Config file not found: {config_file} is neither a file nor a model-zoo config name. {e}"
        ) from None
