"""regionspot.fast_eval: evaluating categories in chunks, with faster-coco-eval or the reference
packages, gives the one-shot figures of detectron2's own route (the `lvis` package on the whole
list for LVIS, pycocotools for COCO), on synthetic sets of several hundred images."""
import contextlib
import copy
import io
import logging
import os

import pytest
from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
from detectron2.evaluation.lvis_evaluation import _evaluate_predictions_on_lvis
from lvis import LVIS
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from regionspot import fast_eval
from regionspot.data.synthetic_results import make_set
from regionspot.evaluation import patch_lvis_for_numpy2

LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
ENGINES = ["reference", "faster_coco_eval"]


def _lvis_api(gt):
    api = LVIS.__new__(LVIS)
    api.logger, api.dataset = logging.getLogger("lvis"), copy.deepcopy(gt)
    api._create_index()
    return api


@pytest.fixture(scope="module")
def lvis_set():
    # 400 images, 90 classes (r/c/f), 60 detections an image over 20 boxes, kept 40 an image: the
    # per-image cut matters, and half of the detections are of unverified classes.
    gt, dets = make_set(400, num_categories=90, dets_per_image=60, boxes_per_image=20, size=(96, 128), seed=1)
    dets = list(dets)
    patch_lvis_for_numpy2()
    flat = [r for image in dets for r in image]
    with contextlib.redirect_stdout(io.StringIO()):
        expected = {t: _evaluate_predictions_on_lvis(_lvis_api(gt), copy.deepcopy(flat), t, max_dets_per_image=40)
                    for t in ("bbox", "segm")}
    return gt, dets, expected


@pytest.fixture(scope="module")
def coco_set():
    gt, dets = make_set(300, num_categories=15, lvis_style=False, dets_per_image=60, boxes_per_image=20,
                        size=(96, 128), seed=2)
    dets = list(dets)
    flat = [r for image in dets for r in image]
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = copy.deepcopy(gt)
        api.createIndex()
        expected = {t: list(_evaluate_predictions_on_coco(api, copy.deepcopy(flat), t, cocoeval_fn=COCOeval,
                                                          max_dets_per_image=[1, 10, 50]).stats)
                    for t in ("bbox", "segm")}
    return gt, dets, expected


def _run(gt, dets, lvis_style, **kw):
    return fast_eval.evaluate_results(fast_eval.GroundTruth(gt, lvis_style), iter(copy.deepcopy(dets)),
                                      ("bbox", "segm"), **kw)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dets_per_chunk", [1, 2_000, 10**9])  # one bucket a chunk, several, all at once
def test_lvis_figures_equal_the_lvis_packages(lvis_set, engine, dets_per_chunk):
    gt, dets, expected = lvis_set
    out = _run(gt, dets, True, max_dets=40, engine=engine, dets_per_chunk=dets_per_chunk,
               pairs_per_chunk=0 if dets_per_chunk > 2_000 else 5_000)
    for task in ("bbox", "segm"):
        got = {m: out[task].results[m] * 100 for m in LVIS_METRICS}
        assert all(abs(got[m] - expected[task][m]) < 1e-6 for m in LVIS_METRICS), (task, got, expected[task])
        assert 0 < got["AP"] < 100 and got["APr"] != got["APf"]  # a set where the figures say something


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dets_per_chunk", [1, 3_000])
def test_coco_stats_equal_pycocotools(coco_set, engine, dets_per_chunk):
    gt, dets, expected = coco_set
    assert any(a.get("iscrowd") for a in gt["annotations"])  # RLE crowd regions in the ground truth
    # the chunks shared out over two processes, or all in one
    out = _run(gt, dets, False, max_dets=50, engine=engine, dets_per_chunk=dets_per_chunk,
               processes=1 if dets_per_chunk == 1 else 2)
    for task in ("bbox", "segm"):
        stats = list(out[task].stats)
        assert len(stats) == 12
        assert all(abs(a - b) < 1e-6 for a, b in zip(stats, expected[task])), (task, stats, expected[task])
        assert out[task].eval["precision"].shape[2] == 15  # per-category precision, for detectron2's table


def test_chunks_hold_at_most_the_budget_unless_one_bucket_is_larger(tmp_path):
    b = fast_eval.Buckets(str(tmp_path), 50, per_bucket=8)  # 7 buckets
    b.counts = [5, 5, 20, 1, 1, 1, 0]
    b.images = [{1}, {2}, {1, 3}, {4}, {4}, {5}, set()]
    chunks = b.chunks(10)
    assert [c for chunk, _ in chunks for c in chunk] == list(range(7))  # every bucket once, in order
    assert chunks == [([0, 1], [1, 2]), ([2], [1, 3]), ([3, 4, 5, 6], [4, 5])]
    # At most 16 (image, category) pairs: 2 images x 8 categories, then 1 x 16 (two buckets).
    assert [c for c, _ in b.chunks(100, pairs_per_chunk=16)] == [[0], [1], [2], [3, 4], [5, 6]]


def test_the_per_image_cut_is_the_lvis_packages():
    recs = [{"score": s, "i": i} for i, s in enumerate([0.5, 0.9, 0.5, 0.1, 0.9])]
    assert [r["i"] for r in fast_eval.cut_per_image(recs, 3)] == [1, 4, 0]  # ties keep their order
    assert fast_eval.cut_per_image(recs, 10) is recs


def test_unknown_category_or_image_is_named(lvis_set):
    gt, dets, _ = lvis_set
    bad = copy.deepcopy(dets[:2])
    bad[1][0]["category_id"] = 9999
    with pytest.raises(KeyError, match="9999"):
        _run(gt, bad, True, engine="reference")
    bad = copy.deepcopy(dets[:1])
    for r in bad[0]:
        r["image_id"] = 123456
    with pytest.raises(KeyError, match="123456"):
        _run(gt, bad, True, engine="reference")


def test_an_error_in_the_second_process_is_raised_with_its_traceback(coco_set, monkeypatch):
    gt, dets, _ = coco_set
    real, parent = fast_eval.evaluate_chunk, os.getpid()

    def failing(gt_chunk, lines, task, **kw):
        if task == "segm" and os.getpid() != parent:
            raise ValueError("broken segm chunk")
        return real(gt_chunk, lines, task, **kw)

    monkeypatch.setattr(fast_eval, "evaluate_chunk", failing)
    with pytest.raises(RuntimeError, match="(?s)failed in a forked process.*broken segm chunk"):
        _run(gt, dets, False, processes=2, dets_per_chunk=1)  # a chunk per bucket: several


def test_engine_names_are_checked():
    with pytest.raises(ValueError, match="no_such"):
        fast_eval.resolve_engine("no_such")
    assert fast_eval.resolve_engine("auto") == "faster_coco_eval"  # installed in the test environment


def test_bucket_lines_give_back_the_exact_values():
    import numpy as np

    recs = [{"image_id": 3, "category_id": 7, "score": 0.1 + 0.2, "bbox": [1 / 3, 2, 1e-17, 123456.789],
             "segmentation": {"size": [4, 5], "counts": "a1b"}},
            {"image_id": 4, "category_id": 1, "score": np.float32(0.25), "bbox": [np.float64(1.5), 2.0, 3.0, 4.0],
             "segmentation": [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]}]
    for r in recs:
        line = fast_eval._encode(r)
        box, seg = fast_eval._decode(line, "bbox"), fast_eval._decode(line, "segm")
        assert box["bbox"] == [float(v) for v in r["bbox"]] and box["score"] == float(r["score"])
        assert seg["segmentation"] == r["segmentation"] and "bbox" not in seg and "segmentation" not in box
        assert (box["image_id"], box["category_id"]) == (r["image_id"], r["category_id"])
