"""Encoder families are registries: a backbone of one's own registers in a few lines and is built
through the config (model, predictor) like the built-in ones; unknown types are named."""
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from regionspot.modeling.encoders import (REGION_ENCODER_REGISTRY, VISION_LANGUAGE_ENCODER_REGISTRY,
                                          build_clip_encoder, build_sam_encoder, region_encoder_types,
                                          sam_type_random_by_default, vision_language_backends)
from regionspot.modeling.encoders.clip_encoder import ClipImageTextEncoder, build_clip
from regionspot.modeling.encoders.sam_encoder import SamRegionEncoder, build_tiny_sam
from regionspot.modeling.encoders.seeding import seeded_random_init
from regionspot.predictor import RegionSpotPredictor

from conftest import tiny_cfg

VOCAB = ["red circle", "green square", "sky"]


class MyRegionEncoder(SamRegionEncoder):
    """A test-only region encoder family: the tiny SAM, built its own way."""

    SAM_TYPES = ("my_sam",)
    RANDOM_BY_DEFAULT_TYPES = ("my_sam",)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.REGIONSPOT
        with seeded_random_init(c.RANDOM_INIT_SEED):
            sam = build_tiny_sam()
        return {"sam": sam, "decode_chunk": c.SAM.DECODE_CHUNK, "fused_attention": c.SAM.FUSED_ATTENTION}


class MyVisionLanguageEncoder(ClipImageTextEncoder):
    """A test-only vision-language family: the tiny random CLIP under its own backend name."""

    BACKEND = "my_clip"

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.REGIONSPOT
        return {"clip_model": build_clip("tiny", "random", seed=c.RANDOM_INIT_SEED), "input_size": c.CLIP.INPUT_SIZE}


@pytest.fixture
def registered():
    """Register the two test families for one test, and take them out afterwards."""
    REGION_ENCODER_REGISTRY.register(MyRegionEncoder)
    VISION_LANGUAGE_ENCODER_REGISTRY.register(MyVisionLanguageEncoder)
    try:
        yield
    finally:
        REGION_ENCODER_REGISTRY._obj_map.pop("MyRegionEncoder")
        VISION_LANGUAGE_ENCODER_REGISTRY._obj_map.pop("MyVisionLanguageEncoder")


MINE = ("MODEL.REGIONSPOT.SAM.TYPE", "my_sam", "MODEL.REGIONSPOT.CLIP.BACKEND", "my_clip")


def _image() -> np.ndarray:
    img = np.random.RandomState(0).randint(80, 170, (96, 128, 3)).astype(np.uint8)
    img[20:60, 30:80] = (220, 30, 30)
    return img


def test_built_in_families_are_registered():
    assert {"vit_b", "vit_h", "tiny", "sam2.1_hiera_l", "sam2_tiny"} <= set(region_encoder_types())
    assert vision_language_backends() == ("clip", "open_clip")
    assert sam_type_random_by_default("tiny") and not sam_type_random_by_default("vit_b")
    assert not sam_type_random_by_default("no_such_type")


def test_own_encoders_build_through_the_config_and_predict_as_the_built_in_ones(registered):
    assert "my_sam" in region_encoder_types() and "my_clip" in vision_language_backends()
    assert sam_type_random_by_default("my_sam")
    assert type(build_sam_encoder(tiny_cfg(*MINE))) is MyRegionEncoder
    clip = build_clip_encoder(tiny_cfg(*MINE))
    assert type(clip) is MyVisionLanguageEncoder and not clip.training and clip.input_size == 128

    builtin = RegionSpotPredictor(tiny_cfg(), vocabulary=VOCAB)
    mine = RegionSpotPredictor(tiny_cfg(*MINE), vocabulary=VOCAB)
    assert type(mine.model.sam_encoder) is MyRegionEncoder and type(mine.model.clip_encoder) is MyVisionLanguageEncoder
    # The same tiny weights by another route: with the same head, the same results.
    mine.model.head.load_state_dict(builtin.model.head.state_dict())
    boxes = np.array([[30, 20, 80, 60], [0, 0, 128, 96]], dtype=np.float32)
    results = []
    for predictor in (builtin, mine):
        predictor.set_image(_image())
        results.append(predictor.predict(boxes=boxes, top_k=2))
    a, b = results
    assert len(a) == len(b) == 2
    assert torch.equal(a.topk_classes, b.topk_classes) and torch.equal(a.topk_scores, b.topk_scores)
    assert a.masks is not None and torch.equal(a.masks, b.masks) and torch.equal(a.boxes, b.boxes)


def test_unknown_types_name_the_key_and_every_registered_type(registered):
    with pytest.raises(ValueError, match=r"Unknown MODEL\.REGIONSPOT\.SAM\.TYPE 'vit_q'.*'vit_b'.*'sam2_tiny'.*'my_sam'"):
        build_model(tiny_cfg("MODEL.REGIONSPOT.SAM.TYPE", "vit_q"))
    with pytest.raises(ValueError, match=r"Unknown MODEL\.REGIONSPOT\.CLIP\.BACKEND 'siglip'.*'clip', 'open_clip', 'my_clip'"):
        build_model(tiny_cfg("MODEL.REGIONSPOT.CLIP.BACKEND", "siglip"))


def test_a_type_claimed_twice_is_an_error(registered):
    class Again(MyRegionEncoder):
        pass

    REGION_ENCODER_REGISTRY.register(Again)
    try:
        with pytest.raises(ValueError, match=r"'my_sam' is claimed by several.*MyRegionEncoder, Again"):
            build_sam_encoder(tiny_cfg(*MINE))
    finally:
        REGION_ENCODER_REGISTRY._obj_map.pop("Again")
