"""LazyConfig overrides on train_net.py's command line are checked before anything runs, as the
yacs route does: an unknown (misspelled) key and a value of the wrong type are refused, naming
the key and the value; keys that the built object takes, and +key=value, are still accepted."""
import os

import pytest
from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser

import train_net
from regionspot.utils.lazy_overrides import check_overrides

from conftest import CONFIG_DIR

TINY_LAZY = os.path.join(CONFIG_DIR, "lazy", "RegionSpot-tiny_synthetic.py")


def _run(tmp_path, *opts):
    out = tmp_path / "out"
    args = default_argument_parser().parse_args(
        ["--config-file", TINY_LAZY, f"train.output_dir={out}", "train.max_iter=1", *opts])
    with pytest.raises(ValueError) as info:
        train_net.main(args)
    assert not out.exists()  # refused before default_setup wrote anything, before any model was built
    return str(info.value)


def test_misspelled_key_is_refused_naming_it_and_the_near_key(tmp_path):
    message = _run(tmp_path, f"train.output_dirr={tmp_path / 'x'}")
    assert "unknown key 'train.output_dirr'" in message and "Did you mean train.output_dir?" in message
    assert "+train.output_dirr=" in message


def test_value_of_the_wrong_type_is_refused_naming_key_and_value(tmp_path):
    message = _run(tmp_path, "train.max_iter=twenty")
    assert "train.max_iter='twenty'" in message and "must be an integer" in message
    message = _run(tmp_path, "train.amp.enabled=yes")
    assert "train.amp.enabled='yes'" in message and "boolean" in message


def test_valid_overrides_pass():
    cfg = LazyConfig.load(TINY_LAZY)
    check_overrides(cfg, ["train.max_iter=20", "optimizer.lr=1", "model.clip.input_size=128",
                          "dataloader.test.mapper.precomputed_proposal_topk=1000", "+train.note=mine",
                          "model.prompt_source._target_=regionspot.modeling.prompt_sources.ProposalBoxes"])


def test_detector_lazy_config_overrides_are_checked_too():
    """A LazyConfig detector (MODEL.REGIONSPOT.DETECTOR.CONFIG_FILE *.py) takes DETECTOR.OPTS the same way."""
    from regionspot.modeling.prompt_sources import load_detector

    with pytest.raises(ValueError) as info:
        load_detector("COCO-Detection/fcos_R_50_FPN_1x.py", "random", ["model.num_classez=3"])
    message = str(info.value)
    assert "unknown key 'model.num_classez'" in message and "model.num_classes" in message
    assert "MODEL.REGIONSPOT.DETECTOR.OPTS" in message
