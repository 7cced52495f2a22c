"""SAM 2 as the localization backbone (MODEL.REGIONSPOT.SAM.TYPE sam2.*), on the tiny random SAM 2
("sam2_tiny") on the CPU: features, tokens and masks as the sam2 package's own image predictor
gives them, the whole RegionSpot model on it, checkpoints, automatic-mask boxes and the missing
extra."""
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.sam2_image_predictor import SAM2ImagePredictor

from regionspot.data.dataset_mapper import RegionSpotDatasetMapper
from regionspot.data.synthetic import make_synthetic_lvis, register_synthetic_lvis
from regionspot.data.token_cache import load_tokens, token_cache_folder, token_file
from regionspot.data.token_extraction import extract_tokens
from regionspot.modeling.encoders import build_sam_encoder, region_encoder_types, sam_type_random_by_default
from regionspot.modeling.encoders.sam2_encoder import SAM2_MODELS, Sam2Features, Sam2RegionEncoder, build_sam2_model
from regionspot.modeling.encoders.sam_encoder import SAM_TYPES, build_tiny_sam
from regionspot.predictor import RegionSpotPredictor
from regionspot.utils.extras import MissingExtraError

from conftest import tiny_cfg

H, W = 96, 128  # not square: SAM 2 squashes the image to its square input
SAM2 = ("MODEL.REGIONSPOT.SAM.TYPE", "sam2_tiny")
AUTO = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def _image(seed: int = 0, size=(H, W)) -> np.ndarray:
    img = np.random.RandomState(seed).randint(80, 170, (*size, 3)).astype(np.uint8)
    img[20:60, 30:80] = (220, 30, 30)
    return img


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1)


@pytest.fixture(scope="module")
def enc() -> Sam2RegionEncoder:
    return Sam2RegionEncoder(build_sam2_model("sam2_tiny")).eval()


def _package_predictor(enc: Sam2RegionEncoder, rgb: np.ndarray) -> SAM2ImagePredictor:
    """sam2's own image predictor on `rgb`. It hard-codes the backbone sizes of a 1024-pixel
    input; give it those of this model's input (strides 4, 8, 16)."""
    p = SAM2ImagePredictor(enc.sam)
    p._bb_feat_sizes = [(enc.image_size // s,) * 2 for s in (4, 8, 16)]
    p.set_image(rgb)
    return p


def _features(enc: Sam2RegionEncoder, rgb: np.ndarray) -> Sam2Features:
    x, input_size = enc.preprocess(_tensor(rgb))
    assert input_size == (enc.image_size, enc.image_size)
    with torch.no_grad():
        return enc.encode_images(x[None])[0]


BOXES = torch.tensor([[30.0, 20, 80, 60], [60, 10, 120, 90], [0, 0, 128, 96], [5, 50, 40, 95], [70, 40, 100, 70]])
POINTS = torch.tensor([[[50.0, 40]], [[100, 70]], [[10, 10]], [[20, 80]], [[90, 55]]]).repeat(1, 2, 1)
POINTS[:, 1] += torch.tensor([7.0, -5])
LABELS = torch.tensor([[1, 0], [1, 1], [1, 0], [0, 1], [1, 1]])
PROMPTS = {
    "boxes": {"boxes": BOXES},
    "points": {"points": POINTS, "point_labels": LABELS},
    "both": {"boxes": BOXES, "points": POINTS, "point_labels": LABELS},
}


def _package_predict(p: SAM2ImagePredictor, prompts, **kw):
    """(masks, low-res logits, region tokens) of sam2's predictor for the prompts, the tokens read
    from the mask decoder's own output during its call."""
    seen = []
    hook = p.model.sam_mask_decoder.register_forward_hook(lambda m, i, out: seen.append(out[2][:, 0]))
    try:
        masks, _, low_res = p.predict(
            point_coords=None if "points" not in prompts else prompts["points"].numpy(),
            point_labels=None if "points" not in prompts else prompts["point_labels"].numpy(),
            box=None if "boxes" not in prompts else prompts["boxes"].numpy(), multimask_output=False, **kw)
    finally:
        hook.remove()
    (tokens,) = seen
    n = tokens.shape[0]
    low_res = torch.from_numpy(low_res).reshape(n, 1, *low_res.shape[-2:])
    return torch.from_numpy(masks).reshape(n, 1, H, W), low_res, tokens


# ---------------------------------------------------------------------------------- features, tokens
def test_image_features_are_the_package_predictors(enc):
    rgb = _image()
    feats = _features(enc, rgb)
    ref = _package_predictor(enc, rgb)._features
    torch.testing.assert_close(feats.image_embed, ref["image_embed"][0])
    assert len(feats.high_res_feats) == len(ref["high_res_feats"]) == 2
    for ours, theirs in zip(feats.high_res_feats, ref["high_res_feats"]):
        torch.testing.assert_close(ours, theirs[0])
    # A batch gives each image its own features, the ones it gets alone.
    other = _image(1)
    x = torch.stack([enc.preprocess(_tensor(a))[0] for a in (rgb, other)])
    with torch.no_grad():
        batch = enc.encode_images(x)
    alone = _features(enc, other)
    torch.testing.assert_close(batch[1].image_embed, alone.image_embed, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[0].image_embed, batch[1].image_embed)


@pytest.mark.parametrize("kind", list(PROMPTS))
@pytest.mark.parametrize("chunk", [1, 64])
@pytest.mark.parametrize("stable", [False, True])
def test_tokens_and_low_res_masks_are_the_package_decoders(enc, kind, chunk, stable, monkeypatch):
    """`stable`: every single mask counts as stable, so masks come from mask token 0; else (the
    random model's masks are all unstable) the decoder falls back to its best multimask mask, as
    build_sam2's post-processing asks. The region token is mask token 0 either way."""
    if stable:
        monkeypatch.setattr(enc.sam.sam_mask_decoder, "dynamic_multimask_stability_thresh", 0.0)
    rgb = _image()
    feats = _features(enc, rgb)
    _, want_low, want_tokens = _package_predict(_package_predictor(enc, rgb), PROMPTS[kind], return_logits=True)
    monkeypatch.setattr(enc, "decode_chunk", chunk)
    with torch.no_grad():
        tokens, low_res = enc.decode_prompts(feats, (H, W), **PROMPTS[kind])
    assert tokens.shape == (len(BOXES), enc.token_dim) and low_res.shape == (len(BOXES), 1, 64, 64)
    torch.testing.assert_close(tokens, want_tokens)
    torch.testing.assert_close(low_res.clamp(-32, 32), want_low)  # the predictor returns them clamped
    # decode_boxes is the box case.
    if kind == "boxes":
        t2, m2 = enc.decode_boxes(feats, BOXES, (H, W))
        torch.testing.assert_close(t2, tokens)
        torch.testing.assert_close(m2, low_res)


def test_no_prompts_give_empty_outputs(enc):
    tokens, low_res = enc.decode_boxes(_features(enc, _image()), torch.zeros(0, 4), (H, W))
    assert tokens.shape == (0, enc.token_dim) and low_res.shape == (0, 1, 64, 64)


def test_point_prompts_need_labels(enc):
    with pytest.raises(ValueError, match="point_labels"):
        enc.decode_prompts(_features(enc, _image()), (H, W), points=POINTS)


# ---------------------------------------------------------------------------------- masks
def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def test_pasted_masks_are_the_package_predictors(enc):
    """The squashed S x S input with input_size (S, S) pastes as sam2's predictor does: the plain
    path exactly, the shared fast path (one grid_sample) with IoU >= 0.99, and the box-local
    masks agree with the predictor's masks inside their boxes."""
    rgb = _image()
    feats = _features(enc, rgb)
    want, _, _ = _package_predict(_package_predictor(enc, rgb), PROMPTS["boxes"])
    want = want[:, 0] > 0.5  # the predictor gives 0.0 / 1.0 floats
    assert want.any() and (~want).any()  # non-trivial masks, so the comparisons mean something
    with torch.no_grad():
        _, low_res = enc.decode_boxes(feats, BOXES, (H, W))
    size = (enc.image_size, enc.image_size)
    plain = enc.paste_masks(low_res, size, (H, W))
    fast = enc.paste_masks(low_res, size, (H, W), fast=True)
    assert torch.equal(plain, want)
    assert fast.shape == want.shape and _iou(fast, want).min() >= 0.99
    # Square boxes of side 32: box_masks' 32 x 32 grid samples the centres of the box's pixels.
    x0, y0 = torch.tensor([10, 40, 90, 0]), torch.tensor([5, 60, 30, 0])
    boxes = torch.stack([x0, y0, x0 + 32, y0 + 32], dim=1).float()
    with torch.no_grad():
        _, low_res = enc.decode_boxes(feats, boxes, (H, W))
    full = enc.paste_masks(low_res, size, (H, W))
    local = enc.box_masks(low_res, size, (H, W), boxes, size=32)[:, 0] > 0.5
    crops = torch.stack([full[i, y:y + 32, x:x + 32] for i, (x, y) in enumerate(zip(x0.tolist(), y0.tolist()))])
    assert crops.any() and (~crops).any()
    assert (local == crops).float().mean() >= 0.99


# ---------------------------------------------------------------------------------- the whole model
def test_regionspot_on_sam2_infers_boxes_and_masks_and_trains(synthetic_val):
    cfg = tiny_cfg(*SAM2, "MODEL.REGIONSPOT.TOKEN_MODE", "online")  # SAM 2 runs inside the training step
    model = build_model(cfg).eval()
    assert isinstance(model.sam_encoder, Sam2RegionEncoder)
    assert model.head.to_clip.in_features == model.sam_encoder.token_dim == 32  # widths from the encoder
    mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)
    inputs = [mapper(d) for d in DatasetCatalog.get(synthetic_val)[:2]]
    for x, out in zip(inputs, model(inputs)):
        inst = out["instances"].to("cpu")
        num_classes = len(model.text_embeddings(x["vocabulary"])[0])
        assert inst.image_size == (x["height"], x["width"])
        assert len(inst) == min(300, len(x["instances"]) * num_classes) > 0  # every gt box prompt, every class
        masks = inst.pred_masks.tensor
        assert masks.shape == (len(inst), x["height"], x["width"]) and masks.dtype == torch.bool

    model.train()
    assert all(not m.training for m in model.sam_encoder.modules())
    train_mapper = RegionSpotDatasetMapper(cfg, is_train=True, dataset_name=synthetic_val)
    losses = model([train_mapper(d) for d in DatasetCatalog.get(synthetic_val)[:2]])
    loss = losses["loss_focal"]
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.sam_encoder.parameters())


def test_token_extraction_and_cached_training_on_sam2(tmp_path):
    name = "test_sam2_tokens"
    json_path = make_synthetic_lvis(str(tmp_path / "data"), "train", num_images=2, seed=5)
    register_synthetic_lvis(name, json_path, str(tmp_path / "data"))
    try:
        root = str(tmp_path / "tokens")
        cfg = tiny_cfg(*SAM2, "MODEL.REGIONSPOT.TOKEN_MODE", "cached", "MODEL.REGIONSPOT.TOKEN_CACHE_DIR", root,
                       "DATASETS.TRAIN", f"('{name}',)")
        model = build_model(cfg)
        summary = extract_tokens(model.sam_encoder, cfg, name, root)
        assert (summary.images, summary.skipped, summary.failed) == (2, 0, {})
        dicts = DatasetCatalog.get(name)
        folder = token_cache_folder(root, name, "sam2_tiny")
        for d in dicts:
            tokens = load_tokens(token_file(folder, d["image_id"]), d["image_id"])["tokens"]
            assert tokens.shape == (len(d["annotations"]), 32) and torch.isfinite(tokens).all()
        mapper = RegionSpotDatasetMapper(cfg, is_train=True, dataset_name=name)
        model.train()
        loss = model([mapper(d) for d in dicts])["loss_focal"]
        assert torch.isfinite(loss) and loss.item() > 0
    finally:
        DatasetCatalog.remove(name)


def test_predictor_on_sam2_boxes_points_and_auto_boxes():
    predictor = RegionSpotPredictor(tiny_cfg(*SAM2, "MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", 4,
                                             "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH", 0.0,
                                             "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH", 0.0))
    predictor.set_image(_image())
    vocab = ["red square", "grey noise"]
    res = predictor.predict(boxes=BOXES[:2], vocabulary=vocab)
    assert len(res) == 2 and res.masks.shape == (2, H, W)
    res = predictor.predict(points=POINTS[:2], point_labels=LABELS[:2], vocabulary=vocab)
    assert len(res) == 2 and res.masks.shape == (2, H, W)
    boxes = predictor.sam_auto_boxes()
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 0
    assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()


# ---------------------------------------------------------------------------------- automatic masks
def test_auto_boxes_reuse_the_features_and_equal_the_plain_generator(enc):
    rgb = _image()
    plain = SAM2AutomaticMaskGenerator(enc.sam, **AUTO)
    plain.predictor._bb_feat_sizes = [(enc.image_size // s,) * 2 for s in (4, 8, 16)]  # see _package_predictor
    want = torch.tensor([r["bbox"] for r in plain.generate(rgb)], dtype=torch.float32).view(-1, 4)
    want[:, 2:] += want[:, :2]
    assert len(want) > 0
    feats = _features(enc, rgb)
    calls = []
    hook = enc.sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        got = enc.auto_boxes(_tensor(rgb), feats, (enc.image_size,) * 2, AUTO)
    finally:
        hook.remove()
    assert not calls  # the generator used our features
    torch.testing.assert_close(got, want)


def test_sam_auto_prompt_source_on_sam2():
    cfg = tiny_cfg(*SAM2, "MODEL.REGIONSPOT.PROMPT", "sam_auto", "MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", 4,
                   "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH", 0.0,
                   "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH", 0.0,
                   "MODEL.REGIONSPOT.VOCABULARY", "custom", "MODEL.REGIONSPOT.CUSTOM_VOCABULARY", "['a', 'b']")
    model = build_model(cfg).eval()
    calls = []
    model.sam_encoder.sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = model([{"image": _tensor(_image(s)), "image_id": s} for s in range(2)])
    assert sum(calls) == 2  # one encoder pass per image, shared by the generator and the prompts
    assert all(len(o["instances"]) > 0 for o in out)


# ---------------------------------------------------------------------------------- building, checkpoints
def test_every_sam_type_is_known_to_the_config_and_unknown_ones_are_named():
    assert region_encoder_types() == SAM_TYPES + tuple(SAM2_MODELS)
    assert [t for t in region_encoder_types() if sam_type_random_by_default(t)] == ["tiny", "sam2_tiny"]
    with pytest.raises(ValueError, match=r"MODEL\.REGIONSPOT\.SAM\.TYPE.*'sam2\.1_hiera_q'.*'vit_b'.*'sam2_tiny'"):
        build_sam_encoder(tiny_cfg("MODEL.REGIONSPOT.SAM.TYPE", "sam2.1_hiera_q"))
    with pytest.raises(ValueError, match="sam2.1_hiera_q"):
        build_sam2_model("sam2.1_hiera_q")


@pytest.mark.parametrize("sam_type", [t for t in SAM2_MODELS if t != "sam2_tiny"])
def test_official_sam2_types_build_from_the_package_configs(sam_type):
    enc = Sam2RegionEncoder(build_sam2_model(sam_type, "random"))
    assert (enc.image_size, enc.token_dim) == (1024, 256)
    assert SAM2_MODELS[sam_type][1].startswith("https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_")


def test_random_tiny_sam2_is_fixed_by_the_seed_and_config_builds_it():
    a, b, c = (build_sam2_model("sam2_tiny", seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    enc = build_sam_encoder(tiny_cfg(*SAM2, "MODEL.REGIONSPOT.SAM.DECODE_CHUNK", 3))
    assert isinstance(enc, Sam2RegionEncoder) and not enc.training and enc.chunk_for(torch.device("cpu")) == 3
    assert all(torch.equal(v, a[k]) for k, v in enc.sam.state_dict().items())  # the config's seed 0


def test_checkpoints_load_from_a_path_or_url_and_misfits_name_the_key(tmp_path, http_root):
    source = build_sam2_model("sam2_tiny", seed=7).state_dict()
    folder, base, _ = http_root
    torch.save({"model": source}, folder / "sam2_tiny_7.pt")  # the official files' layout

    def same(model):
        state = model.state_dict()
        return state.keys() == source.keys() and all(torch.equal(state[k], source[k]) for k in state)

    path = str(folder / "sam2_tiny_7.pt")
    assert same(build_sam2_model("sam2_tiny", path, seed=0))
    assert same(build_sam_encoder(tiny_cfg(*SAM2, "MODEL.REGIONSPOT.SAM.CHECKPOINT", path)).sam)
    assert same(build_sam2_model("sam2_tiny", f"{base}/sam2_tiny_7.pt"))
    assert not same(build_sam2_model("sam2_tiny", "random"))

    wrong = tmp_path / "sam1_tiny.pth"
    torch.save(build_tiny_sam().state_dict(), wrong)
    with pytest.raises(RuntimeError, match=r"sam1_tiny\.pth \(MODEL\.REGIONSPOT\.SAM\.CHECKPOINT\) does not fit"):
        build_sam2_model("sam2_tiny", str(wrong))
    shapes = tmp_path / "other_shapes.pt"
    torch.save({"model": {k: v[..., :1] if v.ndim else v for k, v in source.items()}}, shapes)
    with pytest.raises(RuntimeError, match=r"other_shapes\.pt \(MODEL\.REGIONSPOT\.SAM\.CHECKPOINT\)"):
        build_sam2_model("sam2_tiny", str(shapes))


def test_missing_sam2_package_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "sam2" or m.startswith("sam2.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import sam2...` now fails
    monkeypatch.setitem(sys.modules, "sam2", None)
    # The family stays registered (its module imports no sam2); building it asks for the package.
    with pytest.raises(MissingExtraError, match=r"regionspot\[sam2\]") as err:
        build_sam_encoder(tiny_cfg(*SAM2))
    assert "MODEL.REGIONSPOT.SAM.TYPE" in str(err.value)
    build_sam_encoder(tiny_cfg())  # segment_anything's SAM needs no sam2
