"""regionspot.model_zoo: shipped configs by name from any directory, and every entry point
accepting those names."""
import glob
import os

import numpy as np
import pytest
from detectron2.engine import default_argument_parser

import train_net
from regionspot import model_zoo
from regionspot.predictor import RegionSpotPredictor

from conftest import CONFIG_DIR

SHIPPED = sorted(os.path.relpath(p, CONFIG_DIR).replace(os.sep, "/")
                 for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True))


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a directory that has no configs/ folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_list_configs_is_the_config_folder(elsewhere):
    assert model_zoo.list_configs() == SHIPPED and len(SHIPPED) > 10


@pytest.mark.parametrize("name", ["lvis_eval/RegionSpot-BL_lvis-val_glip-t-boxes.yaml",
                                  "configs/lvis_eval/RegionSpot-BL_lvis-val_glip-t-boxes.yaml",
                                  "lvis_eval/RegionSpot-BL_lvis-val_glip-t-boxes"])
def test_get_config_file_by_name(elsewhere, name):
    path = model_zoo.get_config_file(name)
    assert os.path.isabs(path) and os.path.samefile(
        path, os.path.join(CONFIG_DIR, "lvis_eval", "RegionSpot-BL_lvis-val_glip-t-boxes.yaml"))


def test_get_config_follows_base_chain(elsewhere):
    cfg = model_zoo.get_config("lvis_eval/RegionSpot-BL336_lvis-val_gt-boxes.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "RegionSpot"  # from Base-RegionSpot.yaml, two _BASE_ hops up
    assert cfg.MODEL.REGIONSPOT.CLIP.NAME == "ViT-L/14@336px" and cfg.MODEL.REGIONSPOT.CLIP.INPUT_SIZE == 336
    assert not cfg.is_frozen()


def test_unknown_name_lists_the_available_configs(elsewhere):
    with pytest.raises(FileNotFoundError) as e:
        model_zoo.get_config_file("RegionSpot-XL.yaml")
    assert "'RegionSpot-XL.yaml' is not a RegionSpot model-zoo config" in str(e.value)
    assert "lvis_eval/RegionSpot-BB_lvis-val_sam-auto.yaml" in str(e.value)


def test_an_existing_file_wins_over_a_name(elsewhere):
    (elsewhere / "RegionSpot-BL.yaml").write_text('_BASE_: "%s"\nMODEL:\n  DEVICE: "cpu"\n'
                                                  % model_zoo.get_config_file("RegionSpot-BB.yaml"))
    assert model_zoo.resolve_config_file("RegionSpot-BL.yaml") == "RegionSpot-BL.yaml"
    with pytest.raises(FileNotFoundError, match="Config file not found: nope.yaml is neither a file"):
        model_zoo.resolve_config_file("nope.yaml")


def test_predictor_from_a_model_zoo_name(elsewhere):
    predictor = RegionSpotPredictor.from_config_file("quickstart/RegionSpot-tiny_synthetic.yaml", weights="",
                                                     opts=["MODEL.DEVICE", "cpu"])
    assert predictor.model.device.type == "cpu"
    predictor.set_image(np.full((64, 80, 3), 120, dtype=np.uint8))
    result = predictor.predict(boxes=[[5, 5, 40, 50]], vocabulary=["a", "b"])
    assert result.class_names[0] in ("a", "b") and result.masks.shape == (1, 64, 80)


def test_train_net_setup_from_a_model_zoo_name(elsewhere):
    args = default_argument_parser().parse_args(
        ["--config-file", "quickstart/RegionSpot-tiny_synthetic.yaml", "OUTPUT_DIR", str(elsewhere / "out")])
    cfg = train_net.setup(args)
    assert cfg.MODEL.REGIONSPOT.SAM.TYPE == "tiny"
    assert os.path.isfile(args.config_file)  # resolved, so default_setup could log it
    assert os.path.isfile(elsewhere / "out" / "config.yaml")
