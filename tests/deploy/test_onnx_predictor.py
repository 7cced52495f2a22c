"""An exported folder served by `regionspot_deploy.OnnxRegionSpotPredictor` gives what
`RegionSpotPredictor` gives (tiny SAM and CLIP): class probabilities with 1 - r <= 1e-6 and the
same top-1 per region, masks with IoU >= 0.999, the same boxes and prompt indices; with boxes
(1, 7, 300), points, both, and 3 or 1203 classes. The folder refuses altered or missing files by
name, and serves in a process where torch and detectron2 cannot be imported."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

from conftest import ROOT, tiny_cfg
from regionspot import RegionSpotPredictor
from regionspot.deploy import FolderError, OnnxRegionSpotPredictor
from regionspot.modeling.region_pipeline import find_pipeline
from regionspot.onnx_export import export_folder

# The test-time resize is on (120 x 160 images are upscaled to 200 x 267), so it is checked too.
OPTS = ("INPUT.MIN_SIZE_TEST", "200", "INPUT.MAX_SIZE_TEST", "300")
VOCAB3 = ["cat", "dog", "traffic light"]
LVIS = [c["name"] for c in LVIS_CATEGORIES]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(torch predictor, its exported folder) of one tiny model, with a 5-class vocabulary beside it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cfg = tiny_cfg(*OPTS)
        cfg.freeze()
        predictor = RegionSpotPredictor(cfg)
    folder = str(tmp_path_factory.mktemp("export") / "tiny")
    names, emb = predictor.vocabulary_embeddings(["a", "b", "c", "d", "e"])
    export_folder(find_pipeline(predictor.model), cfg, folder, vocabulary=(names, emb.numpy()))
    return predictor, folder


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def both(exported, image):
    predictor, folder = exported
    onnx = OnnxRegionSpotPredictor(folder)
    predictor.set_image(image)
    onnx.set_image(image)
    return predictor, onnx


def random_boxes(n, rng, size=(120, 160)):
    xy = rng.uniform(0, 1, (n, 2, 2)) * [size[1], size[0]]
    return np.concatenate([xy.min(1), xy.max(1)], 1)


def assert_same(theirs, ours):
    theirs = theirs.cpu()
    p, q = theirs.class_scores.numpy().astype(np.float64), ours.class_scores.astype(np.float64)
    assert p.shape == q.shape and p.shape[0] > 0
    if p.size > 1:
        assert 1 - np.corrcoef(p.ravel(), q.ravel())[0, 1] <= 1e-6
    assert np.array_equal(p.argmax(1), q.argmax(1))
    assert np.array_equal(theirs.classes.numpy(), ours.classes)
    assert np.allclose(theirs.topk_scores.numpy(), ours.topk_scores, atol=1e-5)
    assert np.array_equal(theirs.prompt_indices.numpy(), ours.prompt_indices)
    assert theirs.vocabulary == ours.vocabulary and ours.class_names == theirs.class_names
    assert np.allclose(theirs.boxes.numpy(), ours.boxes, atol=1e-4)
    assert (theirs.masks is None) == (ours.masks is None)
    if ours.masks is not None:
        a, b = theirs.masks.numpy(), ours.masks
        assert a.shape == b.shape
        inter, union = (a & b).sum((1, 2)), (a | b).sum((1, 2))
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        assert iou.min() >= 0.999
        assert a.any()  # the comparison is not between empty masks


@pytest.mark.parametrize("n", [1, 7, 300])
def test_boxes_three_classes(both, n):
    predictor, onnx = both
    boxes = random_boxes(n, np.random.default_rng(n))
    assert_same(predictor.predict(boxes=boxes, vocabulary=VOCAB3), onnx.predict(boxes=boxes, vocabulary=VOCAB3))


@pytest.mark.parametrize("n", [7, 300])
def test_boxes_lvis_classes(both, n):
    predictor, onnx = both
    boxes = random_boxes(n, np.random.default_rng(10 + n))
    theirs, ours = predictor.predict(boxes=boxes, vocabulary=LVIS), onnx.predict(boxes=boxes, vocabulary=LVIS)
    assert ours.class_scores.shape == (n, 1203)
    assert_same(theirs, ours)


def test_points_and_points_with_boxes(both):
    predictor, onnx = both
    rng = np.random.default_rng(3)
    points = rng.uniform(0, 1, (6, 3, 2)) * [160, 120]
    labels = rng.integers(0, 2, (6, 3))
    labels[0, 2] = -1  # a padding point
    assert_same(predictor.predict(points=points, point_labels=labels, vocabulary=VOCAB3),
                onnx.predict(points=points, point_labels=labels, vocabulary=VOCAB3))
    boxes = random_boxes(6, rng)
    assert_same(predictor.predict(boxes=boxes, points=points, point_labels=labels, vocabulary=LVIS),
                onnx.predict(boxes=boxes, points=points, point_labels=labels, vocabulary=LVIS))
    one = ([[40.0, 30.0]], [1])  # (P, 2) is one region, as in SAM
    assert_same(predictor.predict(points=one[0], point_labels=one[1], vocabulary=VOCAB3),
                onnx.predict(points=one[0], point_labels=one[1], vocabulary=VOCAB3))


def test_scores_top_k_dropped_boxes_and_synonyms(both):
    predictor, onnx = both
    boxes = random_boxes(5, np.random.default_rng(4))
    boxes[2] = [200, 10, 300, 50]  # outside the image: dropped by both
    scores = [0.9, 0.5, 0.7, 0.1, 1.0]
    vocab = [["cat", "kitty"], "dog", ["traffic light", "signal"]]
    theirs = predictor.predict(boxes=boxes, vocabulary=vocab, top_k=2, prompt_scores=scores, return_masks=False)
    ours = onnx.predict(boxes=boxes, vocabulary=vocab, top_k=2, prompt_scores=scores, return_masks=False)
    assert ours.prompt_indices.tolist() == [0, 1, 3, 4] and ours.topk_classes.shape == (4, 2)
    assert_same(theirs, ours)
    empty = onnx.predict(boxes=np.zeros((0, 4)), vocabulary=VOCAB3)
    assert len(empty) == 0 and empty.masks.shape == (0, 120, 160)


def test_class_axis_is_dynamic_and_the_exported_vocabulary_serves(exported, both):
    predictor, onnx = both
    boxes = random_boxes(4, np.random.default_rng(5))
    default = onnx.predict(boxes=boxes)  # the 5-class vocabulary exported beside the graphs
    assert default.vocabulary == ["a", "b", "c", "d", "e"] and default.class_scores.shape == (4, 5)
    assert_same(predictor.predict(boxes=boxes, vocabulary=["a", "b", "c", "d", "e"]), default)
    for vocab in (VOCAB3[:1], LVIS[:40]):
        assert onnx.predict(boxes=boxes, vocabulary=vocab).class_scores.shape == (4, len(vocab))
    npy = os.path.join(exported[1], "vocabulary.npy")
    assert onnx.predict(boxes=boxes, vocabulary=npy).vocabulary == ["a", "b", "c", "d", "e"]


def test_bad_prompts_are_refused(both):
    _, onnx = both
    with pytest.raises(ValueError, match="boxes must have shape"):
        onnx.predict(boxes=[[1, 2, 3]], vocabulary=VOCAB3)
    with pytest.raises(ValueError, match="lies outside"):
        onnx.predict(points=[[[500.0, 10.0]]], point_labels=[[1]], vocabulary=VOCAB3)
    with pytest.raises(ValueError, match="more than once"):
        onnx.predict(boxes=[[1, 2, 30, 40]], vocabulary=["cat", "cat"])
    with pytest.raises(ValueError, match="uint8"):
        onnx.set_image(np.zeros((4, 4, 3), np.float64))


def _copy(folder, tmp_path):
    target = str(tmp_path / "copy")
    shutil.copytree(folder, target)
    return target


def test_altered_or_missing_files_are_refused_by_name(exported, tmp_path):
    folder = _copy(exported[1], tmp_path)
    with open(os.path.join(folder, "region_head.onnx"), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(FolderError, match=r"region_head\.onnx does not match the SHA256"):
        OnnxRegionSpotPredictor(folder)
    os.remove(os.path.join(folder, "clip_image.onnx"))
    with pytest.raises(FolderError, match=r"clip_image\.onnx is missing"):
        OnnxRegionSpotPredictor(folder, verify=True)
    manifest_path = os.path.join(folder, "manifest.json")
    manifest = json.load(open(manifest_path))
    del manifest["graphs"]["sam_image"]
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(FolderError, match="names no 'sam_image' graph"):
        OnnxRegionSpotPredictor(folder)
    with pytest.raises(FolderError, match="no manifest.json"):
        OnnxRegionSpotPredictor(str(tmp_path))


def test_manifest_records_what_serving_needs(exported):
    manifest = json.load(open(os.path.join(exported[1], "manifest.json")))
    assert manifest["test_resize"] == {"min_size": 200, "max_size": 300, "interp": "pil_bilinear"}
    assert manifest["clip"]["resize_mode"] == "bilinear" and manifest["clip"]["antialias"] is False
    assert manifest["sam"]["family"] == "sam" and manifest["sam"]["mask_threshold"] == 0.0
    assert set(manifest["files"]) == {"sam_image.onnx", "clip_image.onnx", "region_decoder.onnx",
                                      "region_head.onnx", "text.onnx",
                                      "bpe_vocab.txt.gz", "vocabulary.npy", "vocabulary.json"}
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"]) and manifest["opset"] == 17
    assert "MIN_SIZE_TEST: 200" in manifest["config"]


TORCH_FREE = r"""
import sys
sys.modules["torch"] = None
sys.modules["detectron2"] = None
import numpy as np
from regionspot_deploy import OnnxRegionSpotPredictor
p = OnnxRegionSpotPredictor(sys.argv[1])
p.set_image(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
r = p.predict(boxes=[[10, 10, 90, 100], [50, 20, 150, 110]], vocabulary=["cat", "dog", "traffic light"])
print(r.class_names, r.masks.shape, float(r.class_scores.sum()))
"""


def test_serves_without_torch_and_detectron2(exported):
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "projects", "RegionSpot")}
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, exported[1]], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Two regions with masks at the image size, and each region's probabilities sum to 1.
    assert "(2, 120, 160)" in proc.stdout and abs(float(proc.stdout.split()[-1]) - 2.0) < 1e-4


def test_a_file_a_pil_image_and_a_bgr_array_give_the_same_features(exported, image, tmp_path):
    from PIL import Image

    onnx = OnnxRegionSpotPredictor(exported[1], verify=False)
    path = str(tmp_path / "image.png")
    Image.fromarray(image).save(path)
    features = []
    for item, fmt in ((image, "RGB"), (path, "RGB"), (Image.open(path), "RGB"), (image[:, :, ::-1], "BGR")):
        onnx.set_image(item, format=fmt)
        features.append(onnx._features["clip_tokens"])
        assert np.array_equal(onnx.image, image)
    assert all(np.array_equal(features[0], f) for f in features[1:])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        onnx.set_image(str(tmp_path / "missing.png"))
