"""The training loss against a hand-written sigmoid focal loss (alpha 0.25, gamma 2)."""
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from regionspot.dataset_mapper import RegionSpotDatasetMapper

from conftest import tiny_cfg


def _focal_by_hand(logits: torch.Tensor, classes: torch.Tensor, alpha=0.25, gamma=2.0) -> torch.Tensor:
    t = torch.zeros_like(logits)
    t[torch.arange(len(classes)), classes] = 1.0
    p = logits.sigmoid()
    ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t)
    return (a_t * ce * (1 - p_t) ** gamma).sum()


def test_loss_is_focal_summed_over_classes_and_regions_per_region(synthetic_val):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # eval: no dropout, so the hand computation sees the same logits
    mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)
    inputs = [mapper(d) for d in DatasetCatalog.get(synthetic_val)[:3]]
    loss = model.losses(inputs)["loss_focal"]

    with torch.no_grad():
        images = [x["image"] for x in inputs]
        sam_emb, _, clip_tokens = model.encode_images(images)
        tokens = [model.decode_regions(sam_emb[i], x["instances"].gt_boxes.tensor, tuple(images[i].shape[-2:]))[0]
                  for i, x in enumerate(inputs)]
        emb = model.embed_regions(tokens, clip_tokens)
        _, text = model.text_embeddings(synthetic_val)
        total = sum(_focal_by_hand(model.classify(e, text), x["instances"].gt_classes) for e, x in zip(emb, inputs))
        regions = sum(len(x["instances"]) for x in inputs)
    assert regions > len(inputs)  # several regions per image, so per-region and per-image differ
    torch.testing.assert_close(loss, total / regions, rtol=1e-5, atol=1e-6)
