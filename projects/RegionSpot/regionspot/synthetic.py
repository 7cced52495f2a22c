"""A synthetic LVIS-format detection dataset: coloured shapes on noise, with exact masks.

It needs no download, is deterministic by seed, and is written once then reused. Tests and the
offline quickstart use it; it is exhaustively annotated, so every absent class is a verified
negative of its image, which keeps LVIS AP honest on it.
"""
import json
import math
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import load_lvis_json
from PIL import Image, ImageDraw

from .file_io import atomic_write_bytes

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (40, 60, 220),
           "yellow": (230, 210, 30), "magenta": (200, 40, 200), "cyan": (30, 200, 210)}
SHAPES = ("circle", "square", "triangle")
DEFAULT_CLASSES = ("red_circle", "green_square", "blue_triangle",
                   "yellow_circle", "magenta_square", "cyan_triangle")
# Every colour with every shape: what the quickstart's tiny encoders are pretrained on
# (tools/pretrain_tiny_encoders.py), so colour and shape are learned apart from the six classes.
ALL_CLASSES = tuple(f"{c}_{s}" for c in COLOURS for s in SHAPES)
_FREQUENCIES = ("f", "c", "r")  # spread over classes so APr, APc and APf are all defined


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> List[float]:
    n = {"circle": 24, "square": 4, "triangle": 3}[shape]
    start = angle + (math.pi / 4 if shape == "square" else -math.pi / 2)
    pts = []
    for k in range(n):
        a = start + 2 * math.pi * k / n
        pts += [cx + r * math.cos(a), cy + r * math.sin(a)]
    return pts


def render_scene(rng: np.random.RandomState, size: Tuple[int, int], classes: Sequence[str], max_objects: int):
    """One image (PIL, `size` = (H, W)) of 1..max_objects non-overlapping shapes on noise.

    `classes` are "<colour>_<shape>" names; returns (image, [(class index, polygon xy list)]).
    """
    h, w = size
    base = rng.randint(90, 170)
    img = np.clip(base + rng.randn(h, w, 3) * 12, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(img)
    draw = ImageDraw.Draw(canvas)
    objects, placed = [], []
    for _ in range(rng.randint(1, max_objects + 1)):
        for _attempt in range(20):
            r = rng.uniform(0.08, 0.22) * min(h, w)
            cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
            if all(math.hypot(cx - px, cy - py) > r + pr + 2 for px, py, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        cat = rng.randint(len(classes))
        colour, shape = classes[cat].split("_")
        poly = _polygon(shape, cx, cy, r, rng.uniform(0, 0.3))
        draw.polygon(poly, fill=COLOURS[colour])
        objects.append((cat, poly))
    return canvas, objects


def make_synthetic_lvis(
    root: str, split: str = "val", num_images: int = 8, seed: int = 0,
    image_size: Tuple[int, int] = (192, 256), classes: Sequence[str] = DEFAULT_CLASSES,
    max_objects: int = 4,
) -> str:
    """Write images under `root/split/` and `root/lvis_synthetic_{split}.json`; return the json path.

    If the json already exists with the same parameters, nothing is rewritten.
    """
    json_path = os.path.join(root, f"lvis_synthetic_{split}.json")
    params = {"num_images": num_images, "seed": seed, "image_size": list(image_size),
              "classes": list(classes), "max_objects": max_objects, "version": 1}
    if os.path.exists(json_path):
        try:
            with open(json_path) as f:
                if json.load(f).get("info", {}).get("params") == params:
                    return json_path
        except (OSError, ValueError):
            pass  # unreadable: make it again
    os.makedirs(os.path.join(root, split), exist_ok=True)
    rng = np.random.RandomState(seed)
    images, annotations = [], []
    for i in range(num_images):
        canvas, objects = render_scene(rng, image_size, classes, max_objects)
        fname = f"{split}_{i:05d}.png"
        # Atomic, because every process of a distributed run may generate the same files at once.
        tmp = os.path.join(root, split, f".{fname}.{os.getpid()}.tmp")
        canvas.save(tmp, format="PNG")
        os.replace(tmp, os.path.join(root, split, fname))
        image_id = i + 1
        present = {cat + 1 for cat, _ in objects}
        images.append({
            "id": image_id, "width": image_size[1], "height": image_size[0],
            "coco_url": f"synthetic://{split}/{fname}",
            "neg_category_ids": sorted(set(range(1, len(classes) + 1)) - present),
            "not_exhaustive_category_ids": [],
        })
        for cat, poly in objects:
            xs, ys = poly[0::2], poly[1::2]
            x0, y0 = min(xs), min(ys)
            bbox = [x0, y0, max(xs) - x0, max(ys) - y0]
            area = 0.5 * abs(sum(xs[k] * ys[k - 1] - xs[k - 1] * ys[k] for k in range(len(xs))))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cat + 1, "bbox": bbox, "area": area,
                                "segmentation": [poly]})
    categories = [{"id": k + 1, "name": n, "synonyms": [n.replace("_", " ")],
                   "frequency": _FREQUENCIES[k % 3]} for k, n in enumerate(classes)]
    data = {"info": {"params": params}, "images": images, "annotations": annotations,
            "categories": categories, "licenses": []}
    atomic_write_bytes(json.dumps(data).encode("utf-8"), json_path)
    return json_path


def register_synthetic_lvis(
    name: str, json_path: str, image_root: str, classes: Sequence[str] = DEFAULT_CLASSES,
    make: Optional[Callable[[], object]] = None,
) -> None:
    """Register an LVIS-format set under `name` with its own class list (not LVIS's 1203).

    `make`, if given, is called before each load (e.g. to generate the files on first use).
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    # load_lvis_json concatenates image_root and the split folder of coco_url.
    root = os.path.join(image_root, "")

    def load():
        if make is not None:
            make()
        return load_lvis_json(json_path, root, None)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=json_path, image_root=root, evaluator_type="lvis", thing_classes=list(classes),
    )
