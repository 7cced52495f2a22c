"""Bad input gives a clear error naming the file, key or value, or one documented conversion;
never a silent wrong answer. One section per class of bad input: checkpoints that fit nothing,
image dtypes and 16-bit files, non-finite values, bit rot in caches, degenerate annotations,
corrupt weight files and config values."""
import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.modeling import build_model
from PIL import Image

from regionspot.checkpoint import HeadMismatchError, RegionSpotCheckpointer
from regionspot.modeling.encoders.clip_encoder import build_clip
from regionspot.config import check_regionspot_config
from regionspot.data.dataset_mapper import RegionSpotDatasetMapper, warn_degenerate_annotations
from regionspot.modeling.head import RegionSpotHead
from regionspot.data.images import read_image, to_uint8_image
from regionspot.predictor import RegionSpotPredictor
from regionspot.data.proposals import attach_proposals
from regionspot.modeling.encoders.sam_encoder import build_sam
from regionspot.data.synthetic import make_synthetic_lvis, register_synthetic_lvis
from regionspot.modeling.text_embeddings import (
    cached_class_embeddings,
    encode_class_names,
    load_embedding_file,
    save_embedding_file,
)
from regionspot.data.token_cache import CorruptTokenFile, is_valid, load_tokens, save_tokens
from regionspot.engine.trainer import RegionSpotTrainer

from conftest import tiny_cfg

VOCAB = ["square", "circle", "triangle"]


def _image(seed=0, size=(48, 64)):
    return np.random.RandomState(seed).randint(0, 256, (*size, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return RegionSpotPredictor(model=build_model(tiny_cfg()).eval())


@pytest.fixture
def logs():
    """Messages logged by regionspot and by the checkpointer (fvcore's logger), each once
    (detectron2's setup_logger may stop propagation, so each logger gets the handler)."""
    records, seen = [], set()

    class Keep(logging.Handler):
        def emit(self, record):
            if id(record) not in seen:
                seen.add(id(record))
                records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    loggers = [logging.getLogger(n) for n in ("regionspot", "fvcore")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield records
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def _flip_bytes_in(path, raw: bytes, n=32, value=None):
    """Flip (or set to `value`) `n` bytes in the middle of `raw`, a tensor's data inside the file."""
    data = bytearray(open(path, "rb").read())
    at = data.find(raw)
    assert at >= 0 and len(raw) >= n, "the tensor's bytes must be stored as they are"
    start = at + (len(raw) - n) // 2
    for i in range(start, start + n):
        data[i] = value if value is not None else data[i] ^ 0xFF
    open(path, "wb").write(bytes(data))


# ================================================================ 1. checkpoints that fit nothing
def _head_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}


def test_unrelated_state_dict_is_refused_and_leaves_the_model_unchanged(tmp_path):
    model = build_model(tiny_cfg()).eval()
    before = _head_state(model)
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8), "fc.bias": torch.zeros(10)},
               path)
    with pytest.raises(HeadMismatchError) as e:
        RegionSpotCheckpointer(model).load(str(path))
    msg = str(e.value)
    assert str(path) in msg and "fits 0 of the 60" in msg and "head.to_clip.weight" in msg
    assert "ALLOW_RANDOM_HEAD" in msg
    for k, v in _head_state(model).items():
        assert torch.equal(v, before[k]), k


def test_head_of_another_clip_width_is_refused_naming_shapes(tmp_path):
    model = build_model(tiny_cfg()).eval()
    other = RegionSpotHead(token_dim=32, clip_width=128, text_dim=32)  # tiny CLIP's width is 64
    path = tmp_path / "head_w128.pth"
    torch.save({"model": {f"head.{k}": v for k, v in other.state_dict().items()}}, path)
    with pytest.raises(HeadMismatchError) as e:
        RegionSpotCheckpointer(model).load(str(path))
    msg = str(e.value)
    assert str(path) in msg and "of another shape" in msg and "(128, 32) in the file, (64, 32) in the model" in msg


def test_partial_head_is_refused_unless_a_random_head_is_allowed(tmp_path, logs):
    src, dst = build_model(tiny_cfg("MODEL.REGIONSPOT.RANDOM_INIT_SEED", 1)), build_model(tiny_cfg())
    state = _head_state(src)
    del state["head.projector.bias"]
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with pytest.raises(HeadMismatchError, match=r"fits 59 of the 60.*head\.projector\.bias"):
        RegionSpotCheckpointer(dst).load(str(path))
    # Through the config key, as every tool builds its checkpointer.
    cfg = tiny_cfg("MODEL.WEIGHTS", str(path))
    with pytest.raises(HeadMismatchError, match="partial.pth"):
        RegionSpotPredictor(cfg)
    cfg = tiny_cfg("MODEL.WEIGHTS", str(path), "MODEL.REGIONSPOT.ALLOW_RANDOM_HEAD", True)
    model = RegionSpotPredictor(cfg).model
    assert any("head.projector.bias" in m and "random" in m for m in logs)
    assert torch.equal(model.head.projector.weight, src.head.projector.weight)
    # A complete head loads without complaint (the existing checkpoint tests cover the layouts).
    torch.save({"model": _head_state(src)}, path)
    RegionSpotCheckpointer(dst).load(str(path))
    assert torch.equal(dst.head.projector.bias, src.head.projector.bias)


# ================================================================ 2. image dtypes and 16-bit files
def _features(predictor, image):
    predictor.set_image(image)
    f = predictor.features
    return f.sam_embedding.clone(), f.clip_tokens.clone()


def _same_features(predictor, a, b):
    for x, y in zip(_features(predictor, a), _features(predictor, b)):
        assert torch.equal(x, y)


def test_float_uint16_and_int_images_mean_what_uint8_means(predictor):
    rgb = _image()
    _same_features(predictor, rgb, rgb.astype(np.float32) / 255.0)             # float in [0, 1]
    _same_features(predictor, rgb, rgb.astype(np.uint16) * 257)                # uint16: 255 -> 65535
    _same_features(predictor, rgb, rgb.astype(np.int64))                       # ints in [0, 255]
    _same_features(predictor, rgb, torch.as_tensor(rgb).permute(2, 0, 1).float() / 255)  # float tensor
    assert predictor.image.dtype == np.uint8 and np.array_equal(predictor.image, rgb)


@pytest.mark.parametrize("bad,message", [
    (_image().astype(np.float32), r"float32 with values in \[.*\]: float images must be in \[0, 1\]"),
    (_image().astype(np.float32) / 255 - 0.5, "negative pixel values"),
    (_image() > 128, "dtype bool"),
    (_image().astype(np.int32) * 300, r"int32 with values .*at most 255"),
    (np.full((48, 64, 3), np.nan, np.float32), "NaN or infinite"),
])
def test_images_of_no_single_meaning_are_refused(predictor, bad, message):
    with pytest.raises(ValueError, match=message):
        predictor.set_image(bad)


def test_16bit_png_is_scaled_not_clipped(tmp_path, predictor):
    gray8 = _image()[:, :, 0]
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    # detectron2's reader clips this file to 255: the bug our reader exists for.
    assert (d2_utils.read_image(str(tmp_path / "g16.png"), format="RGB") == 255).mean() > 0.9
    for fmt in ("RGB", "BGR", "L"):
        expected = d2_utils.read_image(str(tmp_path / "g8.png"), format=fmt)
        assert np.array_equal(read_image(str(tmp_path / "g16.png"), format=fmt), expected)
        assert np.array_equal(read_image(str(tmp_path / "g8.png"), format=fmt), expected)  # 8-bit: deferred
    # The predictor (paths and PIL images) reads it the same way.
    _same_features(predictor, str(tmp_path / "g8.png"), str(tmp_path / "g16.png"))
    _same_features(predictor, Image.open(tmp_path / "g8.png"), Image.open(tmp_path / "g16.png"))
    # A 32-bit float image has no defined range: refused by name.
    Image.fromarray(gray8.astype(np.float32)).save(tmp_path / "f32.tif")
    with pytest.raises(ValueError, match="f32.tif.*32-bit float"):
        read_image(str(tmp_path / "f32.tif"))


def test_16bit_png_through_the_dataset_mapper(tmp_path):
    gray8 = _image(3, (40, 56))[:, :, 0]
    Image.fromarray(gray8).save(tmp_path / "a.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "b.png")
    mapper = RegionSpotDatasetMapper(tiny_cfg(), is_train=False, dataset_name="")
    anns = [{"bbox": [2.0, 3.0, 20.0, 15.0], "bbox_mode": 1, "category_id": 0}]
    out = [mapper({"file_name": str(tmp_path / n), "image_id": i, "height": 40, "width": 56, "annotations": anns})
           for i, n in enumerate(("a.png", "b.png"))]
    assert torch.equal(out[0]["image"], out[1]["image"]) and out[0]["image"].float().std() > 10
    assert len(out[1]["instances"]) == 1


def test_to_uint8_image_rounds_floats_and_scales_uint16():
    assert to_uint8_image(np.array([[0.0, 0.5, 1.0]])).tolist() == [[0, 128, 255]]
    assert to_uint8_image(np.array([[0, 257, 65535]], np.uint16)).tolist() == [[0, 1, 255]]


# ================================================================ 3. non-finite values
def test_embedding_file_with_a_nan_row_is_refused_naming_file_and_row(tmp_path, predictor):
    model = predictor.model
    names, emb = list(VOCAB), torch.nn.functional.normalize(torch.randn(3, model.clip_encoder.text_dim), dim=-1)
    emb[1, 4] = float("nan")
    path = str(tmp_path / "nan.pth")
    with pytest.raises(RuntimeError, match=r"nan.pth.*rows: 1 \('circle'\)"):
        save_embedding_file(path, names, emb, model.vocabulary.fingerprint, ["{}"])  # never written
    assert not os.path.exists(path)
    # A file that got its NaN some other way (written before the check, or by hand).
    payload = {"format": "regionspot-text-embeddings-v1", "clip": model.vocabulary.fingerprint, "names": names,
               "templates": ["{}"], "embeddings": emb}
    torch.save(payload, path)
    with pytest.raises(RuntimeError, match=r"nan.pth has NaN or infinite embeddings in 1 rows: 1 \('circle'\)"):
        load_embedding_file(path)
    predictor.set_image(_image())
    with pytest.raises(RuntimeError, match="nan.pth"):
        predictor.predict(boxes=[[0, 0, 20, 20]], vocabulary=path)


def test_computed_embeddings_are_checked():
    def encode(prompts):
        out = torch.randn(len(prompts), 8)
        out[[i for i, p in enumerate(prompts) if "circle" in p]] = float("inf")
        return out

    with pytest.raises(RuntimeError, match=r"1 \('circle'\)"):
        encode_class_names(encode, VOCAB, ["a {}.", "the {}."], chunk_size=3)


@pytest.fixture
def proposal_set(tmp_path):
    name = f"bad_proposals_{os.path.basename(str(tmp_path))}"
    json_path = make_synthetic_lvis(str(tmp_path), "val", num_images=2, seed=2)
    register_synthetic_lvis(name, json_path, str(tmp_path))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_proposals_with_nan_boxes_or_scores_are_refused_at_load_time(proposal_set, tmp_path):
    dicts = DatasetCatalog.get(proposal_set)
    ids = [d["image_id"] for d in dicts]
    good = {str(i): {"boxes": [[1, 2, 30, 40], [5, 5, 20, 20]], "scores": [0.9, 0.5]} for i in ids}
    for field, row in (("boxes", [1, 2, float("nan"), 40]), ("scores", float("inf"))):
        data = json.loads(json.dumps(good))
        if field == "boxes":
            data[str(ids[1])]["boxes"][1] = row
        else:
            data[str(ids[1])]["scores"][1] = row
        path = tmp_path / f"nan_{field}.json"
        path.write_text(json.dumps(data))  # json writes NaN / Infinity
        with pytest.raises(ValueError, match=rf"nan_{field}.json: image {ids[1]} has NaN or infinite {field} "
                                             r"at rows \[1\]"):
            attach_proposals(DatasetCatalog.get(proposal_set), str(path))
    # detectron2's proposal pickles too.
    boxes = [np.array([[1, 2, 30, 40]], np.float32), np.array([[1, 2, np.nan, 40]], np.float32)]
    path = tmp_path / "nan.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ids": ids, "boxes": boxes, "objectness_logits": [np.zeros(1), np.zeros(1)]}, f)
    with pytest.raises(ValueError, match=rf"nan.pkl: image {ids[1]} .*boxes at rows \[0\]"):
        attach_proposals(DatasetCatalog.get(proposal_set), str(path))
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert all(len(d["proposal_boxes"]) == 2 for d in attach_proposals(DatasetCatalog.get(proposal_set),
                                                                        str(tmp_path / "good.json")))


# ================================================================ 4. bit rot in caches
class _CountingEncoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, prompts):
        self.calls += 1
        g = torch.Generator().manual_seed(sum(map(len, prompts)))
        return torch.randn(len(prompts), 16, generator=g)


def test_bit_rot_in_the_text_cache_is_detected_and_recomputed(tmp_path, logs):
    encode, cache = _CountingEncoder(), str(tmp_path / "cache")
    ref = cached_class_embeddings(encode, "fp", VOCAB, ["{}."], cache)
    calls = encode.calls
    path = next((tmp_path / "cache" / "text").glob("*.pth"))
    assert torch.equal(cached_class_embeddings(encode, "fp", VOCAB, ["{}."], cache), ref) and encode.calls == calls
    _flip_bytes_in(path, ref.numpy().tobytes())
    assert not torch.equal(torch.load(path, weights_only=True)["embeddings"], ref)  # torch.load sees nothing
    again = cached_class_embeddings(encode, "fp", VOCAB, ["{}."], cache)
    assert torch.equal(again, ref) and encode.calls > calls
    assert any(str(path) in m and "checksum" in m for m in logs)
    # Rewritten: the next run reads it again.
    calls = encode.calls
    cached_class_embeddings(encode, "fp", VOCAB, ["{}."], cache)
    assert encode.calls == calls


def test_bit_rot_in_an_embedding_file_is_an_error(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    path = str(tmp_path / "vocab.pth")
    save_embedding_file(path, VOCAB, emb, "fp", ["{}."])
    assert torch.equal(load_embedding_file(path, "fp")["embeddings"], emb)
    _flip_bytes_in(path, emb.numpy().tobytes())
    with pytest.raises(RuntimeError, match="vocab.pth is corrupt.*checksum"):
        load_embedding_file(path, "fp")


def test_older_text_files_without_checksum(tmp_path, logs):
    emb = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    path = str(tmp_path / "old.pth")
    torch.save({"format": "regionspot-text-embeddings-v1", "clip": "fp", "names": VOCAB, "templates": ["{}."],
                "embeddings": emb}, path)
    # A file given by the user is read, with a warning; the cache (which can recompute) refuses it.
    assert torch.equal(load_embedding_file(path, "fp")["embeddings"], emb)
    assert any("old.pth" in m and "without a checksum" in m for m in logs)
    with pytest.raises(RuntimeError, match="old.pth has the older format without a checksum"):
        load_embedding_file(path, "fp", require_checksum=True)


def _token_file(tmp_path, name="t.pth"):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, 32, generator=g)
    boxes = torch.tensor([[1.0, 2, 30, 40]]).repeat(6, 1)
    path = str(tmp_path / name)
    save_tokens(path, image_id=1, file_name="a.png", image_size=(64, 64), tokens=tokens, boxes=boxes,
                classes=torch.arange(6), sam_type="tiny", source="src")
    return path, tokens.half()


def test_bit_rot_in_a_token_file_is_corrupt(tmp_path):
    path, tokens = _token_file(tmp_path)
    assert is_valid(path, 1, "src")
    _flip_bytes_in(path, tokens.numpy().tobytes(), n=64, value=0)  # zero 64 bytes of token data
    assert torch.isfinite(torch.load(path, weights_only=True)["tokens"].float()).all()  # plausible values
    with pytest.raises(CorruptTokenFile, match="t.pth is corrupt.*checksum"):
        load_tokens(path, 1)
    assert not is_valid(path, 1, "src")


def test_older_token_files_without_checksum_are_stale(tmp_path):
    path, _ = _token_file(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["format"] = "regionspot-sam-tokens-v1"
    del payload["sha256"]
    torch.save(payload, path)
    with pytest.raises(CorruptTokenFile, match="t.pth has the older format without a checksum.*extract_sam_tokens"):
        load_tokens(path, 1)
    assert not is_valid(path, 1, "src")


# ================================================================ 5. degenerate annotations
def test_degenerate_annotations_warn_once_per_dataset(tmp_path, logs):
    json_path = make_synthetic_lvis(str(tmp_path), "val", num_images=3, seed=4)
    data = json.load(open(json_path))
    data["annotations"][1]["bbox"][2] = -5.0   # negative width
    data["annotations"][3]["bbox"][3] = 0.0    # zero height
    bad_id = data["annotations"][1]["id"]
    json.dump(data, open(json_path, "w"))
    name = f"degenerate_{os.path.basename(str(tmp_path))}"
    register_synthetic_lvis(name, json_path, str(tmp_path))
    try:
        dicts = DatasetCatalog.get(name)
        for d in dicts:  # ids are not in detectron2's dicts unless the loader keeps them
            for a, src in zip(d["annotations"], [x for x in data["annotations"] if x["image_id"] == d["image_id"]]):
                a["id"] = src["id"]
        assert warn_degenerate_annotations(dicts, name) == 2
        warned = [m for m in logs if name in m]
        assert len(warned) == 1 and "2 annotations" in warned[0] and f"annotation id {bad_id}" in warned[0]
        assert warn_degenerate_annotations(dicts, name) == 2 and len([m for m in logs if name in m]) == 1
        # The test loader warns, saying that the evaluator still counts them.
        RegionSpotTrainer.build_test_loader(tiny_cfg(), name)
        evals = [m for m in logs if name in m and "evaluator" in m]
        assert len(evals) == 1 and json_path in evals[0] and "2 annotations" in evals[0]
        # ... and they are no prompts: the mapper drops them.
        mapper = RegionSpotDatasetMapper(tiny_cfg(), is_train=False, dataset_name=name)
        counts = [len(mapper(d)["instances"]) for d in DatasetCatalog.get(name)]
        assert sum(counts) == len(data["annotations"]) - 2
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ================================================================ 7. corrupt weight files
# Random bytes seeds whose unpickling raises, among others, UnpicklingError, KeyError,
# UnicodeDecodeError, IndexError ("pop from empty list") and OverflowError.
_RANDOM_SEEDS = (0, 3, 5, 13, 73)


def _corrupt_files(tmp_path, good: bytes):
    files = {f"random_{s}.pth": np.random.RandomState(s).bytes(2000) for s in _RANDOM_SEEDS}
    files["truncated.pth"] = good[: len(good) // 2]
    files["empty.pth"] = b""
    files["list_pickle.pth"] = pickle.dumps([1, 2, 3])
    files["missing_class.pth"] = b"cno_such_module_xyz\nThing\n)R."  # a pickle of a class that is gone
    paths = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = str(tmp_path / name)
    return paths


def test_corrupt_clip_files_are_named_with_their_key(tmp_path):
    good = tmp_path / "good_clip.pt"
    torch.save(build_clip("tiny", "random").state_dict(), good)
    for name, path in _corrupt_files(tmp_path, good.read_bytes()).items():
        with pytest.raises(RuntimeError, match="MODEL.REGIONSPOT.CLIP.CHECKPOINT") as e:
            build_clip("tiny", path)
        assert path in str(e.value) and e.value.__cause__ is not None, name


def test_corrupt_sam_files_are_named_with_their_key(tmp_path):
    good = tmp_path / "good_sam.pth"
    torch.save(build_sam("tiny", "random").state_dict(), good)
    for name, path in _corrupt_files(tmp_path, good.read_bytes()).items():
        with pytest.raises(RuntimeError, match="MODEL.REGIONSPOT.SAM.CHECKPOINT") as e:
            build_sam("tiny", path)
        assert path in str(e.value) and e.value.__cause__ is not None, name
    other = tmp_path / "wrong_shapes.pth"
    state = build_sam("tiny", "random").state_dict()
    torch.save({k: torch.zeros(3) if k.endswith("weight") else v for k, v in state.items()}, other)
    with pytest.raises(RuntimeError, match="wrong_shapes.pth.*MODEL.REGIONSPOT.SAM.CHECKPOINT"):
        build_sam("tiny", str(other))


def test_corrupt_regionspot_checkpoints_are_named(tmp_path):
    model = build_model(tiny_cfg()).eval()
    good = tmp_path / "good.pth"
    torch.save({"model": _head_state(model)}, good)
    files = _corrupt_files(tmp_path, good.read_bytes())
    torch.save({"model": {"head.to_clip.weight": "not a tensor"}}, tmp_path / "strings.pth")
    files["strings.pth"] = str(tmp_path / "strings.pth")
    for name, path in files.items():
        with pytest.raises(RuntimeError) as e:
            RegionSpotCheckpointer(model).load(path)
        assert path in str(e.value), (name, str(e.value))


# ================================================================ 8. config values
BAD_VALUES = [
    ("MODEL.REGIONSPOT.TEXT.CHUNK_SIZE", 0),
    ("MODEL.REGIONSPOT.HEAD.NUM_LAYERS", 0),
    ("MODEL.REGIONSPOT.HEAD.NUM_HEADS", 0),
    ("MODEL.REGIONSPOT.HEAD.NUM_HEADS", 3),  # does not divide tiny CLIP's width 64
    ("MODEL.REGIONSPOT.HEAD.DIM_FEEDFORWARD", -8),
    ("MODEL.REGIONSPOT.HEAD.DROPOUT", 1.0),
    ("MODEL.REGIONSPOT.HEAD.DROPOUT", -0.1),
    ("MODEL.REGIONSPOT.CLIP.INPUT_SIZE", 0),
    ("MODEL.REGIONSPOT.CLIP.INPUT_SIZE", 50),  # not a multiple of the patch (16)
    ("MODEL.REGIONSPOT.SAM.DECODE_CHUNK", -1),
    ("MODEL.REGIONSPOT.TEST_IMS_PER_BATCH", 0),
    ("MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", 0),
    ("MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH", 1.5),
    ("MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH", -0.5),
    ("MODEL.REGIONSPOT.SAM_AUTO.MIN_MASK_REGION_AREA", -1),
    ("MODEL.REGIONSPOT.DATASET_RATIOS", [0.0, 0.0]),
    ("MODEL.REGIONSPOT.DATASET_RATIOS", [1.0, -1.0]),
    ("TEST.DETECTIONS_PER_IMAGE", 0),
]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_config_values_fail_at_build_naming_key_and_value(key, value):
    cfg = tiny_cfg()
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    leaf_name = key.split(".", 2)[-1] if key.startswith("MODEL.") else key
    assert leaf_name.split(".")[-1] in str(e.value) and str(value).split(",")[0].strip("[") in str(e.value)


def test_bad_config_values_fail_before_anything_is_built(monkeypatch):
    # The check runs first: no SAM (which may mean a download) is built for a bad TEXT.CHUNK_SIZE.
    import regionspot.modeling.region_pipeline as region_pipeline

    monkeypatch.setattr(region_pipeline, "build_sam_encoder", lambda cfg: pytest.fail("SAM was built"))
    with pytest.raises(ValueError, match=r"MODEL.REGIONSPOT.TEXT.CHUNK_SIZE must be an integer >= 1, got 0"):
        build_model(tiny_cfg("MODEL.REGIONSPOT.TEXT.CHUNK_SIZE", 0))


def test_defaults_and_shipped_settings_pass_the_check():
    check_regionspot_config(tiny_cfg())
    check_regionspot_config(tiny_cfg("MODEL.REGIONSPOT.HEAD.DROPOUT", 0.0, "MODEL.REGIONSPOT.DATASET_RATIOS",
                                     "[0.0, 1.0]"))
