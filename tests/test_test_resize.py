"""The test-time resize (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) as the original code applies it:
detectron2's ResizeShortestEdge first, then SAM's and CLIP's own resizes. `--eval-only`'s path
(mapper + model), the predictor and the demo give the same scores for one image, and results come
out at the original size."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode

from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.data.dataset_mapper import RegionSpotDatasetMapper
from regionspot.predictor import RegionSpotPredictor
from regionspot.data.synthetic import DEFAULT_CLASSES

from conftest import ROOT, TINY_CONFIG, tiny_cfg

DEMO = os.path.join(ROOT, "tools", "demo.py")
_spec = importlib.util.spec_from_file_location("regionspot_tool_demo_resize", DEMO)
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

NUM_CLASSES = len(DEFAULT_CLASSES)


def _gt_boxes(d):
    return np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]],
                    dtype=np.float64)


def _pair_scores(instances, gt: np.ndarray) -> np.ndarray:
    """(N, C) scores of an eval output holding every (box, class) pair, boxes matched to gt."""
    out = np.full((len(gt), NUM_CLASSES), np.nan)
    boxes = instances.pred_boxes.tensor.numpy()
    for box, cls, score in zip(boxes, instances.pred_classes.tolist(), instances.scores.tolist()):
        j = int(np.abs(gt - box).sum(axis=1).argmin())
        assert np.abs(gt[j] - box).max() < 1e-2  # boxes come back in the original image's pixels
        out[j, cls] = score
    assert not np.isnan(out).any()
    return out


@pytest.mark.parametrize("min_size", [96, 300])  # a downscale and an upscale of the 192x256 images
def test_eval_predictor_and_demo_agree_under_test_resize(synthetic_val, min_size, tmp_path, monkeypatch):
    # One trained-looking head for every path: saved, then loaded by each through MODEL.WEIGHTS.
    torch.manual_seed(min_size)
    weights = str(tmp_path / "head.pth")
    torch.save({"model": build_model(tiny_cfg()).state_dict()}, weights)
    opts = ("INPUT.MIN_SIZE_TEST", str(min_size), "INPUT.MAX_SIZE_TEST", "1000",
            "TEST.DETECTIONS_PER_IMAGE", "1000", "MODEL.WEIGHTS", weights)
    cfg = tiny_cfg(*opts)
    model = build_model(cfg).eval()
    RegionSpotCheckpointer(model).load(weights)
    seen = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda images: seen.append(images[0].shape[-2:]) or encode(images))

    d = next(d for d in DatasetCatalog.get(synthetic_val) if len(d["annotations"]) >= 2)
    gt = _gt_boxes(d)
    x = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)(d)
    inst = model.inference([x])[0]["instances"]
    h, w = d["height"], d["width"]
    assert tuple(seen[-1]) == (min_size, round(min_size * w / h))  # the encoders saw the resized image
    assert inst.image_size == (h, w) and inst.pred_masks.tensor.shape[-2:] == (h, w)
    eval_scores = _pair_scores(inst, gt)

    predictor = RegionSpotPredictor(cfg, model=model)
    predictor.set_image(d["file_name"])
    assert tuple(seen[-1]) == (min_size, round(min_size * w / h))
    res = predictor.predict(boxes=gt, vocabulary=synthetic_val, top_k=NUM_CLASSES)
    assert res.masks.shape[-2:] == (h, w)
    np.testing.assert_allclose(res.boxes.numpy(), gt, atol=1e-4)
    pred_scores = np.zeros((len(gt), NUM_CLASSES))
    np.put_along_axis(pred_scores, res.topk_classes.numpy(), res.topk_scores.numpy(), axis=1)
    np.testing.assert_allclose(pred_scores, eval_scores, rtol=1e-4, atol=1e-6)

    # The demo, through its command line, with the same config and boxes.
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps({os.path.basename(d["file_name"]): gt.tolist()}))
    out = tmp_path / "res.json"
    rc = demo.main(["--config-file", TINY_CONFIG, "--input", d["file_name"], "--boxes", str(boxes_file),
                    "--json-output", str(out), "--vocabulary", synthetic_val,
                    "--classes-per-region", str(NUM_CLASSES), "--opts", "MODEL.DEVICE", "cpu", *opts])
    assert rc == 0
    records = json.loads(out.read_text())
    assert len(records) == len(gt) * NUM_CLASSES
    np.testing.assert_allclose(sorted(r["score"] for r in records), np.sort(eval_scores.ravel()),
                               rtol=1e-4, atol=1e-6)


def test_min_size_test_zero_keeps_the_original_image(synthetic_val, monkeypatch):
    cfg = tiny_cfg("INPUT.MIN_SIZE_TEST", "0")
    model = build_model(cfg).eval()
    seen = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda images: seen.append(images[0].shape[-2:]) or encode(images))
    d = DatasetCatalog.get(synthetic_val)[0]
    model.inference([RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)(d)])
    predictor = RegionSpotPredictor(cfg, model=model)
    predictor.set_image(d["file_name"])
    assert [tuple(s) for s in seen] == [(d["height"], d["width"])] * 2


def test_predictor_points_and_sam_auto_follow_the_resize(synthetic_val):
    """Point prompts are moved into the resized frame; SAM-auto boxes come back in original pixels."""
    cfg = tiny_cfg("INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "1000",
                   "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH", "0.0",
                   "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH", "0.0",
                   "MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", "4")
    predictor = RegionSpotPredictor(cfg)
    d = DatasetCatalog.get(synthetic_val)[0]
    predictor.set_image(d["file_name"])
    h, w = d["height"], d["width"]
    res = predictor.predict(points=[[[w * 0.5, h * 0.5]]], point_labels=[[1]], vocabulary=synthetic_val)
    assert res.masks.shape[-2:] == (h, w)
    # Decoding a point at (x, y) of the original equals decoding (x/2, y/2) of the half-size image.
    f = predictor.features
    tokens, _ = predictor.model.sam_encoder.decode_prompts(
        f.sam_embedding, f.encoded_size, points=torch.tensor([[[w * 0.25, h * 0.25]]]),
        point_labels=torch.tensor([[1]]))
    region = predictor.model.embed_regions([tokens], f.clip_tokens[None])[0]
    _, text = predictor.vocabulary_embeddings(synthetic_val)
    probs = predictor.model.classify(region, text).softmax(-1)
    torch.testing.assert_close(res.topk_scores[0], probs[0].sort(descending=True).values[: res.topk_scores.shape[1]])
    boxes = predictor.sam_auto_boxes()
    assert boxes.shape[0] > 0
    assert (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
    assert (boxes[:, 2] > 0.6 * w).any() or (boxes[:, 3] > 0.6 * h).any()  # not confined to the 96x128 frame
