"""End to end: `train_net.py --eval-only` on a synthetic LVIS-format set, with an oracle head
(the `oracle` fixture of conftest.py).

The oracle makes the expected answer known without training: with the decoder's attention
outputs and second feed-forward linears zeroed, every decoder layer is the identity up to its
LayerNorms (weight 1, bias 0, idempotent), so the head computes
``projector(LayerNorm(to_clip(sam_token)))``. We take every ground-truth region's SAM token the
way the evaluation does, and solve (exactly, since regions < width + 1) for a projector that maps
a region of class c to e_c = pinv(T) onehot(c), T the class text embeddings: then t_c . e_c = 1
and t_d . e_c = 0 for d != c. After normalisation each region's own class has the top logit, so
its probability is > 1/C while any other region's probability for that class is 1/C or less:
every class ranks its regions perfectly, hence box AP 100 with ground-truth boxes as prompts.
"""
import json
import pickle

import numpy as np
import pytest
from detectron2.engine import default_argument_parser
from detectron2.structures import BoxMode

import train_net
from regionspot import RegionSpot

from conftest import TINY_CONFIG, _gt_by_image


def _eval(tmp_path, dataset, weights, *opts, seed=0):
    args = default_argument_parser().parse_args([
        "--config-file", TINY_CONFIG, "--eval-only",
        "DATASETS.TEST", f'("{dataset}",)', "OUTPUT_DIR", str(tmp_path / "out"),
        "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu", "SEED", str(seed), *opts,
    ])
    res = train_net.main(args)
    # detectron2 returns {dataset: metrics}, unwrapped to the metrics when there is one dataset.
    if dataset in res:
        res = res[dataset]
    assert set(res) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert 0 <= res[task]["AP"] <= 100
    return res


def _results_json(tmp_path, dataset):
    with open(tmp_path / "out" / "inference" / dataset / "lvis_instances_results.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def oracle_gt_ap(oracle, synthetic_val, tmp_path_factory):
    return _eval(tmp_path_factory.mktemp("oracle_eval"), synthetic_val, oracle)["bbox"]["AP"]


def test_oracle_head_gives_box_ap_100(oracle_gt_ap):
    assert oracle_gt_ap > 99.9


def test_random_head_is_clearly_worse(synthetic_val, oracle_gt_ap, tmp_path):
    # A random head on the same prompts ranks regions by chance (AP 20-45 over seeds 0-11).
    res = _eval(tmp_path, synthetic_val, "", seed=0)
    assert res["bbox"]["AP"] < 60
    assert oracle_gt_ap - res["bbox"]["AP"] > 30


def test_eval_writes_all_pairs_with_shared_masks(oracle, synthetic_val, tmp_path):
    _eval(tmp_path, synthetic_val, oracle)
    dets = _results_json(tmp_path, synthetic_val)
    gt = _gt_by_image(synthetic_val)
    num_classes = 6
    assert len(dets) == sum(len(b) for b, _ in gt.values()) * num_classes
    for image_id, (boxes, classes) in gt.items():
        mine = [d for d in dets if d["image_id"] == image_id]
        assert len(mine) == len(boxes) * num_classes
        # Every detection of one box carries the same mask.
        by_box = {}
        for d in mine:
            by_box.setdefault(tuple(np.round(d["bbox"], 2)), set()).add(d["segmentation"]["counts"])
        assert len(by_box) == len(boxes)
        assert all(len(v) == 1 for v in by_box.values())
        # The top detection of each gt box is its own class (LVIS category ids are 1-based).
        for box, cls in zip(boxes, classes):
            xywh = BoxMode.convert(box.tolist(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
            best = max((d for d in mine if np.allclose(d["bbox"], xywh, atol=1e-2)), key=lambda d: d["score"])
            assert best["category_id"] == cls + 1


def test_batched_evaluation_gives_the_same_detections(oracle, synthetic_val, tmp_path, monkeypatch):
    """MODEL.REGIONSPOT.TEST_IMS_PER_BATCH 4 over 6 images (a full and a partial batch) through
    detectron2's test loader and evaluator: the same detections and AP as one image a batch."""
    sizes = []
    inference = RegionSpot.inference

    def spy(self, batched_inputs):
        sizes.append(len(batched_inputs))
        return inference(self, batched_inputs)

    monkeypatch.setattr(RegionSpot, "inference", spy)
    one = _eval(tmp_path / "one", synthetic_val, oracle)
    assert sizes == [1] * 6
    sizes.clear()
    four = _eval(tmp_path / "four", synthetic_val, oracle, "MODEL.REGIONSPOT.TEST_IMS_PER_BATCH", "4")
    assert sizes == [4, 2]
    a, b = _results_json(tmp_path / "one", synthetic_val), _results_json(tmp_path / "four", synthetic_val)
    assert len(a) == len(b) > 0

    def key(d):
        return d["image_id"], d["category_id"], tuple(np.round(d["bbox"], 2))

    a, b = {key(d): d for d in a}, {key(d): d for d in b}
    assert set(a) == set(b)
    assert max(abs(a[k]["score"] - b[k]["score"]) for k in a) < 1e-4
    assert abs(one["bbox"]["AP"] - four["bbox"]["AP"]) < 1e-6


def test_batch_size_below_one_is_refused(synthetic_val, tmp_path):
    with pytest.raises(ValueError, match="TEST_IMS_PER_BATCH"):
        _eval(tmp_path, synthetic_val, "", "MODEL.REGIONSPOT.TEST_IMS_PER_BATCH", "0")


# ---------------------------------------------------------------------------------- proposals
def _write_coco_json(path, gt, skip=()):
    recs = []
    for image_id, (boxes, _) in gt.items():
        if image_id in skip:
            continue
        for b in boxes:
            recs.append({"image_id": image_id, "category_id": 1, "score": 1.0,
                         "bbox": BoxMode.convert(b.tolist(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)})
    with open(path, "w") as f:
        json.dump(recs, f)


def _write_glip_json(path, gt):
    data = {str(image_id): {"boxes": boxes.tolist(), "scores": [1.0] * len(boxes), "labels": [1] * len(boxes)}
            for image_id, (boxes, _) in gt.items()}
    with open(path, "w") as f:
        json.dump(data, f)


def _write_pkl(path, gt, skip=()):
    ids = [i for i in gt if i not in skip]
    data = {"ids": ids, "boxes": [gt[i][0].astype(np.float32) for i in ids],
            "objectness_logits": [np.full(len(gt[i][0]), 10.0, dtype=np.float32) for i in ids],
            "bbox_mode": BoxMode.XYXY_ABS}
    with open(path, "wb") as f:
        pickle.dump(data, f)


def _proposal_opts(path, *more):
    return ("MODEL.REGIONSPOT.PROMPT", "proposals", "DATASETS.PROPOSAL_FILES_TEST", f'("{path}",)', *more)


@pytest.mark.parametrize("fmt", ["coco_json", "glip_json", "d2_pkl"])
def test_oracle_with_gt_boxes_as_proposals_gives_ap_100(oracle, synthetic_val, tmp_path, fmt):
    gt = _gt_by_image(synthetic_val)
    path = str(tmp_path / ("proposals.pkl" if fmt == "d2_pkl" else "proposals.json"))
    {"coco_json": _write_coco_json, "glip_json": _write_glip_json, "d2_pkl": _write_pkl}[fmt](path, gt)
    res = _eval(tmp_path, synthetic_val, oracle, *_proposal_opts(path))
    assert res["bbox"]["AP"] > 99.9
    # The proposals really were the prompts: one box per proposal, each with every class.
    dets = _results_json(tmp_path, synthetic_val)
    assert len(dets) == sum(len(b) for b, _ in gt.values()) * 6


@pytest.mark.parametrize("fmt", ["coco_json", "d2_pkl"])
def test_proposal_file_missing_an_image(oracle, synthetic_val, tmp_path, fmt):
    gt = _gt_by_image(synthetic_val)
    skipped = sorted(gt)[0]
    path = str(tmp_path / ("partial.pkl" if fmt == "d2_pkl" else "partial.json"))
    (_write_pkl if fmt == "d2_pkl" else _write_coco_json)(path, gt, skip=(skipped,))

    with pytest.raises(KeyError) as e:
        _eval(tmp_path, synthetic_val, oracle, *_proposal_opts(path))
    assert path in str(e.value) and "MISSING_PROPOSALS" in str(e.value)

    res = _eval(tmp_path, synthetic_val, oracle, *_proposal_opts(path, "MODEL.REGIONSPOT.MISSING_PROPOSALS", "empty"))
    dets = _results_json(tmp_path, synthetic_val)
    assert dets and not [d for d in dets if d["image_id"] == skipped]
    # Its objects cannot be found, the others still rank perfectly.
    assert 0 < res["bbox"]["AP"] < 99.9
