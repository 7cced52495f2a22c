"""RegionSpot as the ROI heads of any detectron2 GeneralizedRCNN.

``MODEL.ROI_HEADS.NAME "RegionSpotROIHeads"`` makes RegionSpot label the model's proposals (RPN,
PrecomputedProposals, any proposal generator) with any vocabulary. The RGB image is rebuilt
from the model's normalised `ImageList`, so SAM and CLIP see what the detector saw; outputs go
through GeneralizedRCNN's own post-processing to the original size.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY, ROIHeads
from detectron2.structures import ImageList, Instances

from ..checkpoint import RegionSpotCheckpointer
from .region_pipeline import RegionPipeline, sanitize_boxes


@ROI_HEADS_REGISTRY.register()
class RegionSpotROIHeads(ROIHeads):
    """Frozen SAM + frozen CLIP + the fusion head as the ROI stage.

    Inference: each image's proposals (best `proposal_topk` by objectness) become box prompts;
    its best `max_dets` (box, class) pairs come out with box-local mask probabilities, which
    `detector_postprocess` pastes at the original size. Training: the fusion head learns from
    the gt boxes with RegionSpot's loss (the proposals are not used).
    """

    @configurable
    def __init__(self, *, regionspot: RegionPipeline, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 input_format: str, test_vocabulary: str, train_vocabulary: str, max_dets: int = 300,
                 proposal_topk: int = 1000, use_proposal_score: bool = True, mask_size: int = 112, **kwargs):
        """
        Args:
            regionspot: the region pipeline (its submodule name is the checkpoint prefix).
            pixel_mean, pixel_std: the detector's MODEL.PIXEL_MEAN / PIXEL_STD (in input_format).
            input_format: the detector's INPUT.FORMAT ("RGB" or "BGR").
            test_vocabulary, train_vocabulary: vocabulary specs of evaluation and training.
            max_dets: (box, class) pairs kept per image.
            proposal_topk: proposals per image used as prompts (best objectness first).
            use_proposal_score: multiply class probabilities by sigmoid(objectness).
            mask_size: side of the box-local mask grid given to `detector_postprocess`.
            kwargs: `ROIHeads` arguments (num_classes, proposal_matcher, ...).
        """
        super().__init__(**kwargs)
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR' for RegionSpotROIHeads, not {input_format!r}.")
        self.regionspot = regionspot
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.input_format = input_format
        self.test_vocabulary, self.train_vocabulary = test_vocabulary, train_vocabulary
        self.max_dets, self.proposal_topk = int(max_dets), int(proposal_topk)
        self.use_proposal_score, self.mask_size = use_proposal_score, int(mask_size)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        c = cfg.MODEL.REGIONSPOT
        regionspot = RegionPipeline(cfg)
        if c.HEAD_WEIGHTS:  # the fusion head (and any frozen weights in the file), ours or the original's
            RegionSpotCheckpointer(regionspot, allow_random_head=c.ALLOW_RANDOM_HEAD,
                                   key="MODEL.REGIONSPOT.HEAD_WEIGHTS").load(c.HEAD_WEIGHTS)
        return {
            **super().from_config(cfg),
            "regionspot": regionspot,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD, "input_format": cfg.INPUT.FORMAT,
            "test_vocabulary": c.VOCABULARY or (cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else ""),
            "train_vocabulary": cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) else c.VOCABULARY,
            "max_dets": cfg.TEST.DETECTIONS_PER_IMAGE,
            "proposal_topk": cfg.MODEL.RPN.POST_NMS_TOPK_TEST,
            "use_proposal_score": c.USE_PROPOSAL_SCORE,
            "mask_size": c.ROI_MASK_SIZE,
        }

    def rgb_images(self, images: ImageList) -> List[torch.Tensor]:
        """The (3, h, w) RGB images in [0, 255] that the detector normalised, without padding."""
        out = []
        for i, (h, w) in enumerate(images.image_sizes):
            img = images.tensor[i, :, :h, :w].float() * self.pixel_std + self.pixel_mean
            out.append((img.flip(0) if self.input_format == "BGR" else img).clamp(0, 255))
        return out

    def forward(self, images: ImageList, features: Dict[str, torch.Tensor], proposals: List[Instances],
                targets: Optional[List[Instances]] = None) -> Tuple[List[Instances], Dict[str, torch.Tensor]]:
        rgb = self.rgb_images(images)
        sizes = [tuple(s) for s in images.image_sizes]
        rs = self.regionspot
        if self.training:
            if targets is None:
                raise ValueError("RegionSpotROIHeads needs the gt instances in training.")
            sam_emb, _, clip_tokens = rs.encode_images(rgb)
            tokens = [rs.decode_regions(sam_emb[i], sizes[i], boxes=t.gt_boxes.tensor, masks=False)[0]
                      for i, t in enumerate(targets)]
            loss = rs.region_losses(tokens, clip_tokens, [t.gt_classes for t in targets],
                                    [self.train_vocabulary] * len(targets))
            return proposals, {"loss_focal": loss}
        return self.inference(rgb, sizes, proposals), {}

    @torch.no_grad()
    def inference(self, rgb: List[torch.Tensor], sizes: List[Tuple[int, int]],
                  proposals: List[Instances]) -> List[Instances]:
        rs = self.regionspot
        sam_emb, input_sizes, clip_tokens = rs.encode_images(rgb)
        boxes, scores = [], []
        for p, size in zip(proposals, sizes):
            p = p[p.objectness_logits.argsort(descending=True)[: self.proposal_topk]] if p.has("objectness_logits") \
                else p[: self.proposal_topk]
            b = p.proposal_boxes.tensor.float().clone()
            keep = sanitize_boxes(b, size, " (proposals given to RegionSpotROIHeads)")
            boxes.append(b[keep])
            use = self.use_proposal_score and p.has("objectness_logits")
            scores.append(p.objectness_logits[keep].sigmoid().float() if use else None)
        regions = rs.recognize(sam_emb, input_sizes, clip_tokens, sizes, boxes,
                               [self.test_vocabulary] * len(rgb), scores)
        # Box-local masks at the detector's image size: GeneralizedRCNN's post-processing rescales.
        return [rs.detections(r["probs"], boxes[i], r["low_res"], sizes[i], input_sizes[i], sizes[i], self.max_dets,
                              box_mask_size=self.mask_size) for i, r in enumerate(regions)]
