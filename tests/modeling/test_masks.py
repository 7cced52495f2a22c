"""The fast mask paste (one interpolation) against SAM's own two-step postprocessing."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from regionspot.data.dataset_mapper import RegionSpotDatasetMapper
from regionspot.modeling.encoders.sam_encoder import SamRegionEncoder, build_tiny_sam

from conftest import tiny_cfg


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@pytest.mark.parametrize("size", [(192, 256), (333, 500), (500, 333), (97, 131), (256, 256)])
def test_fast_paste_matches_sam_postprocess(size):
    enc = SamRegionEncoder(build_tiny_sam())
    g = torch.Generator().manual_seed(size[0])
    # Smooth logits shaped like masks (blobs), at SAM's low-res size for this encoder.
    low = F.interpolate(torch.randn(12, 1, 8, 8, generator=g), enc.image_size // 4, mode="bicubic") * 4
    h, w = size
    scale = enc.image_size / max(h, w)
    input_size = (int(h * scale + 0.5), int(w * scale + 0.5))
    plain = enc.paste_masks(low, input_size, size)
    fast = enc.paste_masks(low, input_size, size, fast=True)
    assert plain.shape == fast.shape == (12, h, w)
    assert plain.any() and (~plain).any()  # non-trivial masks, so IoU means something
    assert _iou(plain, fast).min() >= 0.99


def test_fast_and_plain_paths_give_the_same_detections(synthetic_val):
    dicts = DatasetCatalog.get(synthetic_val)[:2]
    outs = {}
    for fast in (True, False):
        cfg = tiny_cfg("MODEL.REGIONSPOT.FAST_MASK_PASTE", fast)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)
        outs[fast] = [o["instances"] for o in model([mapper(d) for d in dicts])]
    for a, b in zip(outs[True], outs[False]):
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert torch.allclose(a.scores, b.scores)
        assert torch.equal(a.pred_masks.index, b.pred_masks.index)
        assert _iou(a.pred_masks.tensor, b.pred_masks.tensor).min() >= 0.99
