"""Where RegionSpot's box prompts come from at inference: a registry of small classes.

A prompt source maps a batch to one (boxes, scores) pair per image: boxes (N, 4) XYXY in the
pixels of the image the model was given, scores (N,) or None. Built-ins: "gt" (the dataset's
boxes), "proposals" (files, attached by the data layer as detectron2 does), "sam_auto" (SAM's
automatic mask generator) and "detector" (any detectron2 model, run in the same forward). Add
your own with ``@PROMPT_SOURCE_REGISTRY.register()`` and ``MODEL.REGIONSPOT.PROMPT "YourClass"``.
"""
import logging
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.registry import Registry
from torch import nn
from torchvision.ops import nms

from ..checkpoint import SafeDetectionCheckpointer
from ..utils.lazy_overrides import check_overrides

logger = logging.getLogger(__name__)

PROMPT_SOURCE_REGISTRY = Registry("REGIONSPOT_PROMPT_SOURCE")
PROMPT_SOURCE_REGISTRY.__doc__ = """Prompt sources: `cls(cfg)` -> a module called as
`source(batched_inputs, images, features, pipeline)` returning one (boxes, scores or None) per image."""
# The config's short names of the built-in sources.
BUILTIN_SOURCES = {"gt": "GTBoxes", "proposals": "ProposalBoxes", "sam_auto": "SamAutoBoxes",
                   "detector": "DetectorBoxes"}

Prompts = List[Tuple[torch.Tensor, Optional[torch.Tensor]]]


def _where(x: Dict) -> str:
    return f" of image {x.get('file_name', x.get('image_id', '?'))}"


class PromptSource(nn.Module):
    """Base class: `forward(batched_inputs, images, features, pipeline) -> Prompts`.

    `images` are the (3, H, W) RGB images on the device, `features` the pipeline's
    `encode_images` output (SAM embeddings, SAM input sizes, CLIP tokens)."""

    def __init__(self, cfg: Optional[CfgNode] = None):
        super().__init__()


@PROMPT_SOURCE_REGISTRY.register()
class GTBoxes(PromptSource):
    """The ground-truth boxes (`instances.gt_boxes`) that RegionSpotDatasetMapper keeps at test time."""

    def forward(self, batched_inputs, images, features, pipeline) -> Prompts:
        out = []
        for x, img in zip(batched_inputs, images):
            if "instances" not in x:
                raise KeyError(f"PROMPT='gt' needs the ground-truth 'instances'{_where(x)}; build the loader "
                               "with RegionSpotDatasetMapper, which keeps them at test time.")
            out.append((x["instances"].gt_boxes.tensor.to(img.device), None))
        return out


@PROMPT_SOURCE_REGISTRY.register()
class ProposalBoxes(PromptSource):
    """detectron2's precomputed proposals (`proposals` with `proposal_boxes` and `scores` or
    `objectness_logits`), attached by the data layer from DATASETS.PROPOSAL_FILES_TEST."""

    def __init__(self, cfg: Optional[CfgNode] = None, use_scores: Optional[bool] = None):
        super().__init__()
        self.use_scores = use_scores if use_scores is not None else \
            (cfg.MODEL.REGIONSPOT.USE_PROPOSAL_SCORE if cfg is not None else True)

    def forward(self, batched_inputs, images, features, pipeline) -> Prompts:
        out = []
        for x, img in zip(batched_inputs, images):
            if "proposals" not in x:
                raise KeyError(f"PROMPT='proposals' needs 'proposals'{_where(x)}; set DATASETS.PROPOSAL_FILES_TEST.")
            p = x["proposals"]
            scores = None
            if self.use_scores and p.has("scores"):
                scores = p.scores
            elif self.use_scores and p.has("objectness_logits"):
                scores = p.objectness_logits.sigmoid()
            out.append((p.proposal_boxes.tensor.to(img.device),
                        None if scores is None else scores.to(img.device).float()))
        return out


@PROMPT_SOURCE_REGISTRY.register()
class SamAutoBoxes(PromptSource):
    """Boxes of SAM's automatic mask generator (MODEL.REGIONSPOT.SAM_AUTO), reusing the embedding."""

    def __init__(self, cfg: Optional[CfgNode] = None, params: Optional[Dict] = None):
        super().__init__()
        if params is None and cfg is not None:
            a = cfg.MODEL.REGIONSPOT.SAM_AUTO
            params = {"points_per_side": a.POINTS_PER_SIDE, "pred_iou_thresh": a.PRED_IOU_THRESH,
                      "stability_score_thresh": a.STABILITY_SCORE_THRESH,
                      "min_mask_region_area": a.MIN_MASK_REGION_AREA}
        self.params = dict(params or {})

    def forward(self, batched_inputs, images, features, pipeline) -> Prompts:
        sam_emb, input_sizes, _ = features
        return [(pipeline.sam_encoder.auto_boxes(img, sam_emb[i], input_sizes[i], self.params), None)
                for i, img in enumerate(images)]


def load_detector(config: str, weights: str = "", opts=(), device: str = "cpu") -> Tuple[nn.Module, Dict]:
    """A frozen detectron2 model and how to feed it, from a yacs YAML, a LazyConfig `.py` or a
    detectron2 model-zoo config name (e.g. "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"), with
    weights from a path or URL (model-zoo names: "" = its released weights; "random" = none).
    Returns (model,
    {"format": "RGB"|"BGR", "augmentations": [test resize]})."""
    path = config
    if not os.path.isfile(path):
        from detectron2 import model_zoo

        try:
            path = model_zoo.get_config_file(config)
        except RuntimeError as e:
            raise FileNotFoundError(f"MODEL.REGIONSPOT.DETECTOR.CONFIG_FILE {config!r} is neither a file nor a "
                                    "detectron2 model-zoo config name.") from e
        if not weights:
            weights = model_zoo.get_checkpoint_url(config)
    if path.endswith(".py"):
        lazy = LazyConfig.load(path)
        check_overrides(lazy, list(opts), f"{path} (MODEL.REGIONSPOT.DETECTOR.OPTS)")
        lazy = LazyConfig.apply_overrides(lazy, list(opts))
        model = instantiate(lazy.model)
        fmt = lazy.model.get("input_format", "BGR")
        try:
            augs = [instantiate(a) for a in lazy.dataloader.test.mapper.augmentations]
        except (AttributeError, KeyError):
            augs = []
    else:
        cfg = get_cfg()
        cfg.merge_from_file(path)
        cfg.merge_from_list(list(opts))
        cfg.MODEL.DEVICE = str(device)
        model = build_model(cfg)
        fmt = cfg.INPUT.FORMAT
        augs = [T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)]
    model.to(device).eval()
    if weights and weights != "random":
        # Never plain pickle (model-zoo .pkl files) nor a download without a timeout.
        SafeDetectionCheckpointer(model, key="MODEL.REGIONSPOT.DETECTOR.WEIGHTS", what="detector weights").load(weights)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {"format": fmt, "augmentations": augs}


@PROMPT_SOURCE_REGISTRY.register()
class DetectorBoxes(PromptSource):
    """Any detectron2 detector as the prompt source, run in the same forward on the same image:
    its boxes and scores (above `score_thresh`, best `topk`, optionally class-agnostic NMS)
    become the prompts. The image is given to it in its own INPUT.FORMAT and test resize, with
    "height"/"width" of RegionSpot's image, so its boxes come back in RegionSpot's pixels."""

    def __init__(self, cfg: Optional[CfgNode] = None, *, detector: Optional[nn.Module] = None,
                 input_format: str = "BGR", augmentations=(), score_thresh: float = 0.0, topk: int = 300,
                 nms_thresh: float = 0.0, use_scores: bool = True):
        """
        Args:
            cfg: RegionSpot config (MODEL.REGIONSPOT.DETECTOR.*); or give the rest directly.
            detector: a built detectron2 model (`[{"image", "height", "width"}] -> [{"instances"}]`).
            input_format: "RGB" or "BGR", the detector's INPUT.FORMAT.
            augmentations: the detector's test-time resize (detectron2 augmentations).
            score_thresh: boxes scored below this are dropped.
            topk: at most this many boxes per image, best first (0 = all).
            nms_thresh: IoU of class-agnostic NMS over the detector's boxes (0 = off).
            use_scores: pass the detector's scores on, to multiply the class probabilities
                (MODEL.REGIONSPOT.USE_PROPOSAL_SCORE).
        """
        super().__init__()
        if cfg is not None:
            d = cfg.MODEL.REGIONSPOT.DETECTOR
            if not d.CONFIG_FILE:
                raise ValueError("MODEL.REGIONSPOT.PROMPT 'detector' needs MODEL.REGIONSPOT.DETECTOR.CONFIG_FILE: "
                                 "a yacs .yaml, a LazyConfig .py or a detectron2 model-zoo config name.")
            detector, feed = load_detector(d.CONFIG_FILE, d.WEIGHTS, d.OPTS, cfg.MODEL.DEVICE)
            input_format, augmentations = feed["format"], feed["augmentations"]
            score_thresh, topk, nms_thresh = d.SCORE_THRESH, d.TOPK, d.NMS_THRESH
            use_scores = cfg.MODEL.REGIONSPOT.USE_PROPOSAL_SCORE
        if detector is None:
            raise ValueError("DetectorBoxes needs a detector (or a cfg naming one).")
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"The detector's input format must be RGB or BGR, not {input_format!r}.")
        self.detector = detector.eval()
        self.input_format = input_format
        self.augmentations = T.AugmentationList(list(augmentations))
        self.score_thresh, self.topk, self.nms_thresh = float(score_thresh), int(topk), float(nms_thresh)
        self.use_scores = use_scores

    def train(self, mode: bool = True):
        super().train(mode)
        self.detector.eval()  # frozen, like SAM and CLIP
        return self

    @torch.no_grad()
    def forward(self, batched_inputs, images, features, pipeline) -> Prompts:
        inputs = []
        for x, img in zip(batched_inputs, images):
            rgb = img.permute(1, 2, 0).to("cpu", torch.uint8).numpy()
            arr = rgb[:, :, ::-1] if self.input_format == "BGR" else rgb
            aug = T.AugInput(np.ascontiguousarray(arr))
            self.augmentations(aug)
            inputs.append({"image": torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1))),
                           "height": img.shape[-2], "width": img.shape[-1],
                           **{k: x[k] for k in ("file_name", "image_id") if k in x}})
        out = []
        for img, r in zip(images, self.detector(inputs)):
            inst = r["instances"]
            boxes = inst.pred_boxes.tensor.float().to(img.device)
            scores = (inst.scores if inst.has("scores") else torch.ones(len(inst))).float().to(img.device)
            keep = scores >= self.score_thresh
            boxes, scores = boxes[keep], scores[keep]
            if self.nms_thresh > 0 and len(boxes):
                keep = nms(boxes, scores, self.nms_thresh)  # sorted by score
                boxes, scores = boxes[keep], scores[keep]
            order = scores.argsort(descending=True)
            if self.topk > 0:
                order = order[: self.topk]
            out.append((boxes[order], scores[order] if self.use_scores else None))
        return out


def build_prompt_source(cfg: CfgNode) -> PromptSource:
    """The source named by MODEL.REGIONSPOT.PROMPT ("gt", "proposals", "sam_auto", "detector" or
    the name of a class registered in PROMPT_SOURCE_REGISTRY)."""
    name = cfg.MODEL.REGIONSPOT.PROMPT
    cls_name = BUILTIN_SOURCES.get(name, name)
    if cls_name not in PROMPT_SOURCE_REGISTRY:
        raise ValueError(f"Unknown prompt source {name!r} (MODEL.REGIONSPOT.PROMPT); choose one of "
                         f"{sorted(BUILTIN_SOURCES)} or a class registered in PROMPT_SOURCE_REGISTRY "
                         f"({sorted(k for k, _ in PROMPT_SOURCE_REGISTRY)}).")
    return PROMPT_SOURCE_REGISTRY.get(cls_name)(cfg)
