"""Box prompts for images named by file: the demo's `--boxes` files, image ids from a COCO/LVIS
json, and the lookup of an image's entry by id, path, file name or stem. Errors are ValueErrors
naming the file and the line or image at fault."""
import json
import os
from typing import Dict, Optional, Tuple

import numpy as np
from detectron2.structures import BoxMode

ALL_IMAGES = "*"  # key of boxes that apply to every image


def _boxes_array(value, where: str, box_mode: str) -> np.ndarray:
    try:
        boxes = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: boxes must be lists of 4 numbers ({e}).") from e
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must have shape (N, 4), got {boxes.shape}.")
    bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1))
    if bad.size:
        raise ValueError(f"{where}: boxes at rows {bad[:10].tolist()} have NaN or infinite coordinates.")
    if box_mode == "XYWH":
        boxes = BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
    return boxes.astype(np.float32)


def read_box_file(path: str, box_mode: str = "XYXY") -> Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]:
    """image key (or ALL_IMAGES) -> (boxes (N, 4) XYXY, scores (N,) or None) from a boxes file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"Cannot read the boxes file {path}: {e}") from e
    table: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]] = {}
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"Boxes file {path} is not valid JSON: {e}") from e
        if isinstance(data, list):
            return {ALL_IMAGES: (_boxes_array(data, f"Boxes file {path}", box_mode), None)}
        if not isinstance(data, dict):
            raise ValueError(f"Boxes file {path} must hold a dict of image -> boxes, or a list of boxes.")
        for key, value in data.items():
            where = f"Boxes file {path}, image {key!r}"
            scores = None
            if isinstance(value, dict):
                if "boxes" not in value:
                    raise ValueError(f"{where}: an entry that is a dict needs 'boxes'.")
                scores = value.get("scores")
                value = value["boxes"]
            boxes = _boxes_array(value, where, box_mode)
            if scores is not None:
                scores = np.asarray(scores, dtype=np.float32).reshape(-1)
                if scores.shape[0] != boxes.shape[0]:
                    raise ValueError(f"{where}: {scores.shape[0]} scores for {boxes.shape[0]} boxes.")
                if not np.isfinite(scores).all():
                    raise ValueError(f"{where}: scores at rows {np.flatnonzero(~np.isfinite(scores))[:10].tolist()} "
                                     "are NaN or infinite.")
            table[str(key)] = (boxes, scores)
        return table
    rows: Dict[str, list] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").split()
        if not line:
            continue
        if len(line) < 4:
            raise ValueError(f"Boxes file {path}, line {lineno}: expected '[image] x0 y0 x1 y1'.")
        key = " ".join(line[:-4]) or ALL_IMAGES
        try:
            rows.setdefault(key, []).append([float(v) for v in line[-4:]])
        except ValueError:
            raise ValueError(f"Boxes file {path}, line {lineno}: {line[-4:]} are not 4 numbers.") from None
    if ALL_IMAGES in rows and len(rows) > 1:
        raise ValueError(f"Boxes file {path} mixes lines with and without an image name.")
    return {k: (_boxes_array(v, f"Boxes file {path}", box_mode), None) for k, v in rows.items()}


def read_image_ids(path: Optional[str]) -> Dict[str, object]:
    """file name -> image id from a COCO/LVIS-format json's 'images'."""
    if not path:
        return {}
    try:
        with open(path) as f:
            images = json.load(f)["images"]
        return {os.path.basename(im.get("file_name") or im["coco_url"]): im["id"] for im in images}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"Image-id file {path} is not a readable COCO/LVIS json with 'images': {e}") from e


def image_id_of(path: str, ids: Dict[str, object]):
    """The id of an image in the JSON output: from --image-ids, a numeric file name, or the file name."""
    name = os.path.basename(path)
    if name in ids:
        return ids[name]
    stem = os.path.splitext(name)[0]
    return int(stem) if stem.isdigit() else name


def lookup_prompts(table: Dict, path: str, image_id) -> Optional[tuple]:
    """An image's entry in a boxes/proposals table, by image id, path, file name or stem."""
    name = os.path.basename(path)
    stem = os.path.splitext(name)[0]
    keys = [str(image_id), path, os.path.abspath(path), name, stem]
    if stem.isdigit():
        keys.append(str(int(stem)))
    for key in keys:
        if key in table:
            return table[key]
    return table.get(ALL_IMAGES)
