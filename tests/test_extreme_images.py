"""Extreme aspect ratios (a 4 x 4000 sliver) work through the predictor and the demo, and an image
that still fails stops only itself: the demo finishes the others and writes its JSON."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from regionspot.predictor import RegionSpotPredictor
from regionspot.data.synthetic import make_synthetic_lvis

from conftest import TINY_CONFIG, tiny_cfg, load_tool

demo = load_tool("demo")

SHAPES = [(4, 4000), (4000, 4), (1, 4000), (1, 1)]


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return RegionSpotPredictor(tiny_cfg())


@pytest.mark.parametrize("shape", SHAPES)
def test_predictor_on_extreme_aspect_ratios(predictor, shape):
    h, w = shape
    image = np.random.RandomState(0).randint(0, 256, (h, w, 3), dtype=np.uint8)
    predictor.set_image(image)
    size = predictor.features.input_size
    # SAM's resize keeps the longest side at its input size and every side at least one pixel.
    assert max(size) == predictor.model.sam_encoder.image_size and min(size) >= 1
    boxes = [[0, 0, w, h], [w / 4, 0, w / 2, h]]
    # Boxes are scaled like the image: the whole-image box is the whole SAM input.
    scaled = predictor.model.sam_encoder.transform.apply_boxes_torch(torch.tensor(boxes[:1], dtype=torch.float),
                                                                     (h, w))
    assert torch.allclose(scaled, torch.tensor([[0.0, 0.0, size[1], size[0]]]))
    res = predictor.predict(boxes=boxes, vocabulary=["cat", "dog"])
    assert len(res) == 2 and res.masks.shape == (2, h, w)
    assert torch.isfinite(res.scores).all() and torch.allclose(res.boxes.cpu(), torch.tensor(boxes))
    # CLIP squashes the whole image to its square input, whatever the aspect ratio.
    clip_in = predictor.model.clip_encoder.preprocess(torch.as_tensor(image).permute(2, 0, 1))
    s = predictor.model.clip_encoder.input_size
    assert clip_in.shape == (3, s, s) and torch.isfinite(clip_in).all()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("extreme"))
    make_synthetic_lvis(root, "val", num_images=2, seed=5, image_size=(64, 80))
    images = os.path.join(root, "val")
    rng = np.random.RandomState(1)
    Image.fromarray(rng.randint(0, 256, (4, 4000, 3), dtype=np.uint8)).save(os.path.join(images, "sliver.png"))
    Image.fromarray(rng.randint(0, 256, (4000, 4, 3), dtype=np.uint8)).save(os.path.join(images, "tall.png"))
    boxes = os.path.join(root, "boxes.txt")
    with open(boxes, "w") as f:
        f.write("0 0 4 4\n1 0 3 4\n")  # two boxes for every image
    return images, boxes


def _demo(folder, tmp_path):
    images, boxes = folder
    js = tmp_path / "res.json"
    code = demo.main(["--config-file", TINY_CONFIG, "--input", images, "--boxes", boxes, "--json-output", str(js),
                      "--output", str(tmp_path / "vis"), "--opts", "MODEL.DEVICE", "cpu"])
    return code, js


def test_demo_on_a_folder_with_slivers(folder, tmp_path, capsys):
    code, js = _demo(folder, tmp_path)
    assert code == 0, capsys.readouterr().err[-2000:]
    results = json.load(open(js))
    per_image = {}
    for r in results:
        per_image[r["image_id"]] = per_image.get(r["image_id"], 0) + 1
    assert per_image == {"val_00000.png": 2, "val_00001.png": 2, "sliver.png": 2, "tall.png": 2}
    assert sorted(os.listdir(tmp_path / "vis")) == ["sliver.png", "tall.png", "val_00000.png", "val_00001.png"]
    assert Image.open(tmp_path / "vis" / "sliver.png").size == (4000, 4)


def test_demo_image_failing_in_set_image_fails_alone(folder, tmp_path, capsys, monkeypatch):
    """An image whose encoding fails is reported by name; the others finish and the JSON is written."""
    real = demo.RegionSpotPredictor

    class Failing(real):
        def set_image(self, image, format="RGB"):
            if image.shape[:2] == (4, 4000):
                raise RuntimeError("cannot encode this image")
            return super().set_image(image, format)

    monkeypatch.setattr(demo, "RegionSpotPredictor", Failing)
    code, js = _demo(folder, tmp_path)
    err = capsys.readouterr().err
    assert code == 1 and "sliver.png: cannot encode this image" in err and "3 of 4 images done" in err
    assert {r["image_id"] for r in json.load(open(js))} == {"val_00000.png", "val_00001.png", "tall.png"}
