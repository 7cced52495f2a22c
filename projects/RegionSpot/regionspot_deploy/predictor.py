"""`OnnxRegionSpotPredictor`: RegionSpot on onnxruntime, numpy in and numpy out, without torch.

It mirrors `regionspot.RegionSpotPredictor`: `set_image` runs the two image encoders once, `predict`
classifies boxes and/or points of that image against any vocabulary, and returns `RegionResults`
with the same fields (numpy arrays). Vocabularies are lists of class names (embedded with the
exported text graph and CLIP's templates, cached) or the vocabulary exported beside the graphs.
"""
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from . import preprocess as pp
from .manifest import FolderError, load_manifest
from .results import RegionResultsBase

logger = logging.getLogger(__name__)

ImageLike = Union[np.ndarray, Image.Image, str]
VocabularyLike = Union[None, str, Sequence[Union[str, Sequence[str]]]]


@dataclass(repr=False)
class RegionResults(RegionResultsBase):
    """What `predict` found, one entry per kept prompt, best class first (numpy arrays).

    Prompts whose box had no area inside the image are dropped; `prompt_indices` maps each entry
    back to its prompt. Same fields as `regionspot.RegionResults`.
    """

    image_size: Tuple[int, int]
    boxes: np.ndarray  # (N, 4) float32 XYXY pixels: the box prompt, or the mask's box for point prompts
    masks: Optional[np.ndarray]  # (N, H, W) bool (None: not asked for)
    topk_classes: np.ndarray  # (N, k) int64 class indices into `vocabulary`, best first
    topk_scores: np.ndarray  # (N, k) float32 class probabilities (times the prompt score, if given)
    prompt_indices: np.ndarray  # (N,) int64
    vocabulary: List[str]
    class_scores: Optional[np.ndarray] = None  # (N, C) scores of every class


def _float_array(x, name: str) -> np.ndarray:
    try:
        return np.array(x, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must be a numeric array, got {type(x).__name__}: {e}") from e


def to_rgb_array(image: ImageLike, format: str = "RGB") -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a file path, a PIL image or an (H, W, 3) / (H, W) uint8
    array in `format` order (files and PIL images: EXIF orientation applied, as detectron2 reads)."""
    if format not in ("RGB", "BGR"):
        raise ValueError(f"format must be 'RGB' or 'BGR', got {format!r}.")
    if isinstance(image, str):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"Image file {image} does not exist.")
        with Image.open(image) as im:
            return to_rgb_array(ImageOps.exif_transpose(im), "RGB")
    if isinstance(image, Image.Image):
        if image.mode in ("I", "I;16", "I;16B", "F"):
            raise ValueError(f"The PIL image has mode {image.mode}: convert it to 8-bit RGB first.")
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"An image must be (H, W, 3) or (H, W), got shape {arr.shape}.")
    if arr.dtype != np.uint8:
        raise ValueError(f"An image array must be uint8 in [0, 255], got {arr.dtype}: convert it first.")
    if format == "BGR":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


def sanitize_boxes(boxes: np.ndarray, image_size: Tuple[int, int]) -> np.ndarray:
    """Clip (N, 4) XYXY boxes to the image in place; return the indices of those with area left."""
    if not np.isfinite(boxes).all():
        bad = np.nonzero(~np.isfinite(boxes).all(axis=1))[0].tolist()
        raise ValueError(f"Boxes given to predict() have NaN or infinite coordinates at rows {bad}.")
    h, w = image_size
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    keep = np.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))[0]
    if len(keep) < len(boxes):
        logger.warning(f"Dropped {len(boxes) - len(keep)} of {len(boxes)} boxes given to predict() with zero "
                       "area inside the image.")
    return keep


def top_classes(probs: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Each region's k best classes: (N, k) scores and classes, best first."""
    k = min(int(k), probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(probs, order, axis=1), order.astype(np.int64)


def boxes_of_points(masks: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A point-prompted region's box is its mask's box; an empty mask gets its foreground points' box."""
    n, h, w = masks.shape
    cols, rows = masks.any(axis=1), masks.any(axis=2)
    boxes = np.stack([cols.argmax(axis=1), rows.argmax(axis=1),
                      w - cols[:, ::-1].argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)], axis=1).astype(np.float32)
    for i in np.nonzero(~cols.any(axis=1))[0]:
        fg = points[i][labels[i] == 1]
        fg = fg if len(fg) else points[i][labels[i] >= 0]
        if len(fg):
            boxes[i] = np.concatenate([fg.min(axis=0), fg.max(axis=0)])
    return boxes


def clean_class_name(name: str, suffixes: Sequence[str]) -> str:
    """Strip the panoptic suffixes (as `regionspot.modeling.text_embeddings.clean_class_name`)."""
    stripped = True
    while stripped:
        stripped = False
        for suffix in suffixes:
            if name.endswith(suffix):
                name, stripped = name[: -len(suffix)], True
    return name


class OnnxRegionSpotPredictor:
    """Classify regions of one image at a time with an exported folder (`tools/export_onnx.py`).

    Regions given in one `predict` call attend to each other in the head, as in
    `regionspot.RegionSpotPredictor`.
    """

    def __init__(self, folder: str, top_k: int = 5, providers: Optional[Sequence[str]] = None,
                 int8: bool = False, verify: bool = True, max_cached_vocabularies: int = 16,
                 session_options=None, decode_chunk: int = 16):
        """
        Args:
            folder: an exported folder; its manifest's SHA256 of every file is checked first.
            top_k: classes kept per region by default.
            providers: onnxruntime execution providers (default: CPU).
            int8: run the int8-quantized image encoders (exported with --quantize-int8).
            verify: check the files' SHA256 (turn off only for folders you just checked).
            max_cached_vocabularies: vocabularies whose embeddings stay in memory.
            session_options: an `onnxruntime.SessionOptions` (threads, ...).
            decode_chunk: prompts per call of the region decoder (bounds memory: about 60 MB per
                prompt with SAM at 1024 pixels).
        """
        import onnxruntime as ort

        self.folder = folder
        self.manifest = m = load_manifest(folder, verify=verify)
        self.top_k = self._check_top_k(top_k)
        if isinstance(decode_chunk, bool) or not isinstance(decode_chunk, int) or decode_chunk < 1:
            raise ValueError(f"decode_chunk must be a positive integer, got {decode_chunk!r}.")
        self.decode_chunk = decode_chunk
        providers = list(providers) if providers else ["CPUExecutionProvider"]
        graphs = dict(m["graphs"])
        if int8:
            if not m.get("int8_graphs"):
                raise FolderError(f"{folder} holds no int8 graphs: export it with --quantize-int8.")
            graphs.update(m["int8_graphs"])

        def session(key):
            return ort.InferenceSession(os.path.join(folder, graphs[key]), sess_options=session_options,
                                        providers=providers)

        self.sessions = {k: session(k) for k in graphs}
        self._tokenizer = None
        self._vocab_cache: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
        self.max_cached = max(1, int(max_cached_vocabularies))
        self.default_vocabulary = None
        if m.get("vocabulary"):
            v = m["vocabulary"]
            with open(os.path.join(folder, v["names"])) as f:
                names = json.load(f)
            self.default_vocabulary = (list(names), np.load(os.path.join(folder, v["embeddings"]), allow_pickle=False))
        self._features = None
        self._image = None

    # ------------------------------------------------------------------ images
    def set_image(self, image: ImageLike, format: str = "RGB") -> None:
        """Run the SAM and CLIP image encoders on `image`, once, for later `predict` calls."""
        rgb = to_rgb_array(image, format)
        m = self.manifest
        resized = pp.test_resize(rgb, m["test_resize"])
        sam_x, input_size = pp.sam_input(resized, m["sam"])
        sam_feats = self.sessions["sam_image"].run(None, {"image": sam_x})
        clip_tokens = self.sessions["clip_image"].run(None, {"image": pp.clip_input(resized, m["clip"])})[0]
        self._features = {"image_size": tuple(rgb.shape[:2]), "encoded_size": tuple(resized.shape[:2]),
                          "input_size": tuple(input_size), "sam": sam_feats, "clip_tokens": clip_tokens}
        self._image = rgb

    def reset_image(self) -> None:
        self._features, self._image = None, None

    @property
    def image(self) -> Optional[np.ndarray]:
        return self._image

    # ------------------------------------------------------------------ vocabularies
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            t = self.manifest.get("text")
            if not t or "text" not in self.sessions:
                raise FolderError(f"{self.folder} has no text graph: use its exported vocabulary (vocabulary=None) "
                                  "or re-export with the text graph to embed new class names.")
            from .tokenizer import ClipTokenizer

            self._tokenizer = ClipTokenizer(os.path.join(self.folder, t["bpe_vocab"]), t["context_length"])
        return self._tokenizer

    def encode_prompts(self, prompts: List[str], chunk: int = 256) -> np.ndarray:
        """(N, D) text embeddings of prompts, as CLIP projects them (not normalised)."""
        tokenizer, out = self.tokenizer, []
        for start in range(0, len(prompts), chunk):
            tokens = tokenizer.tokenize(prompts[start:start + chunk])
            out.append(self.sessions["text"].run(None, {"tokens": tokens})[0])
        return np.concatenate(out).astype(np.float32)

    def encode_names(self, names: Sequence[str]) -> np.ndarray:
        """(C, D) class embeddings: the mean over the templates of the encoded prompts, L2-normalised
        (as `regionspot.modeling.text_embeddings.encode_class_names`)."""
        t = self.manifest["text"] or {}
        templates = t.get("templates") or ["{}"]
        prompts = [tp.format(clean_class_name(n, t.get("strip_suffixes", ()))) for n in names for tp in templates]
        emb = self.encode_prompts(prompts).reshape(len(names), len(templates), -1).mean(axis=1)
        if not np.isfinite(emb).all():
            bad = [names[i] for i in np.nonzero(~np.isfinite(emb).all(axis=1))[0]]
            raise RuntimeError(f"The text graph gave NaN or infinite embeddings for {bad}.")
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def vocabulary_embeddings(self, vocabulary: VocabularyLike = None) -> Tuple[List[str], np.ndarray]:
        """(class names, (C, D) float32 embeddings) of a vocabulary: None = the exported one; a list
        of class names (an entry may be [name, synonym, ...]: their embeddings are averaged); or a
        .npy file of (C, D) embeddings with a .json list of its names beside it."""
        if vocabulary is None:
            if self.default_vocabulary is None:
                raise ValueError(f"{self.folder} holds no exported vocabulary: give vocabulary= class names.")
            return self.default_vocabulary
        if isinstance(vocabulary, str):
            return self._embedding_file(vocabulary)
        entries = [[e] if isinstance(e, str) else [str(s) for s in e] for e in vocabulary]
        names = [e[0] if e else "" for e in entries]
        blank = [i for i, n in enumerate(names) if not n.strip()]
        if not names or blank:
            raise ValueError("The vocabulary is empty." if not names else
                             f"The vocabulary has empty class names at positions {blank}.")
        if len(set(names)) != len(names):
            raise ValueError(f"The vocabulary names these classes more than once: "
                             f"{sorted({n for n in names if names.count(n) > 1})}.")
        key = tuple(tuple(e) for e in entries)
        if key not in self._vocab_cache:
            flat = [s for e in entries for s in e]
            per = self.encode_names(flat)
            if all(len(e) == 1 for e in entries):
                emb = per
            else:
                owner = np.repeat(np.arange(len(entries)), [len(e) for e in entries])
                summed = np.zeros((len(entries), per.shape[1]), dtype=np.float64)
                np.add.at(summed, owner, per)
                emb = (summed / np.linalg.norm(summed, axis=1, keepdims=True)).astype(np.float32)
            self._vocab_cache[key] = emb
            while len(self._vocab_cache) > self.max_cached:
                self._vocab_cache.popitem(last=False)
        self._vocab_cache.move_to_end(key)
        return names, self._vocab_cache[key]

    def _embedding_file(self, path: str) -> Tuple[List[str], np.ndarray]:
        names_path = os.path.splitext(path)[0] + ".json"
        if not path.endswith(".npy") or not os.path.isfile(path) or not os.path.isfile(names_path):
            raise ValueError(f"A vocabulary string must be a .npy file of (C, D) embeddings with its names in "
                             f"{names_path}; got {path!r}.")
        emb = np.load(path, allow_pickle=False)
        with open(names_path) as f:
            names = json.load(f)
        d = self.manifest["clip"]["text_dim"]
        if emb.ndim != 2 or emb.shape != (len(names), d):
            raise ValueError(f"{path} holds embeddings of shape {emb.shape}; {names_path} names {len(names)} "
                             f"classes and this model's text width is {d}.")
        return list(names), emb.astype(np.float32)

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def _check_top_k(top_k) -> int:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
        return int(top_k)

    def _prepare_prompts(self, size, boxes, points, point_labels, prompt_scores) -> Dict:
        if boxes is None and points is None:
            if point_labels is not None:
                raise ValueError("point_labels were given without points.")
            raise ValueError("Give region prompts: boxes (N, 4), points (N, P, 2) with point_labels, or both.")
        n = None
        if boxes is not None:
            boxes = _float_array(boxes, "boxes")
            if boxes.ndim == 1 and boxes.shape[0] == 4:
                boxes = boxes[None]
            if boxes.size == 0:
                boxes = boxes.reshape(0, 4)
            if boxes.ndim != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"boxes must have shape (N, 4) in XYXY pixels, got {boxes.shape}.")
            boxes = boxes.astype(np.float32)
            n = boxes.shape[0]
        if points is not None:
            if point_labels is None:
                raise ValueError("points need point_labels of the same shape minus the last axis "
                                 "(1 = foreground, 0 = background, -1 = padding).")
            points = _float_array(points, "points").astype(np.float32)
            labels = _float_array(point_labels, "point_labels")
            if points.ndim == 2:
                points, labels = points[None], labels[None] if labels.ndim == 1 else labels
            if points.ndim != 3 or points.shape[-1] != 2:
                raise ValueError(f"points must have shape (N, P, 2) or (P, 2) in XY pixels, got {points.shape}.")
            if labels.shape != points.shape[:2]:
                raise ValueError(f"point_labels must have shape {points.shape[:2]} to match the points, "
                                 f"got {labels.shape}.")
            if not np.isfinite(points).all():
                bad = np.nonzero(~np.isfinite(points).all(axis=(1, 2)))[0].tolist()
                raise ValueError(f"points have NaN or infinite coordinates in regions {bad}.")
            if not np.isin(labels, [-1.0, 0.0, 1.0]).all():
                raise ValueError(f"point_labels must be 1 (foreground), 0 (background) or -1 (padding), "
                                 f"got values {sorted(set(labels.flatten().tolist()))}.")
            h, w = size
            outside = ((points[..., 0] < 0) | (points[..., 0] > w) | (points[..., 1] < 0) | (points[..., 1] > h))
            outside &= labels >= 0
            if outside.any():
                region, point = np.argwhere(outside)[0].tolist()
                raise ValueError(f"Point {point} of region {region}, {points[region, point].tolist()}, lies outside "
                                 f"the {w}x{h} (W x H) image.")
            if n is not None and points.shape[0] != n:
                raise ValueError(f"boxes and points must describe the same regions: {n} boxes but "
                                 f"{points.shape[0]} point sets.")
            n = points.shape[0]
            point_labels = labels.astype(np.int64)
        elif point_labels is not None:
            raise ValueError("point_labels were given without points.")
        if prompt_scores is not None:
            prompt_scores = _float_array(prompt_scores, "prompt_scores").astype(np.float32).flatten()
            if prompt_scores.shape[0] != n:
                raise ValueError(f"prompt_scores must have one score per region ({n}), got {prompt_scores.shape[0]}.")
            if not np.isfinite(prompt_scores).all() or (prompt_scores < 0).any():
                raise ValueError("prompt_scores must be finite and non-negative.")
        keep = np.arange(n)
        if boxes is not None:
            keep = sanitize_boxes(boxes, size)
            boxes = boxes[keep]
            if points is not None:
                points, point_labels = points[keep], point_labels[keep]
            if prompt_scores is not None:
                prompt_scores = prompt_scores[keep]
        return {"boxes": boxes, "points": points, "point_labels": point_labels, "scores": prompt_scores,
                "indices": keep.astype(np.int64)}

    def _sam_prompts(self, boxes: Optional[np.ndarray], points: Optional[np.ndarray],
                     labels: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Prompts in original pixels -> SAM's point form in its input frame: coordinates through the
        test-time resize (float64, as detectron2 moves them) and SAM's resize (float32, as SAM's
        transforms); a box is two corners labelled 2 and 3, after the region's points (SAM 2:
        before); SAM adds a padding point (label -1) when a region has no box (SAM 2 always, inside
        its graph)."""
        f, sam = self._features, self.manifest["sam"]
        (H, W), (h, w) = f["image_size"], f["encoded_size"]
        n = boxes.shape[0] if boxes is not None else points.shape[0]

        def to_input(xy: np.ndarray) -> np.ndarray:
            xy = xy.astype(np.float64)
            if self.manifest["test_resize"]["min_size"]:
                xy = xy * np.array([w / W, h / H])
            xy = xy.astype(np.float32)
            if sam["resize"] == "square":  # SAM 2: normalised by the image size, times the side
                return (xy / np.array([w, h], np.float32) * np.float32(sam["image_size"])).astype(np.float32)
            newh, neww = pp.longest_side_shape(h, w, sam["image_size"])
            return (xy * np.array([np.float32(neww / w), np.float32(newh / h)], np.float32)).astype(np.float32)

        parts_xy, parts_l = [], []
        if points is not None:
            parts_xy.append(to_input(points))
            parts_l.append(labels.astype(np.float32))
        if boxes is not None:
            parts_xy.append(to_input(boxes.reshape(n, 2, 2)))
            parts_l.append(np.tile(np.array([[2.0, 3.0]], np.float32), (n, 1)))
            if sam["family"] == "sam2":  # SAM 2 puts the box corners before the points
                parts_xy, parts_l = parts_xy[::-1], parts_l[::-1]
        if boxes is None and sam["family"] == "sam":  # SAM 2's graph appends its padding point itself
            parts_xy.append(np.zeros((n, 1, 2), np.float32))
            parts_l.append(-np.ones((n, 1), np.float32))
        return np.concatenate(parts_xy, axis=1), np.concatenate(parts_l, axis=1)

    # ------------------------------------------------------------------ prediction
    def decode(self, coords: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Region tokens (N, C) and low-res mask logits (N, 1, l, l) of prompts in SAM's point form,
        `decode_chunk` prompts per call of the decoder graph (its activations grow per prompt)."""
        feeds = dict(zip(["image_embeddings", "high_res_feats_0", "high_res_feats_1"], self._features["sam"]))
        out = [self.sessions["region_decoder"].run(None, {**feeds, "point_coords": coords[i:i + self.decode_chunk],
                                                          "point_labels": labels[i:i + self.decode_chunk]})
               for i in range(0, coords.shape[0], self.decode_chunk)]
        return np.concatenate([t for t, _ in out]), np.concatenate([m for _, m in out])

    def predict(self, boxes=None, points=None, point_labels=None, vocabulary: VocabularyLike = None,
                top_k: Optional[int] = None, prompt_scores=None, return_masks: Optional[bool] = None) -> RegionResults:
        """Classify regions of the image given to `set_image`, as `regionspot.RegionSpotPredictor.predict`.

        Args:
            boxes: (N, 4) XYXY boxes in image pixels (or one box of shape (4,)); clipped to the
                image, those with no area left dropped with a warning.
            points: (N, P, 2) XY points, P per region; (P, 2) means one region.
            point_labels: (N, P) (or (P,)): 1 foreground, 0 background, -1 padding.
            vocabulary: see `vocabulary_embeddings`.
            top_k: classes kept per region (default: the predictor's).
            prompt_scores: (N,) non-negative scores multiplied into the class probabilities.
            return_masks: paste SAM's masks at the image size (default: the exported MASK_ON);
                point-prompted regions always get them (their boxes come from them).
        """
        if self._features is None:
            raise RuntimeError("No image is set: call set_image(image) before predict().")
        f, m = self._features, self.manifest
        top_k = self._check_top_k(self.top_k if top_k is None else top_k)
        prompts = self._prepare_prompts(f["image_size"], boxes, points, point_labels, prompt_scores)
        names, text_emb = self.vocabulary_embeddings(vocabulary)
        n = len(prompts["indices"])
        low_res = np.zeros((0, 1, m["sam"]["low_res_size"], m["sam"]["low_res_size"]), np.float32)
        probs = np.zeros((0, len(names)), np.float32)
        if n:
            coords, labels = self._sam_prompts(prompts["boxes"], prompts["points"], prompts["point_labels"])
            tokens, low_res = self.decode(coords, labels)
            _, probs = self.sessions["region_head"].run(None, {
                "region_tokens": tokens, "clip_tokens": f["clip_tokens"],
                "text_embeddings": np.ascontiguousarray(text_emb, dtype=np.float32)})
            if prompts["scores"] is not None:
                probs = probs * prompts["scores"][:, None]
        topk_scores, topk_classes = top_classes(probs, top_k)
        masks = None
        if (m["mask_on"] if return_masks is None else return_masks) or prompts["boxes"] is None:
            wy, wx = pp.paste_weights(m["sam"], m["fast_mask_paste"], f["input_size"], f["image_size"])
            masks = pp.paste_masks(low_res, wy, wx, m["sam"]["mask_threshold"])
        out_boxes = prompts["boxes"]
        if out_boxes is None:
            out_boxes = boxes_of_points(masks, prompts["points"], prompts["point_labels"])
        return RegionResults(tuple(f["image_size"]), out_boxes, masks, topk_classes, topk_scores.astype(np.float32),
                             prompts["indices"], list(names), probs)
