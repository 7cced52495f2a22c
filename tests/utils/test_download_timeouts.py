"""Every download honours REGIONSPOT_DOWNLOAD_TIMEOUT: the detector's weights (a URL, or the
released weights of a detectron2 model-zoo config name), detectron2:// names in MODEL.WEIGHTS and
the LazyConfig route's train.init_checkpoint. A 127.0.0.1 server that accepts connections and
never answers stands in for a dead host."""
import os
import socket

import pytest
from detectron2.engine import default_argument_parser
from detectron2.model_zoo.model_zoo import _ModelZooUrls
from detectron2.utils.file_io import Detectron2Handler

import train_net
from regionspot.utils.weights import DOWNLOAD_TIMEOUT_ENV, DownloadError

from conftest import CONFIG_DIR, TINY_CONFIG

TINY_LAZY = os.path.join(CONFIG_DIR, "lazy", "RegionSpot-tiny_synthetic.py")
TINY_RANDOM = ("model.sam.checkpoint=random", "model.clip.checkpoint=random", "model.clip.input_size=128")
DETECTOR = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
DETECTOR_OPTS = "['MODEL.RESNETS.DEPTH', '18', 'MODEL.RESNETS.RES2_OUT_CHANNELS', '64']"


@pytest.fixture
def silent(tmp_path, monkeypatch):
    """Base URL of a server on 127.0.0.1 that takes connections (the kernel's backlog) and never answers."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(DOWNLOAD_TIMEOUT_ENV, "2")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def _main(config, *opts):
    return train_net.main(default_argument_parser().parse_args(["--config-file", config, "--eval-only", *opts]))


def _assert_timed_out(info, key, url_part):
    message = str(info.value)
    assert "no answer within 2 s" in message and DOWNLOAD_TIMEOUT_ENV in message, message
    assert f"({key})" in message and url_part in message, message
    assert f"set {key} to its local path" in message, message


def test_detector_weights_url_and_model_zoo_name_time_out(silent, tmp_path, synthetic_val, monkeypatch):
    common = ("MODEL.REGIONSPOT.PROMPT", "detector", "MODEL.REGIONSPOT.DETECTOR.CONFIG_FILE", DETECTOR,
              "MODEL.REGIONSPOT.DETECTOR.OPTS", DETECTOR_OPTS, "DATASETS.TEST", f'("{synthetic_val}",)',
              "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.DEVICE", "cpu")
    with pytest.raises(DownloadError) as info:
        _main(TINY_CONFIG, "MODEL.REGIONSPOT.DETECTOR.WEIGHTS", f"{silent}/det/model_final.pkl", *common)
    _assert_timed_out(info, "MODEL.REGIONSPOT.DETECTOR.WEIGHTS", f"{silent}/det/model_final.pkl")
    # A model-zoo config name with no weights given: its released weights, from detectron2's table.
    monkeypatch.setattr(_ModelZooUrls, "S3_PREFIX", f"{silent}/detectron2/")
    with pytest.raises(DownloadError) as info:
        _main(TINY_CONFIG, *common)
    _assert_timed_out(info, "MODEL.REGIONSPOT.DETECTOR.WEIGHTS", f"{silent}/detectron2/COCO-Detection/")


def test_detectron2_name_in_model_weights_times_out(silent, tmp_path, synthetic_val, monkeypatch):
    monkeypatch.setattr(Detectron2Handler, "S3_DETECTRON2_PREFIX", f"{silent}/detectron2/")
    with pytest.raises(DownloadError) as info:
        _main(TINY_CONFIG, "MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
              "DATASETS.TEST", f'("{synthetic_val}",)', "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.DEVICE", "cpu")
    _assert_timed_out(info, "MODEL.WEIGHTS", f"{silent}/detectron2/ImageNetPretrained/MSRA/R-50.pkl")


def test_lazy_init_checkpoint_url_times_out(silent, tmp_path, synthetic_val):
    url = f"{silent}/regionspot/head.pth"
    with pytest.raises(DownloadError) as info:
        _main(TINY_LAZY, f"dataloader.test.dataset.name={synthetic_val}", f"train.init_checkpoint={url}",
              f"train.output_dir={tmp_path / 'out'}", *TINY_RANDOM)
    _assert_timed_out(info, "train.init_checkpoint", url)
