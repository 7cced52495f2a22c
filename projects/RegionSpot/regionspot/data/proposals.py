"""External box proposals for RegionSpot's "proposals" prompt source.

Three file formats are read, chosen by content:
- detectron2 proposal pickles (``ids``, ``boxes``, ``objectness_logits``, optional ``bbox_mode``);
- COCO-style results JSON: a list of ``{"image_id", "bbox": [x, y, w, h], "score"}``;
- per-image JSON as in the released GLIP-T boxes: ``{image_id: {"boxes", "scores", "labels"}}``
  or a list of ``{"image_id", "boxes", "scores", "labels"}``; boxes XYXY unless told otherwise.
Proposals land in the dataset dicts under detectron2's keys, so `DatasetMapper` handles them.
"""
import json
import logging
from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from ..utils.safe_load import UnsafeFileError, pickle_load
from ..utils.weights import download, is_url

logger = logging.getLogger(__name__)
_EPS = 1e-6


def _to_logits(scores: np.ndarray) -> np.ndarray:
    # detectron2 carries proposal scores as objectness logits; the model applies a sigmoid.
    p = np.clip(scores.astype(np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def check_finite_proposals(path: str, image, boxes: np.ndarray, scores: np.ndarray,
                           scores_name: str = "scores") -> None:
    """Raise ValueError naming the proposals file, the image and the rows whose boxes or scores
    are NaN or infinite (they would stop evaluation deep inside detectron2, or score as NaN)."""
    boxes, scores = np.asarray(boxes, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    for what, values in (("boxes", boxes.reshape(len(boxes), -1)), (scores_name, scores.reshape(len(scores), -1))):
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if bad.size:
            raise ValueError(f"Proposal file {path}: image {image} has NaN or infinite {what} at rows "
                             f"{bad[:10].tolist()}{' ...' if bad.size > 10 else ''}.")


def read_json_proposals(path: str, box_mode: str = "XYXY") -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """image id (as str) -> (boxes (N, 4) XYXY_ABS float32, scores (N,) float32), all finite
    (else ValueError naming the file and the image)."""
    with PathManager.open(path, "r") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"Proposal file {path} is not valid JSON: {e}") from e
    per_image: Dict[str, Tuple[list, list]] = defaultdict(lambda: ([], []))
    modes = {"XYXY": BoxMode.XYXY_ABS, "XYWH": BoxMode.XYWH_ABS}
    if box_mode not in modes:
        raise ValueError(f"MODEL.REGIONSPOT.PROPOSAL_BOX_MODE must be XYXY or XYWH, not {box_mode!r}.")
    mode = modes[box_mode]
    if isinstance(data, dict):
        data = [dict(v, image_id=k) for k, v in data.items()]
    if not isinstance(data, list):
        raise ValueError(f"Proposal file {path}: expected a list or a dict at the top level.")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "image_id" not in rec:
            raise ValueError(f"Proposal file {path}: entry {i} has no 'image_id'.")
        boxes, scores = per_image[str(rec["image_id"])]
        if "bbox" in rec:  # COCO results: one box per entry, XYWH
            boxes.append(BoxMode.convert(list(rec["bbox"]), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
            scores.append(rec.get("score", 1.0))
        elif "boxes" in rec:
            b = np.asarray(rec["boxes"], dtype=np.float64)
            if b.size and (b.ndim != 2 or b.shape[1] != 4):
                raise ValueError(f"Proposal file {path}: entry {i} (image {rec['image_id']}) has boxes of "
                                 f"shape {b.shape}, not (N, 4).")
            b = BoxMode.convert(b.reshape(-1, 4), mode, BoxMode.XYXY_ABS)
            s = rec.get("scores", [1.0] * len(b))
            if len(s) != len(b):
                raise ValueError(f"Proposal file {path}: entry {i} (image {rec['image_id']}) has "
                                 f"{len(b)} boxes but {len(s)} scores.")
            boxes.extend(b.tolist())
            scores.extend(s)
        else:
            raise ValueError(f"Proposal file {path}: entry {i} has neither 'bbox' nor 'boxes'.")
    table = {}
    for k, (b, s) in per_image.items():
        try:
            b, s = np.asarray(b, dtype=np.float32).reshape(-1, 4), np.asarray(s, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as e:
            raise ValueError(f"Proposal file {path}: image {k} has boxes or scores that are not numbers ({e}).") from e
        check_finite_proposals(path, k, b, s)
        table[k] = (b, s)
    return table


# detectron2 writes `bbox_mode` as its BoxMode enum: calling it only looks a value up.
_PROPOSAL_GLOBALS = {("detectron2.structures.boxes", "BoxMode"): BoxMode}


def read_pickle_proposals(path: str) -> Dict:
    """A detectron2 proposal pickle, read without running code (numpy arrays and plain data only,
    see `regionspot.utils.safe_load`), with Detectron1's key names ("indexes", "scores") renamed."""
    with PathManager.open(path, "rb") as f:
        try:
            data = pickle_load(f, path, "DATASETS.PROPOSAL_FILES_TEST", extra=_PROPOSAL_GLOBALS)
        except UnsafeFileError:
            raise
        except Exception as e:
            raise ValueError(f"Proposal file {path} is corrupt, truncated or not a pickle "
                             f"({type(e).__name__}: {e}).") from e
    if not isinstance(data, dict):
        raise ValueError(f"Proposal file {path}: expected a dict with 'ids', 'boxes' and 'objectness_logits', "
                         f"not a {type(data).__name__}.")
    for old, new in (("indexes", "ids"), ("scores", "objectness_logits")):
        if old in data:
            data[new] = data.pop(old)
    lacking = [k for k in ("ids", "boxes", "objectness_logits") if k not in data]
    if lacking:
        raise ValueError(f"Proposal file {path} has no {lacking} (keys: {sorted(map(str, data))}).")
    return data


def _fill_pickle_proposals(dataset_dicts: List[Dict], data: Dict) -> None:
    """detectron2's `load_proposals_into_dataset` on already-read data (it would unpickle the
    file itself, with plain pickle): best objectness first, under detectron2's keys."""
    index = {str(i): n for n, i in enumerate(data["ids"])}
    mode = BoxMode(data["bbox_mode"]) if "bbox_mode" in data else BoxMode.XYXY_ABS
    for d in dataset_dicts:
        n = index[str(d["image_id"])]
        boxes, logits = np.asarray(data["boxes"][n]), np.asarray(data["objectness_logits"][n])
        order = logits.argsort()[::-1]
        d["proposal_boxes"], d["proposal_objectness_logits"] = boxes[order], logits[order]
        d["proposal_bbox_mode"] = mode


def attach_proposals(dataset_dicts: List[Dict], path: str, missing: str = "error",
                     box_mode: str = "XYXY") -> List[Dict]:
    """Add proposals from `path` to each dataset dict (in place; also returned).

    Args:
        missing: what to do with an image the file has no entry for: "error" (raise, naming
            the image and the file) or "empty" (the image gets no proposals, hence no detections).
    """
    if missing not in ("error", "empty"):
        raise ValueError(f"MODEL.REGIONSPOT.MISSING_PROPOSALS must be 'error' or 'empty', not {missing!r}.")
    if is_url(path):  # fetched once, with a timeout (detectron2's loader then reads the local copy)
        path = download(path, "DATASETS.PROPOSAL_FILES_TEST", "proposals file")
    if path.endswith(".pkl"):
        data = read_pickle_proposals(path)
        ids = {str(i) for i in data["ids"]}
        have = [d for d in dataset_dicts if str(d["image_id"]) in ids]
        lacking = [d for d in dataset_dicts if str(d["image_id"]) not in ids]
        if lacking and missing == "error":
            _raise_missing(lacking, path)
        _fill_pickle_proposals(have, data)
        del data
        for d in have:
            # NaN logits are refused; +-inf logits are scores of exactly 1 or 0, which sigmoid keeps.
            check_finite_proposals(path, f"{d['image_id']} ({d.get('file_name', '?')})", d["proposal_boxes"],
                                   np.nan_to_num(d["proposal_objectness_logits"], nan=np.nan, posinf=0, neginf=0),
                                   "objectness logits")
    else:
        table = read_json_proposals(path, box_mode)
        lacking = [d for d in dataset_dicts if str(d["image_id"]) not in table]
        if lacking and missing == "error":
            _raise_missing(lacking, path)
        for d in dataset_dicts:
            if str(d["image_id"]) not in table:
                continue
            boxes, scores = table[str(d["image_id"])]
            order = np.argsort(-scores, kind="stable")
            d["proposal_boxes"] = boxes[order]
            d["proposal_objectness_logits"] = _to_logits(scores[order])
            d["proposal_bbox_mode"] = BoxMode.XYXY_ABS
    for d in lacking:
        d["proposal_boxes"] = np.zeros((0, 4), dtype=np.float32)
        d["proposal_objectness_logits"] = np.zeros((0,), dtype=np.float64)
        d["proposal_bbox_mode"] = BoxMode.XYXY_ABS
    if lacking:
        logger.warning(f"{len(lacking)} images have no entry in {path}; they get no detections.")
    return dataset_dicts


def _raise_missing(lacking: List[Dict], path: str) -> None:
    names = [f"{d['image_id']} ({d.get('file_name', '?')})" for d in lacking[:5]]
    raise KeyError(
        f"Proposal file {path} has no entry for {len(lacking)} images, e.g. {names}. Set "
        "MODEL.REGIONSPOT.MISSING_PROPOSALS=empty to give such images no detections instead."
    )
