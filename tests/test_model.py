"""The RegionSpot meta-architecture on the tiny random SAM and CLIP (CPU)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import Boxes, Instances

from regionspot import RegionSpot
from regionspot.dataset_mapper import RegionSpotDatasetMapper
from regionspot.structures import IndexedMasks

from conftest import tiny_cfg


def _build(*opts, state=None):
    model = build_model(tiny_cfg(*opts)).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def _test_inputs(cfg, dataset):
    mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=dataset)
    return [mapper(d) for d in DatasetCatalog.get(dataset)]


@pytest.fixture(scope="module")
def val_inputs(synthetic_val):
    return _test_inputs(tiny_cfg(), synthetic_val)


def _busiest(inputs):
    return max(inputs, key=lambda x: len(x["instances"]))


def _pairs(instances):
    """{(box coordinates rounded, class): score} of one image's detections."""
    boxes = instances.pred_boxes.tensor.tolist()
    return {
        (tuple(round(v, 3) for v in b), int(c)): float(s)
        for b, c, s in zip(boxes, instances.pred_classes.tolist(), instances.scores.tolist())
    }


def _region_embeddings(model, x, boxes=None):
    """Per-region head embeddings of one image, computed through the model's own steps."""
    boxes = x["instances"].gt_boxes.tensor if boxes is None else boxes
    sam_emb, _, clip_tokens = model.encode_images([x["image"]])
    tokens, _ = model.decode_regions(sam_emb[0], tuple(x["image"].shape[-2:]), boxes=boxes)
    with torch.no_grad():
        return tokens, model.embed_regions([tokens], clip_tokens)[0]


# ---------------------------------------------------------------------------------- building
def test_meta_arch_is_registered_and_built_on_configured_device():
    assert "RegionSpot" in META_ARCH_REGISTRY
    assert META_ARCH_REGISTRY.get("RegionSpot") is RegionSpot
    cfg = tiny_cfg()
    model = build_model(cfg)
    assert type(model) is RegionSpot
    device = torch.device(cfg.MODEL.DEVICE)
    assert model.device == device
    assert all(p.device == device for p in model.parameters())
    assert all(b.device == device for b in model.buffers())


# ---------------------------------------------------------------------------------- training
def _online_training_opts():
    # Region tokens computed by SAM inside the step (not read from an offline token cache), where
    # the config has that choice.
    return ["MODEL.REGIONSPOT.TOKEN_MODE", "online"] if "TOKEN_MODE" in tiny_cfg().MODEL.REGIONSPOT else []


def test_training_updates_only_the_head(synthetic_val):
    cfg = tiny_cfg(*_online_training_opts())
    model = build_model(cfg)
    model.train()
    # The frozen encoders stay in eval mode (no dropout / drop-path there), the head trains.
    assert model.head.training
    assert all(not m.training for m in model.sam_encoder.modules())
    assert all(not m.training for m in model.clip_encoder.modules())

    # The train mapper with the config's own augmentations (resizes, flips) works as it is.
    mapper = RegionSpotDatasetMapper(cfg, is_train=True, dataset_name=synthetic_val)
    inputs = [mapper(d) for d in DatasetCatalog.get(synthetic_val)[:3]]
    assert all(len(x["instances"]) > 0 for x in inputs)
    losses = model(inputs)
    assert set(losses) == {"loss_focal"}
    loss = losses["loss_focal"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()

    head_params = dict(model.head.named_parameters())
    assert head_params
    for name, p in head_params.items():
        assert p.requires_grad, name
        assert p.grad is not None, f"head.{name} got no gradient"
    assert any(p.grad.abs().sum() > 0 for p in head_params.values())
    frozen = list(model.sam_encoder.named_parameters()) + list(model.clip_encoder.named_parameters())
    assert frozen
    for name, p in frozen:
        assert not p.requires_grad, name
        assert p.grad is None, name
    # Every trainable parameter of the whole model is a head parameter.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in head_params.values()}


# ---------------------------------------------------------------------------------- outputs
def test_outputs_fields_sizes_and_shared_masks(val_inputs):
    model = _build()
    x = _busiest(val_inputs)
    n_boxes = len(x["instances"])
    assert n_boxes >= 2
    inst = model([x])[0]["instances"]
    num_classes = len(model.text_embeddings(x["vocabulary"])[0])
    assert inst.image_size == (x["height"], x["width"])
    assert len(inst) == min(300, n_boxes * num_classes)
    assert inst.pred_boxes.tensor.shape == (len(inst), 4)
    assert inst.scores.shape == inst.pred_classes.shape == (len(inst),)
    assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
    assert ((inst.pred_classes >= 0) & (inst.pred_classes < num_classes)).all()
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    # Every (box, class) pair appears once, and the scores of one box sum to 1 (a softmax).
    pairs = _pairs(inst)
    assert len(pairs) == len(inst)
    per_box = {}
    for (box, _), s in pairs.items():
        per_box[box] = per_box.get(box, 0.0) + s
    assert len(per_box) == n_boxes
    assert all(abs(v - 1.0) < 1e-4 for v in per_box.values())

    masks = inst.pred_masks
    assert isinstance(masks, IndexedMasks)
    assert masks.shape == (len(inst), x["height"], x["width"])
    assert masks.tensor.dtype == torch.bool
    # One mask per box, shared by every class of that box.
    boxes = inst.pred_boxes.tensor
    _, box_id = torch.unique(boxes, dim=0, return_inverse=True)
    assert masks.masks.shape[0] == n_boxes == len(torch.unique(masks.index))
    for b in range(n_boxes):
        rows = (box_id == b).nonzero().flatten()
        assert len(torch.unique(masks.index[rows])) == 1
        dense = masks.tensor[rows]
        assert (dense == dense[:1]).all()


def test_top_k_respects_max_dets(val_inputs):
    x = _busiest(val_inputs)
    full_model = _build()
    full = full_model([x])[0]["instances"]
    k = 5
    assert len(full) > k
    top = _build("TEST.DETECTIONS_PER_IMAGE", str(k), state=full_model.state_dict())([x])[0]["instances"]
    assert len(top) == k == len(top.pred_masks)
    torch.testing.assert_close(top.scores, full.scores[:k])
    assert set(_pairs(top)) == set(list(_pairs(full))[:k])


def test_outputs_come_at_height_width_when_image_is_downscaled(val_inputs):
    x = _busiest(val_inputs)
    h, w = x["height"], x["width"]
    small = copy.copy(x)
    small["image"] = F.interpolate(x["image"][None].float(), scale_factor=0.5, mode="bilinear",
                                   antialias=True, align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
    sh, sw = small["image"].shape[-2:]
    assert (sh, sw) == (h // 2, w // 2)
    inst_small = Instances((sh, sw))
    inst_small.gt_boxes = Boxes(x["instances"].gt_boxes.tensor * 0.5)
    inst_small.gt_classes = x["instances"].gt_classes
    small["instances"] = inst_small
    assert small["height"] == h and small["width"] == w

    inst = _build()([small])[0]["instances"]
    assert inst.image_size == (h, w)
    assert inst.pred_masks.shape == (len(inst), h, w)
    # Boxes come back in the coordinates of the full-size image.
    want = {tuple(b) for b in x["instances"].gt_boxes.tensor.round(decimals=2).tolist()}
    got = {tuple(b) for b in inst.pred_boxes.tensor.round(decimals=2).tolist()}
    assert got == want


def test_a_batch_of_images_of_different_sizes_equals_one_image_at_a_time(val_inputs):
    """Batched inference (TEST_IMS_PER_BATCH > 1) pads SAM inputs and squashes CLIP inputs to one
    size, so images of different sizes share a forward; each must come out as if alone."""
    model = _build()
    x = _busiest(val_inputs)
    small = copy.copy(x)
    small["image"] = x["image"][:, : x["image"].shape[1] * 2 // 3, : x["image"].shape[2] // 2].contiguous()
    sh, sw = small["image"].shape[-2:]
    inst = Instances((sh, sw))
    inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, sw * 0.6, sh * 0.7], [sw * 0.3, sh * 0.2, sw - 2.0, sh - 3.0]]))
    small["instances"], small["height"], small["width"] = inst, sh, sw
    batch = [x, small, val_inputs[0]]
    together = [r["instances"] for r in model(batch)]
    alone = [model([b])[0]["instances"] for b in batch]
    for a, t in zip(alone, together):
        assert t.image_size == a.image_size
        assert len(t) == len(a) > 0
        pa, pt = _pairs(a), _pairs(t)
        assert set(pa) == set(pt)
        assert max(abs(pa[k] - pt[k]) for k in pa) < 1e-4
        ma, mt = a.pred_masks.tensor, t.pred_masks.tensor
        assert ma.shape == mt.shape
        # Masks may differ where a logit sits at the threshold; they must agree almost everywhere.
        assert (ma != mt).float().mean() < 1e-3


@pytest.mark.parametrize("chunk", [1, 3, 0])
def test_decoding_in_chunks_equals_decoding_all_boxes_at_once(val_inputs, chunk):
    model = _build()
    x = _busiest(val_inputs)
    boxes = torch.cat([x["instances"].gt_boxes.tensor] * 3)  # 3x the boxes: several chunks of any size
    size = tuple(x["image"].shape[-2:])
    sam_emb, _, _ = model.encode_images([x["image"]])
    enc = model.sam_encoder
    enc.decode_chunk = len(boxes)
    tokens, masks = enc.decode_boxes(sam_emb[0], boxes, size)
    enc.decode_chunk = chunk
    if chunk == 0:
        assert enc.chunk_for(torch.device("cpu")) == 4 < len(boxes)
    t2, m2 = enc.decode_boxes(sam_emb[0], boxes, size)
    assert t2.shape == tokens.shape == (len(boxes), enc.token_dim)
    torch.testing.assert_close(t2, tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m2, masks, atol=1e-4, rtol=1e-4)


def test_negative_decode_chunk_is_refused():
    with pytest.raises(ValueError, match="DECODE_CHUNK"):
        _build("MODEL.REGIONSPOT.SAM.DECODE_CHUNK", "-1")


# ---------------------------------------------------------------------------------- edge cases
def test_image_without_boxes_gives_empty_instances(val_inputs):
    model = _build()
    x = _busiest(val_inputs)
    empty = copy.copy(val_inputs[0])
    empty["instances"] = val_inputs[0]["instances"][:0]

    alone = model([empty])[0]["instances"]
    assert len(alone) == 0
    assert alone.image_size == (empty["height"], empty["width"])

    with_other, normal = (o["instances"] for o in model([empty, x]))
    assert len(with_other) == 0
    # The normal image is unaffected by its empty neighbour.
    reference = model([x])[0]["instances"]
    assert len(normal) == len(reference) > 0
    torch.testing.assert_close(normal.scores, reference.scores, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(normal.pred_boxes.tensor, reference.pred_boxes.tensor)


def test_boxes_are_clipped_and_zero_area_boxes_dropped(val_inputs):
    model = _build()
    x = copy.copy(val_inputs[0])
    h, w = x["image"].shape[-2:]
    boxes = torch.tensor([
        [-10.0, -5.0, 50.0, 60.0],          # sticks out top-left
        [w - 40.0, h - 30.0, w + 25.0, h + 40.0],  # sticks out bottom-right
        [20.0, 20.0, 80.0, 90.0],           # inside
        [30.0, 40.0, 30.0, 90.0],           # zero width
        [w + 5.0, 10.0, w + 60.0, 50.0],    # entirely right of the image: zero area once clipped
    ])
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(boxes.clone())
    inst.gt_classes = torch.zeros(len(boxes), dtype=torch.long)
    x["instances"] = inst
    out = model([x])[0]["instances"]
    num_classes = len(model.text_embeddings(x["vocabulary"])[0])
    assert len(out) == 3 * num_classes
    got = {tuple(b) for b in out.pred_boxes.tensor.tolist()}
    assert got == {(0.0, 0.0, 50.0, 60.0), (w - 40.0, h - 30.0, float(w), float(h)), (20.0, 20.0, 80.0, 90.0)}
    # The caller's boxes are not modified.
    torch.testing.assert_close(x["instances"].gt_boxes.tensor, boxes)


def test_nan_box_is_refused(val_inputs):
    model = _build()
    x = copy.copy(val_inputs[0])
    inst = Instances(x["instances"].image_size)
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 50.0, 50.0], [float("nan"), 5.0, 30.0, 40.0]]))
    inst.gt_classes = torch.zeros(2, dtype=torch.long)
    x["instances"] = inst
    with pytest.raises(ValueError, match="NaN"):
        model([x])


# ---------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("field", ["objectness_logits", "scores"])
def test_score_is_class_prob_times_proposal_score(val_inputs, field):
    x = _busiest(val_inputs)
    boxes = x["instances"].gt_boxes.tensor
    n = len(boxes)
    logits = torch.linspace(-2.0, 3.0, n)
    props = Instances(x["instances"].image_size)
    props.proposal_boxes = Boxes(boxes.clone())
    if field == "objectness_logits":
        props.objectness_logits = logits
    else:
        props.scores = logits.sigmoid()
    inp = {k: v for k, v in x.items() if k != "instances"}
    inp["proposals"] = props

    with_score = _build("MODEL.REGIONSPOT.PROMPT", "proposals")
    without = _build("MODEL.REGIONSPOT.PROMPT", "proposals", "MODEL.REGIONSPOT.USE_PROPOSAL_SCORE", "False",
                     state=with_score.state_dict())
    a = _pairs(with_score([inp])[0]["instances"])
    b = _pairs(without([inp])[0]["instances"])
    assert set(a) == set(b) and len(a) == n * len(with_score.text_embeddings(x["vocabulary"])[0])
    box_score = {tuple(round(v, 3) for v in bx): s for bx, s in zip(boxes.tolist(), logits.sigmoid().tolist())}
    for key, prob in b.items():
        assert a[key] == pytest.approx(prob * box_score[key[0]], rel=1e-4, abs=1e-7)
    # Without the proposal score, the class probabilities of a box sum to one.
    sums = {}
    for (box, _), s in b.items():
        sums[box] = sums.get(box, 0.0) + s
    assert all(abs(v - 1) < 1e-4 for v in sums.values())


# ---------------------------------------------------------------------------------- autocast
def test_bf16_autocast_agrees_with_fp32(val_inputs, tmp_path):
    # Separate text caches, so each model encodes the class names itself.
    fp32 = _build("MODEL.REGIONSPOT.TEXT.CACHE_DIR", str(tmp_path / "fp32"))
    bf16 = _build("MODEL.REGIONSPOT.AUTOCAST", "bf16", "MODEL.REGIONSPOT.TEXT.CACHE_DIR", str(tmp_path / "bf16"),
                  state=fp32.state_dict())
    x = _busiest(val_inputs)
    text32 = fp32.text_embeddings(x["vocabulary"])[1]
    text16 = bf16.text_embeddings(x["vocabulary"])[1]
    assert F.cosine_similarity(text32, text16, dim=-1).min() >= 0.99
    tok32, emb32 = _region_embeddings(fp32, x)
    tok16, emb16 = _region_embeddings(bf16, x)
    # The bf16 path really runs in reduced precision: results are close but not bit-equal.
    assert not torch.equal(tok32, tok16)
    # bf16 keeps 8 mantissa bits (relative rounding ~4e-3 per value). Errors of that relative size,
    # spread over many coordinates, lower a cosine by ~1e-5 (1 - eps^2/2), and a few layers
    # accumulate them; 0.99 leaves a wide margin for that while any real bug (wrong layout, a
    # skipped block, fp16 overflow) gives cosines far below it.
    assert F.cosine_similarity(tok32, tok16, dim=-1).min() >= 0.99
    assert F.cosine_similarity(emb32, emb16, dim=-1).min() >= 0.99

    out32 = fp32([x])[0]["instances"]
    out16 = bf16([x])[0]["instances"]
    p32, p16 = _pairs(out32), _pairs(out16)
    # Same boxes kept, with every class of every box (top-K covers all pairs here).
    assert set(p32) == set(p16)
    # Probabilities come from 100 * cosine: a 1e-4 cosine error moves a logit by 0.01, i.e. a
    # probability by ~1% of itself; 0.02 absolute is honest for bf16 encoders and a fp32 head.
    for key in p32:
        assert p16[key] == pytest.approx(p32[key], abs=0.02)


# ---------------------------------------------------------------------------------- sam_auto
def test_sam_auto_prompts_produce_instances(val_inputs):
    model = _build(
        "MODEL.REGIONSPOT.PROMPT", "sam_auto",
        "MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", "4",
        "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH", "0.0",
        "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH", "0.0",
    )
    x = {k: v for k, v in val_inputs[0].items() if k != "instances"}  # sam_auto needs no boxes
    inst = model([x])[0]["instances"]
    h, w = x["height"], x["width"]
    num_classes = len(model.text_embeddings(x["vocabulary"])[0])
    assert isinstance(inst, Instances) and inst.image_size == (h, w)
    assert len(inst) > 0 and len(inst) % num_classes == 0
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h).all()
    assert inst.pred_masks.shape == (len(inst), h, w)
