"""Checkpoint errors name the key the user set: MODEL.REGIONSPOT.HEAD_WEIGHTS on the ROI-head
route, train.init_checkpoint on the LazyConfig route (not MODEL.WEIGHTS)."""
import os

import pytest
import torch
from detectron2.engine import default_argument_parser

import train_net
from regionspot.checkpoint import HeadMismatchError

from conftest import CONFIG_DIR, PLUGIN_CONFIG, PLUGIN_TINY

TINY_LAZY = os.path.join(CONFIG_DIR, "lazy", "RegionSpot-tiny_synthetic.py")
TINY_RANDOM = ("model.sam.checkpoint=random", "model.clip.checkpoint=random", "model.clip.input_size=128")


def _main(config, *opts):
    return train_net.main(default_argument_parser().parse_args(["--config-file", config, "--eval-only", *opts]))


def _files(tmp_path):
    missing = str(tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    other = str(tmp_path / "other.pth")
    torch.save({"model": {"head.to_clip.weight": torch.zeros(3, 3)}}, other)
    return [(missing, FileNotFoundError), (str(corrupt), RuntimeError), (other, HeadMismatchError)]


def test_roi_head_route_names_head_weights(tmp_path):
    for path, error in _files(tmp_path):
        with pytest.raises(error) as info:
            _main(PLUGIN_CONFIG, *PLUGIN_TINY, "MODEL.REGIONSPOT.HEAD_WEIGHTS", path,
                  "OUTPUT_DIR", str(tmp_path / "out"))
        message = str(info.value)
        assert path in message and "(MODEL.REGIONSPOT.HEAD_WEIGHTS)" in message, message
        assert "(MODEL.WEIGHTS)" not in message


def test_lazy_route_names_init_checkpoint(tmp_path, synthetic_val):
    for path, error in _files(tmp_path):
        with pytest.raises(error) as info:
            _main(TINY_LAZY, f"dataloader.test.dataset.name={synthetic_val}", f"train.init_checkpoint={path}",
                  f"train.output_dir={tmp_path / 'out'}", *TINY_RANDOM)
        message = str(info.value)
        assert path in message and "(train.init_checkpoint)" in message, message
        assert "(MODEL.WEIGHTS)" not in message
