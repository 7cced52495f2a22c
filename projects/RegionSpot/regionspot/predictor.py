"""Recognize regions in your own images: `RegionSpotPredictor`, in the spirit of SAM's `SamPredictor`.

`set_image` runs the frozen SAM and CLIP image encoders once; `predict` then classifies any number
of prompt sets (boxes, points, or both) against any vocabulary, reusing those features. Text
embeddings are cached per vocabulary, so switching vocabularies costs nothing after the first use.
"""
import logging
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import build_augmentation
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from PIL import Image
from regionspot_deploy.results import RegionResultsBase
from tqdm import tqdm

from .checkpoint import RegionSpotCheckpointer
from .config import get_regionspot_cfg
from .data.datasets import register_datasets_from_cfg
from .data.images import pil_to_numpy, read_image, to_uint8_image
from .modeling.meta_arch import RegionSpot
from .modeling.prompt_sources import SamAutoBoxes
from .modeling.region_pipeline import sanitize_boxes, top_classes, top_pairs
from .structures import IndexedMasks
from .modeling.vocabulary import VocabularyLike

logger = logging.getLogger(__name__)

# An image: an (H, W, 3) or (H, W) array, a PIL image, a (3, H, W) tensor, or a file path.
ImageLike = Union[np.ndarray, Image.Image, torch.Tensor, str]
ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]


@dataclass
class ImageFeatures:
    """The frozen encoders' output for one image: all `predict` needs besides the prompts."""

    image_size: Tuple[int, int]  # (H, W) of the original image
    input_size: Tuple[int, int]  # (h, w) of the encoded image resized for SAM
    sam_embedding: Any  # SAM: (C, h', w') embedding; SAM 2: its Sam2Features (what decode_prompts takes)
    clip_tokens: torch.Tensor  # (L, W)
    encoded_size: Tuple[int, int]  # (H', W') of the image the encoders saw (after the test resize)
    transform: T.Transform  # the test-time resize (INPUT.MIN_SIZE_TEST): original -> encoded pixels


@dataclass(repr=False)
class RegionResults(RegionResultsBase):
    """What `RegionSpotPredictor.predict` found: one entry per kept prompt, best class first.

    Tensors live on the model's device until `.cpu()` / `.to()`. Prompts whose box had no area
    inside the image are dropped; `prompt_indices` maps each entry back to its prompt.
    """

    image_size: Tuple[int, int]
    boxes: torch.Tensor  # (N, 4) XYXY pixels: the box prompt, or the mask's box for point prompts
    masks: Optional[torch.Tensor]  # (N, H, W) bool, SAM's mask of the region (None: not asked for)
    topk_classes: torch.Tensor  # (N, k) class indices into `vocabulary`, best first
    topk_scores: torch.Tensor  # (N, k) class probabilities (times the prompt score, if given)
    prompt_indices: torch.Tensor  # (N,) index of each region's prompt in the input
    vocabulary: List[str]
    class_scores: Optional[torch.Tensor] = None  # (N, C) scores of every class (for `to_detections`)

    def _index(self, item):
        return item.to(self.boxes.device) if isinstance(item, torch.Tensor) else item

    def to(self, device: Union[str, torch.device]) -> "RegionResults":
        return self._apply(lambda x: x.to(device))

    def cpu(self) -> "RegionResults":
        return self.to("cpu")

    def to_instances(self, classes_per_region: int = 1) -> Instances:
        """detectron2 `Instances` of the image by the per-region policy, sorted by score.

        With `classes_per_region` = 1, one instance per region, with the fields `pred_boxes`,
        `scores`, `pred_classes`, `pred_masks` (when predicted), `topk_classes`, `topk_scores` and
        `prompt_indices`.
        With K > 1, each region gives its K best classes as K (box, class) pairs; pairs of one
        region share one mask (`IndexedMasks`) instead of copying it. Evaluation's per-image
        policy (the best pairs of the whole image) is `to_detections`.
        """
        k = self.topk_classes.shape[1]
        if not 1 <= classes_per_region <= k:
            raise ValueError(f"classes_per_region must be in [1, {k}] (the top_k of this prediction), "
                             f"got {classes_per_region}.")
        inst = Instances(self.image_size)
        if classes_per_region == 1:
            order = self.scores.argsort(descending=True)
            inst.pred_boxes = Boxes(self.boxes[order])
            inst.scores = self.scores[order]
            inst.pred_classes = self.classes[order]
            if self.masks is not None:
                inst.pred_masks = self.masks[order]
            inst.topk_classes = self.topk_classes[order]
            inst.topk_scores = self.topk_scores[order]
            inst.prompt_indices = self.prompt_indices[order]
            return inst
        scores = self.topk_scores[:, :classes_per_region].flatten()
        order = scores.argsort(descending=True)
        region = torch.arange(len(self), device=scores.device).repeat_interleave(classes_per_region)[order]
        inst.pred_boxes = Boxes(self.boxes[region])
        inst.scores = scores[order]
        inst.pred_classes = self.topk_classes[:, :classes_per_region].flatten()[order]
        if self.masks is not None:
            inst.pred_masks = IndexedMasks(self.masks, region)
        inst.prompt_indices = self.prompt_indices[region]
        return inst

    def to_detections(self, max_dets: int = 300) -> Instances:
        """detectron2 `Instances` by evaluation's per-image policy (`top_pairs`): the image's
        `max_dets` best (box, class) pairs over every class of every region, as `--eval-only` keeps
        them; a region may appear with several classes, sharing one mask."""
        if self.class_scores is None:
            raise ValueError("These results hold no per-class scores: predict() them anew.")
        region, classes, scores = top_pairs(self.class_scores, max_dets)
        inst = Instances(self.image_size)
        inst.pred_boxes = Boxes(self.boxes[region])
        inst.scores = scores
        inst.pred_classes = classes
        if self.masks is not None:
            inst.pred_masks = IndexedMasks(self.masks, region)
        inst.prompt_indices = self.prompt_indices[region]
        return inst


def _to_float_tensor(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    try:
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float32))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must be a numeric array, got {type(x).__name__}: {e}") from e
    return t.detach().to(device=device, dtype=torch.float32).clone()


def _transformed(transform: T.Transform, coords: Optional[torch.Tensor], boxes: bool) -> Optional[torch.Tensor]:
    """XYXY boxes (N, 4) or XY points (..., 2) through a detectron2 transform, as the test mapper
    moves annotations (in float64 numpy, then back to float32 on the same device)."""
    if coords is None or isinstance(transform, T.NoOpTransform):
        return coords
    arr = coords.detach().cpu().double().numpy().copy()  # detectron2 transforms edit arrays in place
    out = transform.apply_box(arr) if boxes else transform.apply_coords(arr.reshape(-1, 2)).reshape(arr.shape)
    return torch.as_tensor(out, dtype=torch.float32, device=coords.device)


class RegionSpotPredictor:
    """Classify regions of one image at a time, against any vocabulary, reusing image features.

    Build it from a config (``RegionSpotPredictor(cfg)``: builds the model on cfg.MODEL.DEVICE and
    loads cfg.MODEL.WEIGHTS, like detectron2's `DefaultPredictor`), from a config file
    (`from_config_file`), or around a built model (``RegionSpotPredictor(model=model)``).

    Regions given in one `predict` call attend to each other in RegionSpot's head, as they do in
    training and evaluation; so a region's scores may change a little with its company.
    """

    @configurable
    def __init__(
        self,
        *,
        model: RegionSpot,
        vocabulary: Optional[VocabularyLike] = None,
        top_k: int = 5,
        max_cached_vocabularies: int = 16,
        test_augmentations: Optional[Sequence[T.Augmentation]] = None,
        sam_auto: Optional[SamAutoBoxes] = None,
    ):
        """
        Args:
            model: a RegionSpot model; it is put in eval mode.
            vocabulary: the vocabulary `predict` uses when given none (None = the model's own,
                MODEL.REGIONSPOT.VOCABULARY).
            top_k: how many classes `predict` keeps per region by default.
            max_cached_vocabularies: vocabularies whose embeddings the model's `Vocabulary` keeps
                in memory (the least recently used is dropped first; the on-disk cache keeps all).
            test_augmentations: the resize applied to each image before the encoders, as the
                test loader does (`from_config`: detectron2's `build_augmentation(cfg, False)`,
                i.e. ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)). None =
                detectron2's default ResizeShortestEdge(800, 1333); [] = none. Prompts and
                results stay in the original image's pixels either way.
            sam_auto: the automatic-mask prompt source `sam_auto_boxes` uses (`from_config`: the
                MODEL.REGIONSPOT.SAM_AUTO settings; None = SAM's own defaults).
        """
        if not isinstance(model, RegionSpot):
            raise TypeError(f"RegionSpotPredictor needs a RegionSpot model, got {type(model).__name__}.")
        self.model = model.eval()
        self.default_vocabulary = vocabulary
        self.top_k = self._check_top_k(top_k)
        model.vocabulary.max_cached = max(1, int(max_cached_vocabularies))
        if test_augmentations is None:
            test_augmentations = [T.ResizeShortestEdge(800, 1333)]
        self.test_augmentations = T.AugmentationList(list(test_augmentations))
        self.sam_auto = sam_auto if sam_auto is not None else SamAutoBoxes(params={})
        self._features: Optional[ImageFeatures] = None
        self._image: Optional[np.ndarray] = None

    @classmethod
    def from_config(cls, cfg: CfgNode, model: Optional[RegionSpot] = None, **kwargs):
        register_datasets_from_cfg(cfg)  # a cfg built by hand may name its own datasets too
        if model is None:
            model = build_model(cfg)  # already on cfg.MODEL.DEVICE
            if cfg.MODEL.WEIGHTS:
                RegionSpotCheckpointer(model, allow_random_head=cfg.MODEL.REGIONSPOT.ALLOW_RANDOM_HEAD).load(
                    cfg.MODEL.WEIGHTS)
            else:
                logger.warning("MODEL.WEIGHTS is empty: RegionSpot's head is randomly initialised, "
                               "so its classes are meaningless.")
        vocabulary = cfg.MODEL.REGIONSPOT.VOCABULARY or (cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None)
        return {"model": model, "vocabulary": vocabulary,
                "test_augmentations": build_augmentation(cfg, is_train=False), "sam_auto": SamAutoBoxes(cfg),
                **kwargs}

    @classmethod
    def from_config_file(
        cls, config_file: str, weights: Optional[str] = None, opts: Sequence[str] = (), **kwargs
    ) -> "RegionSpotPredictor":
        """Build from a RegionSpot YAML config (a path, or a model-zoo name such as
        "RegionSpot-BL.yaml"), a checkpoint (None = the config's MODEL.WEIGHTS) and "KEY VALUE"
        overrides, e.g. ``opts=["MODEL.DEVICE", "cpu"]``."""
        cfg = get_regionspot_cfg(config_file, opts)
        if weights is not None:
            cfg.MODEL.WEIGHTS = weights
        cfg.freeze()
        return cls(cfg, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ images
    def _to_rgb_array(self, image: ImageLike, format: str) -> np.ndarray:
        if format not in ("RGB", "BGR"):
            raise ValueError(f"format must be 'RGB' or 'BGR', got {format!r}.")
        if isinstance(image, str):
            return read_image(image, format="RGB")  # a file is decoded as RGB whatever `format` says
        if isinstance(image, Image.Image):
            return pil_to_numpy(image, "RGB", "The PIL image")
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"An image tensor must be (3, H, W), got {tuple(image.shape)}.")
            image = image.detach()
            image = image.float() if image.dtype == torch.bfloat16 else image  # numpy has no bfloat16
            image = image.permute(1, 2, 0).cpu().numpy()
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"An image must be (H, W, 3) or (H, W), got shape {arr.shape}.")
        arr = to_uint8_image(arr, "The image")
        if format == "BGR":
            arr = arr[:, :, ::-1]
        return np.ascontiguousarray(arr)

    def _to_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(rgb.transpose(2, 0, 1).copy()).to(self.device)

    def _resize(self, rgb: np.ndarray) -> Tuple[np.ndarray, T.Transform]:
        """The image the test loader would give the model (INPUT.MIN_SIZE_TEST), and the transform."""
        aug_input = T.AugInput(rgb)
        transform = self.test_augmentations(aug_input)
        return aug_input.image, transform

    def _encode(self, rgbs: List[np.ndarray]) -> List[ImageFeatures]:
        resized = [self._resize(a) for a in rgbs]
        tensors = [self._to_tensor(r) for r, _ in resized]
        sam_emb, input_sizes, clip_tokens = self.model.encode_images(tensors)
        return [
            ImageFeatures(tuple(rgb.shape[:2]), tuple(input_sizes[i]), sam_emb[i], clip_tokens[i],
                          tuple(tensors[i].shape[-2:]), resized[i][1])
            for i, rgb in enumerate(rgbs)
        ]

    def set_image(self, image: ImageLike, format: str = "RGB") -> None:
        """Run the frozen SAM and CLIP image encoders on `image`, once, for later `predict` calls.

        Args:
            image: (H, W, 3) array in `format` channel order (or (H, W) grayscale), a PIL
                image, a (3, H, W) tensor in `format` order, or an image file path. Arrays and
                tensors are uint8 in [0, 255], uint16 (scaled by 255/65535) or float in [0, 1]
                (scaled by 255); other dtypes and ranges raise ValueError (`images.to_uint8_image`).
                Files and PIL images of 16-bit grayscale are scaled too (`images.read_image`).
            format: "RGB" or "BGR" (as `cv2.imread` gives).
        """
        rgb = self._to_rgb_array(image, format)
        self._features = self._encode([rgb])[0]
        self._image = rgb

    def reset_image(self) -> None:
        self._features, self._image = None, None

    @property
    def image(self) -> Optional[np.ndarray]:
        """The current image as an (H, W, 3) RGB array (e.g. for detectron2's `Visualizer`)."""
        return self._image

    @property
    def features(self) -> ImageFeatures:
        if self._features is None:
            raise RuntimeError("No image is set: call set_image(image) before predict().")
        return self._features

    # ------------------------------------------------------------------ vocabularies
    def vocabulary_embeddings(self, vocabulary: Optional[VocabularyLike] = None) -> Tuple[List[str], torch.Tensor]:
        """(class names, (C, D) text embeddings on the model's device) of a vocabulary (None = the
        predictor's default), resolved and cached by the model's `Vocabulary`."""
        return self.model.vocabulary.embeddings(self.default_vocabulary if vocabulary is None else vocabulary)

    def metadata(self, vocabulary: Optional[VocabularyLike] = None) -> Metadata:
        """detectron2 `Metadata` whose `thing_classes` are the vocabulary's names (for `Visualizer`)."""
        names, _ = self.vocabulary_embeddings(vocabulary)
        return Metadata(name="regionspot_predictor", thing_classes=list(names))

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def _check_top_k(top_k: int) -> int:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
        return int(top_k)

    def _prepare_prompts(self, size, boxes, points, point_labels, prompt_scores):
        """Validated prompts on the device, with zero-area boxes dropped; returns a dict."""
        device = self.device
        if boxes is None and points is None:
            if point_labels is not None:
                raise ValueError("point_labels were given without points.")
            raise ValueError("Give region prompts: boxes (N, 4), points (N, P, 2) with point_labels, or both.")
        n = None
        if boxes is not None:
            boxes = _to_float_tensor(boxes, "boxes", device)
            if boxes.ndim == 1 and boxes.shape[0] == 4:
                boxes = boxes[None]  # one box, as SamPredictor accepts it
            if boxes.ndim != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"boxes must have shape (N, 4) in XYXY pixels, got {tuple(boxes.shape)}.")
            n = boxes.shape[0]
        if points is not None:
            if point_labels is None:
                raise ValueError("points need point_labels of the same shape minus the last axis "
                                 "(1 = foreground, 0 = background, -1 = padding).")
            points = _to_float_tensor(points, "points", device)
            labels = _to_float_tensor(point_labels, "point_labels", device)
            if points.ndim == 2:  # (P, 2): one region from P points, as in SamPredictor
                points, labels = points[None], labels[None] if labels.ndim == 1 else labels
            if points.ndim != 3 or points.shape[-1] != 2:
                raise ValueError(f"points must have shape (N, P, 2) or (P, 2) in XY pixels, got {tuple(points.shape)}.")
            if tuple(labels.shape) != tuple(points.shape[:2]):
                raise ValueError(f"point_labels must have shape {tuple(points.shape[:2])} to match the points, "
                                 f"got {tuple(labels.shape)}.")
            if not torch.isfinite(points).all():
                bad = (~torch.isfinite(points)).any(dim=-1).any(dim=-1).nonzero().flatten().tolist()
                raise ValueError(f"points have NaN or infinite coordinates in regions {bad}.")
            if not torch.isin(labels, labels.new_tensor([-1.0, 0.0, 1.0])).all():
                raise ValueError(f"point_labels must be 1 (foreground), 0 (background) or -1 (padding), "
                                 f"got values {sorted(set(labels.flatten().tolist()))}.")
            h, w = size
            outside = ((points[..., 0] < 0) | (points[..., 0] > w) | (points[..., 1] < 0) | (points[..., 1] > h))
            outside &= labels >= 0
            if outside.any():
                region, point = outside.nonzero()[0].tolist()
                raise ValueError(f"Point {point} of region {region}, {points[region, point].tolist()}, lies outside "
                                 f"the {w}x{h} (W x H) image.")
            if n is not None and points.shape[0] != n:
                raise ValueError(f"boxes and points must describe the same regions: {n} boxes but "
                                 f"{points.shape[0]} point sets.")
            n = points.shape[0]
            point_labels = labels.long()
        elif point_labels is not None:
            raise ValueError("point_labels were given without points.")
        if prompt_scores is not None:
            prompt_scores = _to_float_tensor(prompt_scores, "prompt_scores", device).flatten()
            if prompt_scores.shape[0] != n:
                raise ValueError(f"prompt_scores must have one score per region ({n}), got {prompt_scores.shape[0]}.")
            if not torch.isfinite(prompt_scores).all() or (prompt_scores < 0).any():
                raise ValueError("prompt_scores must be finite and non-negative.")
        keep = torch.arange(n, device=device)
        if boxes is not None:
            keep = sanitize_boxes(boxes, size, " given to predict()")  # clips in place, warns on drops
            boxes = boxes[keep]
            if points is not None:
                points, point_labels = points[keep], point_labels[keep]
            if prompt_scores is not None:
                prompt_scores = prompt_scores[keep]
        return {"boxes": boxes, "points": points, "point_labels": point_labels,
                "scores": prompt_scores, "indices": keep}

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        boxes: Optional[ArrayLike] = None,
        points: Optional[ArrayLike] = None,
        point_labels: Optional[ArrayLike] = None,
        vocabulary: Optional[VocabularyLike] = None,
        top_k: Optional[int] = None,
        prompt_scores: Optional[ArrayLike] = None,
        return_masks: Optional[bool] = None,
    ) -> RegionResults:
        """Classify regions of the image given to `set_image`, reusing its features.

        Args:
            boxes: (N, 4) XYXY boxes in image pixels (or one box of shape (4,)), a detectron2
                `Boxes`, or an `Instances` of this image (e.g. a `DefaultPredictor`'s detections:
                its `pred_boxes`, `proposal_boxes` or `gt_boxes`, and its `scores` as
                `prompt_scores` unless those are given). Empty is fine: no regions. Boxes are
                clipped to the image; those with no area left are dropped with a warning.
            points: (N, P, 2) XY points, P per region; (P, 2) means one region, as in SAM.
            point_labels: (N, P) (or (P,)): 1 foreground, 0 background, -1 padding.
                With both boxes and points, region i is box i together with its points.
            vocabulary: None (the predictor's default), a spec ("lvis", "coco", "custom", a
                registered dataset, a text-embedding file) or a list of class names (an entry
                may be [name, synonym, ...] to average the synonyms' embeddings).
            top_k: classes kept per region (default: the predictor's `top_k`); capped at the
                vocabulary's size.
            prompt_scores: (N,) non-negative scores of the prompts (e.g. a detector's confidence),
                multiplied into each region's class probabilities, so `scores` rank regions by
                "is an object" times "is this class", as evaluation with proposals does.
            return_masks: paste SAM's masks at the image size (default: MODEL.REGIONSPOT.MASK_ON).
                Point-prompted regions need them for their boxes, so they always get them.
        Returns:
            `RegionResults` of the kept prompts, in prompt order.
        """
        boxes, prompt_scores = self._unpack_boxes(boxes, prompt_scores, self.features.image_size)
        return self._predict(self.features, boxes, points, point_labels, vocabulary, top_k, prompt_scores,
                             return_masks)

    @staticmethod
    def _unpack_boxes(boxes, prompt_scores, image_size):
        """detectron2 `Boxes` / `Instances` prompts -> a box tensor and scores."""
        if isinstance(boxes, Instances):
            if tuple(boxes.image_size) != tuple(image_size):
                raise ValueError(f"The Instances given as boxes are of a {boxes.image_size} image, not of the "
                                 f"{tuple(image_size)} image set with set_image().")
            field = next((f for f in ("pred_boxes", "proposal_boxes", "gt_boxes") if boxes.has(f)), None)
            if field is None:
                raise ValueError("The Instances given as boxes have no pred_boxes, proposal_boxes or gt_boxes.")
            if prompt_scores is None and boxes.has("scores"):
                prompt_scores = boxes.scores
            boxes = boxes.get(field)
        if isinstance(boxes, Boxes):
            boxes = boxes.tensor
        return boxes, prompt_scores

    @torch.no_grad()
    def _predict(self, feats: ImageFeatures, boxes, points, point_labels, vocabulary, top_k, prompt_scores,
                 return_masks=None):
        model = self.model
        top_k = self._check_top_k(self.top_k if top_k is None else top_k)
        prompts = self._prepare_prompts(feats.image_size, boxes, points, point_labels, prompt_scores)
        names, text_emb = self.vocabulary_embeddings(vocabulary)
        # Point prompts need masks for their boxes.
        want_masks = (model.mask_on if return_masks is None else return_masks) or prompts["boxes"] is None
        tokens, low_res = model.decode_regions(
            feats.sam_embedding, feats.encoded_size, boxes=_transformed(feats.transform, prompts["boxes"], True),
            points=_transformed(feats.transform, prompts["points"], False), point_labels=prompts["point_labels"],
            masks=want_masks)
        region_emb = model.embed_regions([tokens], feats.clip_tokens[None])[0]
        probs = model.probabilities(region_emb, text_emb, prompts["scores"])
        topk_scores, topk_classes = top_classes(probs, top_k)
        masks = None
        if want_masks:
            masks = model.paste_masks(low_res, feats.input_size, feats.image_size)
        out_boxes = prompts["boxes"]
        if out_boxes is None:
            out_boxes = self._boxes_of_points(masks, prompts["points"], prompts["point_labels"])
        return RegionResults(
            image_size=tuple(feats.image_size), boxes=out_boxes, masks=masks, topk_classes=topk_classes,
            topk_scores=topk_scores, prompt_indices=prompts["indices"], vocabulary=list(names), class_scores=probs,
        )

    @staticmethod
    def _boxes_of_points(masks: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A point-prompted region's box is its mask's box; an empty mask gets its foreground points' box."""
        cols, rows = masks.any(dim=1), masks.any(dim=2)  # (N, W), (N, H); first/last True bound the mask
        w, h = cols.shape[1], rows.shape[1]
        boxes = torch.stack([
            cols.int().argmax(dim=1), rows.int().argmax(dim=1),
            w - cols.flip(1).int().argmax(dim=1), h - rows.flip(1).int().argmax(dim=1),
        ], dim=1).float()
        empty = ~cols.any(dim=1)
        for i in empty.nonzero().flatten().tolist():
            fg = points[i][labels[i] == 1]
            fg = fg if fg.numel() else points[i][labels[i] >= 0]
            if fg.numel():
                boxes[i] = torch.cat([fg.min(dim=0).values, fg.max(dim=0).values])
        return boxes

    def sam_auto_boxes(self) -> torch.Tensor:
        """(N, 4) XYXY boxes of the masks SAM's automatic mask generator finds in the current image.

        The generator (MODEL.REGIONSPOT.SAM_AUTO settings) reuses the SAM embedding `set_image`
        computed, so the image is not encoded again.
        """
        if self._image is None:
            raise RuntimeError("No image is set: call set_image(image) before sam_auto_boxes().")
        f = self._features
        image = torch.from_numpy(np.array(f.transform.apply_image(self._image))).permute(2, 0, 1)
        boxes = self.sam_auto([{}], [image.to(self.device)], ([f.sam_embedding], [f.input_size], None),
                              self.model)[0][0]
        return _transformed(f.transform.inverse(), boxes, True)

    # ------------------------------------------------------------------ many images
    def iter_predict(
        self,
        images: Sequence[ImageLike],
        boxes: Optional[Sequence[Optional[ArrayLike]]] = None,
        points: Optional[Sequence[Optional[ArrayLike]]] = None,
        point_labels: Optional[Sequence[Optional[ArrayLike]]] = None,
        prompt_scores: Optional[Sequence[Optional[ArrayLike]]] = None,
        vocabulary: Optional[VocabularyLike] = None,
        top_k: Optional[int] = None,
        format: str = "RGB",
        batch_size: int = 4,
        return_masks: Optional[bool] = None,
    ) -> Iterator[RegionResults]:
        """Yield `predict`'s result for each image, encoding `batch_size` images per encoder call.

        Prompt arguments are sequences with one entry per image (each as in `predict`). The image
        set with `set_image`, if any, is left as it was.
        """
        n = len(images)
        for name, seq in (("boxes", boxes), ("points", points), ("point_labels", point_labels),
                          ("prompt_scores", prompt_scores)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{name} must have one entry per image ({n}), got {len(seq)}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.vocabulary_embeddings(vocabulary)  # fail early, before any image work
        pick = lambda seq, i: None if seq is None else seq[i]  # noqa: E731
        with tqdm(total=n, desc="RegionSpot", unit="image", disable=n < 8) as bar:
            for start in range(0, n, batch_size):
                rgbs = [self._to_rgb_array(img, format) for img in images[start:start + batch_size]]
                for j, f in enumerate(self._encode(rgbs)):
                    i = start + j
                    b, s = self._unpack_boxes(pick(boxes, i), pick(prompt_scores, i), f.image_size)
                    yield self._predict(f, b, pick(points, i), pick(point_labels, i), vocabulary, top_k, s,
                                        return_masks)
                    bar.update(1)

    def predict_batch(self, images: Sequence[ImageLike], **kwargs) -> List[RegionResults]:
        """`iter_predict` as a list (all masks are kept in memory: iterate for long image lists)."""
        return list(self.iter_predict(images, **kwargs))
