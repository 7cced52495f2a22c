"""Other exports: SAM 2 with an open_clip tower (tiny ones), whose text side cannot be exported (the
manifest says why, and the folder serves an exported vocabulary); int8-quantized encoders and
fp16 weights; and tools/export_onnx.py's command line."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG, load_tool, tiny_cfg
from regionspot import RegionSpotPredictor
from regionspot.deploy import FolderError, OnnxRegionSpotPredictor
from regionspot.modeling.region_pipeline import find_pipeline
from regionspot.onnx_export import export_folder
from test_onnx_predictor import VOCAB3, assert_same, random_boxes

export_onnx = load_tool("export_onnx")


def _predictors(cfg, folder, **kwargs):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        predictor = RegionSpotPredictor(cfg)
    names, emb = predictor.vocabulary_embeddings(VOCAB3)
    export_folder(find_pipeline(predictor.model), cfg, folder, vocabulary=(names, emb.numpy()), **kwargs)
    return predictor


def test_sam2_with_open_clip(tmp_path):
    cfg = tiny_cfg("MODEL.REGIONSPOT.SAM.TYPE", "sam2_tiny", "MODEL.REGIONSPOT.CLIP.BACKEND", "open_clip",
                   "MODEL.REGIONSPOT.CLIP.NAME", "tiny", "MODEL.REGIONSPOT.CLIP.INPUT_SIZE", "64",
                   "INPUT.MIN_SIZE_TEST", "100", "INPUT.MAX_SIZE_TEST", "200")
    cfg.freeze()
    folder = str(tmp_path / "sam2")
    predictor = _predictors(cfg, folder)
    onnx = OnnxRegionSpotPredictor(folder)
    assert onnx.manifest["sam"]["family"] == "sam2" and "open_clip" in onnx.manifest["not_exported"]["text"]
    image = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    predictor.set_image(image)
    onnx.set_image(image)
    rng = np.random.default_rng(2)
    boxes = random_boxes(7, rng)
    points, labels = rng.uniform(0, 1, (7, 2, 2)) * [160, 120], rng.integers(0, 2, (7, 2))
    assert_same(predictor.predict(boxes=boxes, vocabulary=VOCAB3), onnx.predict(boxes=boxes))
    assert_same(predictor.predict(points=points, point_labels=labels, vocabulary=VOCAB3),
                onnx.predict(points=points, point_labels=labels))
    assert_same(predictor.predict(boxes=boxes, points=points, point_labels=labels, vocabulary=VOCAB3),
                onnx.predict(boxes=boxes, points=points, point_labels=labels))
    with pytest.raises(FolderError, match="has no text graph"):
        onnx.predict(boxes=boxes, vocabulary=["cat", "dog"])


def test_int8_and_fp16(tmp_path):
    cfg = tiny_cfg()
    cfg.freeze()
    predictor = _predictors(cfg, str(tmp_path / "q"), quantize_int8=True)
    image = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    boxes = random_boxes(20, np.random.default_rng(3))
    predictor.set_image(image)
    theirs = predictor.predict(boxes=boxes, vocabulary=VOCAB3).class_scores.numpy()
    manifest = json.load(open(tmp_path / "q" / "manifest.json"))
    assert set(manifest["int8_graphs"]) == {"sam_image", "clip_image"}
    for key, rel in manifest["int8_graphs"].items():  # int8 weights: the graph shrinks
        assert os.path.getsize(tmp_path / "q" / rel) < os.path.getsize(tmp_path / "q" / manifest["graphs"][key])
    int8 = OnnxRegionSpotPredictor(str(tmp_path / "q"), int8=True)
    int8.set_image(image)
    assert int8.predict(boxes=boxes).class_scores.shape == theirs.shape
    with pytest.raises(FolderError, match="no int8 graphs"):
        _predictors(cfg, str(tmp_path / "h"), fp16=True)
        OnnxRegionSpotPredictor(str(tmp_path / "h"), int8=True)
    half = OnnxRegionSpotPredictor(str(tmp_path / "h"))
    assert half.manifest["precision"] == "fp16"
    assert os.path.getsize(tmp_path / "h" / "clip_image.onnx") < 0.75 * os.path.getsize(tmp_path / "q" / "clip_image.onnx")
    half.set_image(image)
    ours = half.predict(boxes=boxes).class_scores
    assert 1 - np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] < 1e-3  # fp16 rounding of the weights only


def test_tool_writes_a_folder_and_refuses_a_full_one(tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["--config-file", TINY_CONFIG, "--output", out, "--vocabulary", "custom", "--custom-vocabulary", "cat,dog"]
    assert export_onnx.main(argv) == 0
    onnx = OnnxRegionSpotPredictor(out)
    assert onnx.default_vocabulary[0] == ["cat", "dog"] and onnx.manifest["vocabulary"]["spec"] == "custom"
    onnx.set_image(np.zeros((40, 50, 3), np.uint8))
    assert onnx.predict(boxes=[[1, 1, 30, 30]]).class_scores.shape == (1, 2)
    assert export_onnx.main(argv) == 2
    assert "exists and is not empty" in capsys.readouterr().err
