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


def _loss_and_hand_value(model, inputs, dataset):
    loss = model.losses(inputs)["loss_focal"]
    with torch.no_grad():
        images = [x["image"] for x in inputs]
        sam_emb, _, clip_tokens = model.encode_images(images)
        tokens = [model.decode_regions(sam_emb[i], tuple(images[i].shape[-2:]), boxes=x["instances"].gt_boxes.tensor)[0]
                  for i, x in enumerate(inputs)]
        emb = model.embed_regions(tokens, clip_tokens)
        _, text = model.text_embeddings(dataset)
        per_image = [_focal_by_hand(model.classify(e, text), x["instances"].gt_classes) for e, x in zip(emb, inputs)]
    counts = [len(x["instances"]) for x in inputs]
    return loss, per_image, counts


def test_loss_is_per_image_mean_over_regions_summed_over_images(synthetic_val):
    """The original's scale: per image, focal loss summed over classes and averaged over its
    regions; then summed over the images of the batch (not averaged over all regions)."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # eval: no dropout, so the hand computation sees the same logits
    mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)
    dicts = DatasetCatalog.get(synthetic_val)
    inputs = [mapper(d) for d in dicts]
    # Two images with unequal box counts (so the reductions differ), and each alone.
    a = max(inputs, key=lambda x: len(x["instances"]))
    b = next(x for x in inputs if 0 < len(x["instances"]) < len(a["instances"]))
    loss1, per1, counts1 = _loss_and_hand_value(model, [a], synthetic_val)
    assert counts1[0] > 1
    torch.testing.assert_close(loss1, per1[0] / counts1[0], rtol=1e-5, atol=1e-6)

    loss2, per2, counts2 = _loss_and_hand_value(model, [a, b], synthetic_val)
    expected = per2[0] / counts2[0] + per2[1] / counts2[1]
    torch.testing.assert_close(loss2, expected, rtol=1e-5, atol=1e-6)
    # Not the mean over all regions of the batch (the reduction this replaces).
    assert abs(loss2.item() - (per2[0] + per2[1]).item() / sum(counts2)) > 1e-3 * loss2.item()
    # Padding b's image to a's box count does not change a's share.
    torch.testing.assert_close(per2[0], per1[0], rtol=1e-5, atol=1e-6)


def test_image_without_regions_adds_nothing(synthetic_val):
    cfg = tiny_cfg()
    model = build_model(cfg).eval()
    mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)
    a, b = [mapper(d) for d in DatasetCatalog.get(synthetic_val)[:2]]
    empty = dict(b)
    empty["instances"] = b["instances"][:0]
    alone = model.losses([a])["loss_focal"]
    with_empty = model.losses([a, empty])["loss_focal"]
    torch.testing.assert_close(with_empty, alone, rtol=1e-5, atol=1e-6)
