"""Every shipped config merges into a RegionSpot config, and RegionSpot's keys live in one place."""
import glob
import os

import pytest
from detectron2.config import CfgNode, get_cfg

from regionspot import add_regionspot_config
from regionspot.config import check_regionspot_config

from conftest import CONFIG_DIR

CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True))


def _flat_keys(node: CfgNode, prefix: str = ""):
    keys = set()
    for k, v in node.items():
        full = f"{prefix}{k}"
        keys.add(full)
        if isinstance(v, CfgNode):
            keys |= _flat_keys(v, full + ".")
    return keys


def test_config_files_are_found():
    # Guards the parametrisation below against silently testing nothing.
    names = {os.path.relpath(p, CONFIG_DIR) for p in CONFIG_FILES}
    assert "Base-RegionSpot.yaml" in names
    assert os.path.join("quickstart", "RegionSpot-tiny_synthetic.yaml") in names
    assert any(n.startswith("lvis_eval" + os.sep) for n in names)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[os.path.relpath(p, CONFIG_DIR) for p in CONFIG_FILES])
def test_every_config_merges(path):
    # merge_from_file raises KeyError on a key the config does not define: stale keys fail here.
    cfg = get_cfg()
    add_regionspot_config(cfg)
    cfg.merge_from_file(path)
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":  # the plug-in configs: RegionSpot as ROI heads
        assert cfg.MODEL.ROI_HEADS.NAME == "RegionSpotROIHeads"
    else:
        assert cfg.MODEL.META_ARCHITECTURE == "RegionSpot"
    check_regionspot_config(cfg)  # its values pass the build-time check
    assert cfg.MODEL.REGIONSPOT.PROMPT in ("gt", "proposals", "sam_auto", "detector")
    if cfg.MODEL.REGIONSPOT.PROMPT == "proposals":
        assert len(cfg.DATASETS.PROPOSAL_FILES_TEST) == len(cfg.DATASETS.TEST)


def test_stale_key_is_refused(tmp_path):
    # The check above is only meaningful if an unknown key does fail the merge.
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  REGIONSPOT:\n    NOT_A_KEY: 1\n")
    cfg = get_cfg()
    add_regionspot_config(cfg)
    with pytest.raises(KeyError, match="NOT_A_KEY"):
        cfg.merge_from_file(str(bad))


def test_new_keys_all_live_under_model_regionspot():
    before = _flat_keys(get_cfg())
    cfg = get_cfg()
    add_regionspot_config(cfg)
    added = _flat_keys(cfg) - before
    assert "MODEL.REGIONSPOT" in added
    stray = sorted(k for k in added if not k.startswith("MODEL.REGIONSPOT"))
    assert not stray, f"keys added outside MODEL.REGIONSPOT: {stray}"
    # A few keys the code reads must exist.
    for key in ("SAM.TYPE", "CLIP.NAME", "AUTOCAST", "PROMPT", "FAST_MASK_PASTE",
                "MISSING_PROPOSALS", "USE_PROPOSAL_SCORE", "SAM_AUTO.POINTS_PER_SIDE"):
        assert f"MODEL.REGIONSPOT.{key}" in added
