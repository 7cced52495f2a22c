"""RegionSpotPredictor: shapes, agreement with the model and with SAM, feature reuse, vocabularies,
bad input, and the Python example of the README and docs/GETTING_STARTED.md."""
import contextlib
import logging
import os
import re

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from PIL import Image
from segment_anything import SamPredictor

from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.predictor import RegionResults, RegionSpotPredictor
from regionspot.structures import IndexedMasks

from conftest import ROOT, TINY_CONFIG, tiny_cfg

H, W = 96, 128
VOCAB = ["red circle", "green square", "blue triangle", "sky"]


def _image(seed: int = 0, size=(H, W)) -> np.ndarray:
    img = np.random.RandomState(seed).randint(80, 170, (*size, 3)).astype(np.uint8)
    img[20:60, 30:80] = (220, 30, 30)
    return img


@pytest.fixture
def predictor():
    return RegionSpotPredictor(tiny_cfg())


def _count_calls(obj, name: str) -> list:
    """Wrap obj.name so that each call appends its first argument; returns that list."""
    calls, original = [], getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append(args[0] if args else None)
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)
    return calls


@contextlib.contextmanager
def _capture_warnings(caplog):
    # detectron2's setup_logger turns propagation off; listen on our package's logger itself.
    log = logging.getLogger("regionspot")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="regionspot"):
            yield
    finally:
        log.removeHandler(caplog.handler)


def test_result_shapes_types_and_instances(predictor):
    predictor.set_image(_image())
    res = predictor.predict(boxes=[[30, 20, 80, 60], [-10, 5, 60, 200]], vocabulary=VOCAB, top_k=3)
    assert isinstance(res, RegionResults) and len(res) == 2 and res.image_size == (H, W)
    assert res.boxes.dtype == torch.float32 and res.boxes.shape == (2, 4)
    assert res.boxes[1].tolist() == [0, 5, 60, H]  # clipped to the image
    assert res.masks.dtype == torch.bool and res.masks.shape == (2, H, W)
    assert res.topk_classes.shape == (2, 3) and res.topk_classes.dtype == torch.long
    assert (res.topk_scores[:, :-1] >= res.topk_scores[:, 1:]).all()
    assert res.class_names == [VOCAB[i] for i in res.classes.tolist()]
    assert all(len(row) == 3 and row[0] == n for row, n in zip(res.topk_names, res.class_names))
    assert res.prompt_indices.tolist() == [0, 1]
    # All classes kept: they are a softmax over the vocabulary.
    full = predictor.predict(boxes=[[30, 20, 80, 60], [-10, 5, 60, 200]], vocabulary=VOCAB, top_k=99)
    assert full.topk_classes.shape == (2, len(VOCAB))
    assert torch.allclose(full.topk_scores.sum(1), torch.ones(2), atol=1e-5)
    assert torch.equal(full.topk_scores[:, :3], res.topk_scores)

    inst = res.to_instances()
    assert isinstance(inst, Instances) and len(inst) == 2 and inst.image_size == (H, W)
    assert isinstance(inst.pred_boxes, Boxes) and inst.pred_masks.shape == (2, H, W)
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    best = int(res.scores.argmax())
    assert inst.pred_classes[0] == res.classes[best] and inst.prompt_indices[0] == best
    pairs = res.to_instances(classes_per_region=3)
    assert len(pairs) == 6 and isinstance(pairs.pred_masks, IndexedMasks)
    assert pairs.pred_masks.masks.shape[0] == 2  # one mask per region, shared by its classes
    assert sorted(pairs.scores.tolist()) == sorted(res.topk_scores.flatten().tolist())
    with pytest.raises(ValueError, match="classes_per_region"):
        res.to_instances(classes_per_region=4)
    records = res.cpu().to_records()
    assert records[1]["box"] == [0, 5, 60, H] and len(records[0]["alternatives"]) == 3
    assert len(res[res.scores > 2]) == 0 and len(res[1]) == 1
    one = res[np.int64(1)]  # a NumPy integer picks one region too, every field alike
    assert len(one) == 1 and torch.equal(one.boxes, res.boxes[1:]) and torch.equal(one.masks, res.masks[1:])
    assert repr(one).startswith("RegionResults(num_regions=1,") and one.class_names == res.class_names[1:]
    assert predictor.predict(boxes=[[30, 20, 80, 60]], vocabulary=VOCAB, return_masks=False).masks is None


def test_predictions_equal_the_models_own_inference(predictor):
    """Same boxes through RegionSpot.forward and through the predictor: same scores and masks."""
    h, w = 97, 131  # an odd size, where SAM's two ways of pasting masks differ in a few pixels
    image = _image(1, (h, w))
    boxes = torch.tensor([[30.0, 20, 80, 60], [5, 5, 120, 90], [60, 40, 100, 95]])
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(boxes.clone())
    model = predictor.model
    out = model([{"image": torch.as_tensor(image).permute(2, 0, 1), "height": h, "width": w,
                  "instances": inst, "vocabulary": "synthetic_shapes_val"}])[0]["instances"]
    predictor.set_image(image)
    res = predictor.predict(boxes=boxes, vocabulary="synthetic_shapes_val", top_k=6)
    assert res.vocabulary == MetadataCatalog.get("synthetic_shapes_val").thing_classes
    probs = torch.zeros(3, 6)
    probs.scatter_(1, res.topk_classes, res.topk_scores)
    for box, cls, score in zip(out.pred_boxes.tensor, out.pred_classes, out.scores):
        i = int((boxes == box).all(1).nonzero())
        assert torch.isclose(probs[i, cls], score, atol=1e-5)
    for k in range(len(out)):
        i = int((boxes == out.pred_boxes.tensor[k]).all(1).nonzero())
        assert torch.equal(out.pred_masks[k], res.masks[i])


def test_point_prompts_decode_as_sams_own_predictor(predictor):
    predictor.set_image(_image())
    feats, sam = predictor.features, predictor.model.sam_encoder.sam
    points = torch.tensor([[[50.0, 40.0], [10.0, 10.0]], [[100.0, 70.0], [90.0, 20.0]]])
    labels = torch.tensor([[1, 0], [1, 1]])
    box = torch.tensor([[30.0, 20, 80, 60], [60, 10, 120, 90]])
    reference = SamPredictor(sam)
    reference.features = feats.sam_embedding[None]
    reference.original_size, reference.input_size = feats.image_size, feats.input_size
    reference.is_image_set = True
    t = reference.transform
    for kw in ({"points": points, "point_labels": labels}, {"boxes": box, "points": points, "point_labels": labels}):
        _, low_res = predictor.model.sam_encoder.decode_prompts(feats.sam_embedding, feats.image_size, **kw)
        _, _, expected = reference.predict_torch(
            t.apply_coords_torch(points, feats.image_size), labels,
            boxes=t.apply_boxes_torch(box, feats.image_size) if "boxes" in kw else None, multimask_output=False,
        )
        assert torch.allclose(low_res, expected, atol=1e-5)

    res = predictor.predict(points=points, point_labels=labels, vocabulary=VOCAB)
    assert len(res) == 2 and res.masks.shape == (2, H, W)
    for i in range(2):  # a point region's box is its mask's box
        ys, xs = res.masks[i].nonzero(as_tuple=True)
        if len(xs):
            assert res.boxes[i].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    one = predictor.predict(points=[[50, 40]], point_labels=[1], vocabulary=VOCAB)  # (P, 2): one region
    assert len(one) == 1
    both = predictor.predict(boxes=box, points=points, point_labels=labels, vocabulary=VOCAB)
    assert torch.equal(both.boxes, box)


def test_image_features_are_computed_once_per_image(predictor):
    sam_calls = _count_calls(predictor.model.sam_encoder, "encode_images")
    clip_calls = _count_calls(predictor.model.clip_encoder, "encode_image_tokens")
    text_calls = _count_calls(predictor.model.clip_encoder, "encode_text")
    predictor.set_image(_image())
    assert (len(sam_calls), len(clip_calls)) == (1, 1)
    first = predictor.predict(boxes=[[30, 20, 80, 60]], vocabulary=VOCAB)
    predictor.predict(boxes=[[0, 0, 50, 50], [10, 10, 90, 90]], vocabulary="synthetic_shapes_val")
    predictor.predict(points=[[[40, 30]]], point_labels=[[1]], vocabulary=["cat", "dog"])
    again = predictor.predict(boxes=[[30, 20, 80, 60]], vocabulary=VOCAB)
    assert (len(sam_calls), len(clip_calls)) == (1, 1)
    # Three vocabularies, each encoded once: VOCAB's second use comes from memory.
    assert sum(len(c) for c in text_calls) == len(VOCAB) + 6 + 2
    assert torch.equal(first.topk_scores, again.topk_scores)
    predictor.set_image(_image(2))
    assert (len(sam_calls), len(clip_calls)) == (2, 2)


def test_vocabulary_swap_keeps_features_and_changes_classes(predictor):
    predictor.set_image(_image())
    boxes = [[30, 20, 80, 60], [5, 5, 120, 90]]
    a = predictor.predict(boxes=boxes, vocabulary=["cat", "dog"], top_k=2)
    b = predictor.predict(boxes=boxes, vocabulary=["boat", "car", "tree"], top_k=3)
    a2 = predictor.predict(boxes=boxes, vocabulary=["cat", "dog"], top_k=2)
    assert set(a.class_names) <= {"cat", "dog"} and set(b.class_names) <= {"boat", "car", "tree"}
    assert b.topk_classes.shape == (2, 3) and torch.equal(a.topk_scores, a2.topk_scores)
    d = predictor.predict(boxes=boxes)  # the config's test dataset is the default vocabulary
    assert d.vocabulary == list(MetadataCatalog.get("synthetic_shapes_val").thing_classes)
    # A synonym entry averages the names' embeddings.
    names, emb = predictor.vocabulary_embeddings([["red_circle", "red circle"], "sky"])
    _, parts = predictor.vocabulary_embeddings(["red_circle", "red circle"])
    assert names == ["red_circle", "sky"]
    assert torch.allclose(emb[0], torch.nn.functional.normalize(parts.sum(0), dim=0), atol=1e-6)


def test_new_clip_weights_invalidate_cached_vocabularies(predictor):
    names = ["cat", "dog"]
    _, before = predictor.vocabulary_embeddings(names)
    clip = predictor.model.clip_encoder
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in clip.state_dict().items()}
    clip.load_state_dict(state)
    _, after = predictor.vocabulary_embeddings(names)
    assert not torch.allclose(before, after)
    want = torch.nn.functional.normalize(predictor.model.vocabulary.encode_prompts(["a photo of a cat.", "a photo of a dog."]), dim=-1)
    assert torch.allclose(after, want, atol=1e-6)


def test_predict_batch_matches_single_images_and_batches_the_encoders(predictor):
    images = [_image(i) for i in range(3)]
    boxes = [[[30, 20, 80, 60]], [[0, 0, 64, 64], [10, 10, 120, 90]], np.zeros((0, 4))]
    predictor.set_image(images[0])
    sam_calls = _count_calls(predictor.model.sam_encoder, "encode_images")
    batch = predictor.predict_batch(images, boxes=boxes, vocabulary=VOCAB, batch_size=2)
    assert [x.shape[0] for x in sam_calls] == [2, 1]
    assert [len(r) for r in batch] == [1, 2, 0]
    for img, b, r in zip(images, boxes, batch):
        predictor.set_image(img)
        single = predictor.predict(boxes=b, vocabulary=VOCAB)
        assert torch.allclose(single.topk_scores, r.topk_scores, atol=1e-5)
    with pytest.raises(ValueError, match="one entry per image"):
        predictor.predict_batch(images, boxes=boxes[:2], vocabulary=VOCAB)


def test_image_formats_are_equivalent(predictor, tmp_path):
    rgb = _image()
    predictor.set_image(rgb)
    ref = predictor.predict(boxes=[[30, 20, 80, 60]], vocabulary=VOCAB).topk_scores
    path = str(tmp_path / "x.png")
    Image.fromarray(rgb).save(path)
    for image, fmt in ((rgb[:, :, ::-1].copy(), "BGR"), (Image.fromarray(rgb), "RGB"), (path, "RGB"),
                       (torch.as_tensor(rgb).permute(2, 0, 1), "RGB")):
        predictor.set_image(image, format=fmt)
        assert torch.allclose(predictor.predict(boxes=[[30, 20, 80, 60]], vocabulary=VOCAB).topk_scores, ref)
    assert predictor.image.shape == (H, W, 3)


BAD_INPUTS = [
    ({"boxes": [[1, 2, 3]]}, "shape \\(N, 4\\)"),
    ({"boxes": [[[1, 2, 3, 4]]]}, "shape \\(N, 4\\)"),
    ({"boxes": [[1, 2, 3, 4], [1, 2]]}, "numeric array"),
    ({"boxes": [[1, 2, float("nan"), 4]]}, "NaN or infinite"),
    ({"boxes": [[0, 0, 5, 5], [1, 2, float("inf"), 4]]}, "NaN or infinite coordinates at rows \\[1\\]"),
    ({"points": [[[1, 2]]]}, "points need point_labels"),
    ({"point_labels": [[1]]}, "without points"),
    ({"points": [[[1, float("nan")]]], "point_labels": [[1]]}, "NaN or infinite"),
    ({"points": [[[1, 2]]], "point_labels": [[1, 1]]}, "must have shape \\(1, 1\\)"),
    ({"points": [[[1, 2]]], "point_labels": [[2]]}, "1 \\(foreground\\)"),
    ({"points": [[[500, 2]]], "point_labels": [[1]]}, "outside"),
    ({"points": [[1, 2, 3]], "point_labels": [1]}, "\\(N, P, 2\\)"),
    ({"boxes": [[0, 0, 5, 5]], "points": [[[1, 2]], [[3, 3]]], "point_labels": [[1], [1]]}, "same regions"),
    ({}, "Give region prompts"),
    ({"boxes": [[0, 0, 5, 5]], "vocabulary": []}, "is empty"),
    ({"boxes": [[0, 0, 5, 5]], "vocabulary": ["cat", "dog", "cat"]}, "more than once: \\['cat'\\]"),
    ({"boxes": [[0, 0, 5, 5]], "vocabulary": ["cat", ""]}, "empty class names"),
    ({"boxes": [[0, 0, 5, 5]], "vocabulary": ""}, "empty string"),
    ({"boxes": [[0, 0, 5, 5]], "top_k": 0}, "top_k"),
    ({"boxes": [[0, 0, 5, 5]], "prompt_scores": [0.5, 0.5]}, "one score per region"),
    ({"boxes": [[0, 0, 5, 5]], "prompt_scores": [float("nan")]}, "finite"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_prompts_and_vocabularies_raise_clear_errors(predictor, kwargs, message):
    predictor.set_image(_image())
    kwargs.setdefault("vocabulary", VOCAB)
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


def test_bad_images_and_state(predictor, tmp_path):
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(boxes=[[0, 0, 5, 5]], vocabulary=VOCAB)
    for bad in (np.zeros((4, 4, 4), np.uint8), np.zeros((0, 5, 3), np.uint8), np.zeros(5)):
        with pytest.raises(ValueError, match="image"):
            predictor.set_image(bad)
    with pytest.raises(ValueError, match="'RGB' or 'BGR'"):
        predictor.set_image(_image(), format="HSV")
    with pytest.raises(FileNotFoundError, match="Text-embedding file not found"):
        predictor.set_image(_image())
        predictor.predict(boxes=[[0, 0, 5, 5]], vocabulary=str(tmp_path / "missing.pth"))
    with pytest.raises(KeyError, match="Unknown vocabulary 'no_such_dataset'"):
        predictor.predict(boxes=[[0, 0, 5, 5]], vocabulary="no_such_dataset")


def test_boxes_outside_the_image_are_clipped_and_empty_ones_dropped(predictor, caplog):
    predictor.set_image(_image())
    with _capture_warnings(caplog):
        res = predictor.predict(boxes=[[10, 10, 10, 50], [200, 10, 300, 50], [-20, -20, 50, 40]],
                                prompt_scores=[0.9, 0.8, 0.5], vocabulary=VOCAB, top_k=4)
    assert "Dropped 2 of 3 boxes" in caplog.text
    assert res.prompt_indices.tolist() == [2] and res.boxes.tolist() == [[0, 0, 50, 40]]
    assert torch.isclose(res.topk_scores.sum(), torch.tensor(0.5))  # probabilities x prompt score
    with _capture_warnings(caplog):
        caplog.clear()
        empty = predictor.predict(boxes=[[5, 5, 5, 5]], vocabulary=VOCAB)
    assert len(empty) == 0 and empty.masks.shape == (0, H, W) and len(empty.to_instances()) == 0
    assert "Dropped 1 of 1 boxes" in caplog.text


def test_built_from_config_file_and_weights(tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg)
    with torch.no_grad():
        model.head.projector.weight.fill_(0.25)
    RegionSpotCheckpointer(model, str(tmp_path)).save("head")
    pred = RegionSpotPredictor.from_config_file(TINY_CONFIG, weights=str(tmp_path / "head.pth"),
                                                opts=["MODEL.DEVICE", "cpu"], top_k=2)
    assert torch.equal(pred.model.head.projector.weight, model.head.projector.weight)
    assert pred.top_k == 2 and not pred.model.training and pred.device.type == "cpu"
    assert RegionSpotPredictor(model=model).model is model
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        RegionSpotPredictor.from_config_file(TINY_CONFIG, weights=str(tmp_path / "missing.pth"),
                                             opts=["MODEL.DEVICE", "cpu"])
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        RegionSpotPredictor.from_config_file(str(tmp_path / "no_such.yaml"))


def _python_block(relpath: str, heading: str) -> str:
    """The one ```python block under `heading` (a whole heading line, up to the next heading of its
    level or above) in a Markdown file of the repository."""
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
        lines = f.read().split("\n")
    level = len(heading.split(" ", 1)[0])
    start = lines.index(heading) + 1
    section, fenced = [], False
    for line in lines[start:]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,%d} " % level, line):
            break
        section.append(line)
    blocks = re.findall(r"```python\n(.*?)```", "\n".join(section), flags=re.S)
    assert len(blocks) == 1, (relpath, heading, len(blocks))
    return blocks[0]


def test_readme_python_example_runs(monkeypatch, capsys, tmp_path):
    """The README's predictor example and its continuation in docs/GETTING_STARTED.md are executed
    as written, one after the other in one namespace, so they cannot drift from the code."""
    readme_block = _python_block("README.md", "### Predictor")
    docs_block = _python_block(os.path.join("docs", "GETTING_STARTED.md"), "## Python API")
    # The example reads the head the quickstart trains: give it one in a fresh folder (the config
    # path then resolves through the model zoo, as it does from any directory).
    monkeypatch.chdir(tmp_path)
    from regionspot.config import get_regionspot_cfg
    cfg = get_regionspot_cfg(os.path.join(ROOT, "configs", "quickstart", "RegionSpot-tiny_synthetic.yaml"),
                             ["MODEL.DEVICE", "cpu"])
    RegionSpotCheckpointer(build_model(cfg), "output/quickstart").save("model_final")
    capsys.readouterr()
    namespace = {}
    exec(compile(readme_block, "README.md (Predictor)", "exec"), namespace)
    assert len(capsys.readouterr().out.splitlines()) == 2
    exec(compile(docs_block, "docs/GETTING_STARTED.md (Python API)", "exec"), namespace)
    assert isinstance(namespace["predictor"], RegionSpotPredictor)
    assert [len(r) for r in namespace["results"]] == [1, 1]
    assert len(capsys.readouterr().out.splitlines()) == 2


# ------------------------------------------------------------------ detectron2 objects as prompts
def test_boxes_and_instances_as_prompts(predictor):
    image = _image()
    predictor.set_image(image)
    h, w = image.shape[:2]
    raw = torch.tensor([[5.0, 5.0, 60.0, 50.0], [30.0, 20.0, 100.0, 90.0]])
    ref = predictor.predict(boxes=raw, vocabulary=VOCAB, top_k=3)
    via_boxes = predictor.predict(boxes=Boxes(raw), vocabulary=VOCAB, top_k=3)
    torch.testing.assert_close(via_boxes.topk_scores, ref.topk_scores)
    dets = Instances((h, w))
    dets.pred_boxes = Boxes(raw)
    dets.scores = torch.tensor([0.5, 1.0])  # a detector's confidence: multiplied in
    via_inst = predictor.predict(boxes=dets, vocabulary=VOCAB, top_k=3)
    torch.testing.assert_close(via_inst.topk_scores, ref.topk_scores * dets.scores[:, None])
    torch.testing.assert_close(via_inst.boxes, raw)
    # A detector that found nothing: an empty result, and empty Instances.
    for empty in (Boxes(torch.zeros(0, 4)), dets[:0], torch.zeros(0, 4)):
        res = predictor.predict(boxes=empty, vocabulary=VOCAB)
        assert len(res) == 0 and len(res.to_instances()) == 0 and len(res.to_detections(10)) == 0
    other = Instances((h + 1, w))
    other.pred_boxes = Boxes(raw)
    with pytest.raises(ValueError, match="not of the"):
        predictor.predict(boxes=other, vocabulary=VOCAB)


def test_to_detections_is_evaluations_policy(synthetic_val):
    """`to_detections(K)` keeps the image's K best pairs, as --eval-only does; `to_instances`
    keeps each region's best class."""
    from detectron2.data import DatasetCatalog
    from regionspot.data.dataset_mapper import RegionSpotDatasetMapper

    cfg = tiny_cfg("TEST.DETECTIONS_PER_IMAGE", "5")
    pred = RegionSpotPredictor(cfg)
    d = next(d for d in DatasetCatalog.get(synthetic_val) if len(d["annotations"]) >= 3)
    x = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)(d)
    ev = pred.model([x])[0]["instances"]
    pred.set_image(d["file_name"])
    res = pred.predict(boxes=x["instances"].gt_boxes, vocabulary=synthetic_val)
    det = res.to_detections(5)
    torch.testing.assert_close(det.scores, ev.scores, rtol=1e-5, atol=1e-7)
    assert det.pred_classes.tolist() == ev.pred_classes.tolist()
    torch.testing.assert_close(det.pred_boxes.tensor, ev.pred_boxes.tensor, rtol=1e-5, atol=1e-4)
    assert len(res.to_instances()) == len(d["annotations"])  # one per region: another policy
