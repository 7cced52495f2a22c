"""CLIP's input as the original code makes it: the whole image squashed to the square with
torchvision's tensor resize (bilinear; antialiased or not, by config), then CLIP's normalisation."""
import pytest
import torch
import torchvision.transforms.functional as TF
from detectron2.modeling import build_model

from regionspot.modeling.encoders.clip_encoder import CLIP_MEAN, CLIP_STD, ClipImageTextEncoder, build_clip

from conftest import tiny_cfg


def _reference(image: torch.Tensor, size: int, antialias: bool, interpolation) -> torch.Tensor:
    """What the original code computes: torchvision's resize of the [0, 1] image, then normalise."""
    x = TF.resize(image.float() / 255, [size, size], interpolation=interpolation, antialias=antialias)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 480, 640), generator=g, dtype=torch.uint8)  # non-square, larger than 128


@pytest.mark.parametrize("mode,antialias", [("bilinear", False), ("bilinear", True), ("bicubic", True)])
def test_preprocess_equals_torchvision_resize(image, mode, antialias):
    enc = ClipImageTextEncoder(build_clip("tiny"), 128, resize_mode=mode, antialias=antialias)
    interp = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}[mode]
    torch.testing.assert_close(enc.preprocess(image), _reference(image, 128, antialias, interp),
                               rtol=1e-5, atol=1e-5)


def test_settings_change_the_input(image):
    """The keys matter: each setting gives a different CLIP input on a downscaled image."""
    outs = [ClipImageTextEncoder(build_clip("tiny"), 128, resize_mode=m, antialias=a).preprocess(image)
            for m, a in (("bilinear", False), ("bilinear", True), ("bicubic", True))]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (outs[i] - outs[j]).norm() / outs[i].norm() > 1e-3


def test_config_default_is_bilinear_without_antialias():
    model = build_model(tiny_cfg())
    assert (model.clip_encoder.resize_mode, model.clip_encoder.antialias) == ("bilinear", False)
    model = build_model(tiny_cfg("MODEL.REGIONSPOT.CLIP.RESIZE_MODE", "bicubic", "MODEL.REGIONSPOT.CLIP.ANTIALIAS", "True"))
    assert (model.clip_encoder.resize_mode, model.clip_encoder.antialias) == ("bicubic", True)


def test_unknown_resize_mode_names_the_key():
    with pytest.raises(ValueError, match="MODEL.REGIONSPOT.CLIP.RESIZE_MODE"):
        build_model(tiny_cfg("MODEL.REGIONSPOT.CLIP.RESIZE_MODE", "nearest"))
