"""regionspot_deploy's numpy pre- and post-processing equals the PyTorch path's: torch's resizes
(plain and antialiased, bilinear and bicubic), detectron2's test-time resize, SAM's and CLIP's input
preparation, and the mask paste from low-res logits."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T

from conftest import tiny_cfg
from regionspot.modeling.encoders import build_sam_encoder
from regionspot.modeling.encoders.clip_encoder import ClipImageTextEncoder, build_clip
from regionspot_deploy import preprocess as pp

# Sizes: up- and down-scaling, extreme aspect ratios, one-pixel sides, identity, SAM's 1024 frame.
SIZES = [((37, 53), (224, 224)), ((480, 640), (96, 128)), ((300, 200), (1024, 683)), ((17, 900), (8, 256)),
         ((1, 5), (3, 7)), ((64, 64), (64, 64)), ((800, 1333), (614, 1024))]


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [False, True])
def test_resize_equals_torch_interpolate(mode, antialias):
    rng = np.random.default_rng(0)
    for (h, w), size in SIZES:
        x = rng.uniform(0, 255, (3, h, w)).astype(np.float32)
        ours = pp.resize_chw(x, size, mode, antialias)
        theirs = F.interpolate(torch.from_numpy(x)[None], size, mode=mode, align_corners=False,
                               antialias=antialias)[0].numpy()
        # Relative to the 0..255 range. torch rounds its source positions in float32, which moves
        # large downscales (800 -> 614) by up to ~2.3e-5; everything else agrees to ~1e-6.
        assert np.abs(ours - theirs).max() / 255 < 3e-5, ((h, w), size)


def test_test_resize_equals_detectron2():
    rng = np.random.default_rng(1)
    for h, w, short, longest in [(120, 160, 800, 1333), (480, 640, 200, 300), (30, 900, 800, 1333), (50, 50, 50, 64)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = T.ResizeShortestEdge(short, longest).get_transform(img).apply_image(img)
        ours = pp.test_resize(img, {"min_size": short, "max_size": longest})
        assert ours.shape == expected.shape and np.array_equal(ours, expected)
    img = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert pp.test_resize(img, {"min_size": 0, "max_size": 1333}) is img


def _sam_section(enc):
    return {"family": "sam", "image_size": enc.image_size, "resize": "longest_side", "resize_mode": "bilinear",
            "antialias": True, "value_scale": 1.0, "mean": enc.sam.pixel_mean.flatten().tolist(),
            "std": enc.sam.pixel_std.flatten().tolist(), "mask_threshold": enc.mask_threshold,
            "low_res_size": enc.image_size // 4}


def test_sam_input_equals_sam_encoder_preprocess():
    enc = build_sam_encoder(tiny_cfg())
    rng = np.random.default_rng(2)
    for h, w in [(120, 160), (300, 40), (4, 4000), (256, 256), (1000, 999)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        theirs, size = enc.preprocess(torch.from_numpy(img).permute(2, 0, 1))
        ours, ours_size = pp.sam_input(img, _sam_section(enc))
        assert tuple(ours_size) == tuple(size)
        assert ours.shape == (1, *theirs.shape)
        assert np.abs(ours[0] - theirs.numpy()).max() < 1e-4  # normalised units (std ~58): ~1e-6 of the range


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("antialias", [False, True])
def test_clip_input_equals_clip_encoder_preprocess(mode, antialias):
    enc = ClipImageTextEncoder(build_clip("tiny"), 128, mode, antialias)
    section = {"input_size": 128, "resize_mode": mode, "antialias": antialias,
               "mean": enc.pixel_mean.flatten().tolist(), "std": enc.pixel_std.flatten().tolist()}
    rng = np.random.default_rng(3)
    for h, w in [(120, 160), (800, 1333), (50, 20)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        theirs = enc.preprocess(torch.from_numpy(img).permute(2, 0, 1)).numpy()
        ours = pp.clip_input(img, section)[0]
        assert np.abs(ours - theirs).max() < 2e-4  # normalised units (std ~68)


@pytest.mark.parametrize("fast", [True, False])
def test_mask_paste_equals_region_encoder_paste(fast):
    enc = build_sam_encoder(tiny_cfg())
    section = _sam_section(enc)
    torch.manual_seed(0)
    low = torch.randn(5, 1, 64, 64) * 4
    for input_size, out_size in [((192, 256), (120, 160)), ((256, 7), (2000, 55)), ((256, 256), (256, 256))]:
        theirs = enc.paste_masks(low, input_size, out_size, fast=fast).numpy()
        wy, wx = pp.paste_weights(section, fast, input_size, out_size)
        ours = pp.paste_masks(low.numpy(), wy, wx, section["mask_threshold"])
        assert ours.shape == theirs.shape and ours.dtype == bool
        inter, union = (ours & theirs).sum((1, 2)), (ours | theirs).sum((1, 2))
        assert (inter / np.maximum(union, 1)).min() >= 0.999
        assert theirs.any() and not theirs.all()  # the masks are not trivially equal
