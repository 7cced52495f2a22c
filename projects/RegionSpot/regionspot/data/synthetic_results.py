"""LVIS- and COCO-like ground truth with detections, made fast, to test and measure evaluation at
any size without the datasets: r/c/f category frequencies, `neg_category_ids` and
`not_exhaustive_category_ids`, polygon ground truth (and RLE crowd regions for COCO), and
detections whose masks are compressed RLE of realistic size (an ellipse in each box).

Each image is drawn from its own seed, so the first N images of a larger set are the set of N.
"""
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pycocotools.mask as mask_util

# LVIS v1's category counts by frequency group (rare, common, frequent) and its classes' odds of
# appearing in an image, roughly.
LVIS_FREQUENCIES = (("r", 337, 1.0), ("c", 461, 6.0), ("f", 405, 40.0))


def categories(num: int, lvis_style: bool) -> List[dict]:
    """`num` categories; for LVIS split r/c/f in LVIS v1's proportions."""
    if not lvis_style:
        return [{"id": i + 1, "name": f"class_{i + 1}"} for i in range(num)]
    total = sum(n for _, n, _ in LVIS_FREQUENCIES)
    bounds = np.cumsum([n for _, n, _ in LVIS_FREQUENCIES]) * num / total
    cats = []
    for i in range(num):
        group = int(np.searchsorted(bounds, i, side="right"))
        group = min(group, 2)
        cats.append({"id": i + 1, "name": f"class_{i + 1}", "synonyms": [f"class_{i + 1}"],
                     "frequency": LVIS_FREQUENCIES[group][0]})
    return cats


def _category_odds(cats: List[dict], lvis_style: bool) -> np.ndarray:
    if not lvis_style:
        w = np.ones(len(cats))
    else:
        odds = {f: o for f, _, o in LVIS_FREQUENCIES}
        w = np.array([odds[c["frequency"]] for c in cats])
    return w / w.sum()


def _random_boxes(rng, n: int, h: int, w: int, lo: float = 6.0, hi: float = 320.0) -> np.ndarray:
    """n XYWH boxes inside the image, sides log-uniform in [lo, hi]."""
    side = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    aspect = np.exp(rng.uniform(-0.7, 0.7, n))
    bw, bh = np.minimum(side * aspect, w - 1), np.minimum(side / aspect, h - 1)
    x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    return np.stack([x, y, bw, bh], 1)


def _polygon(rng, box, vertices: int) -> Tuple[List[float], float]:
    """An irregular polygon inscribed in an XYWH box, and its area."""
    x, y, bw, bh = box
    t = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    r = rng.uniform(0.7, 1.0, vertices)
    px = x + bw / 2 * (1 + r * np.cos(t))
    py = y + bh / 2 * (1 + r * np.sin(t))
    area = 0.5 * abs(np.dot(px, np.roll(py, 1)) - np.dot(py, np.roll(px, 1)))
    return np.round(np.stack([px, py], 1).ravel(), 2).tolist(), float(area)


def ellipse_rle(box, h: int, w: int) -> dict:
    """Compressed COCO RLE of the ellipse inscribed in an XYWH box: its column-major runs computed
    directly (no dense mask), pycocotools makes the string."""
    x, y, bw, bh = box
    c0, c1 = max(int(np.ceil(x)), 0), min(int(np.floor(x + bw)), w)
    cols = np.arange(c0, c1)
    counts = [h * w]
    if len(cols):
        xc, yc = x + bw / 2, y + bh / 2
        dy = bh / 2 * np.sqrt(np.clip(1 - ((cols + 0.5 - xc) / (bw / 2)) ** 2, 0, 1))
        top = np.clip(np.ceil(yc - dy - 0.5), 0, h).astype(np.int64)
        bottom = np.clip(np.floor(yc + dy - 0.5) + 1, 0, h).astype(np.int64)
        keep = bottom > top
        starts, ends = cols[keep] * h + top[keep], cols[keep] * h + bottom[keep]
        if len(starts):
            join = np.flatnonzero(starts[1:] == ends[:-1])  # a run that goes on in the next column
            starts, ends = np.delete(starts, join + 1), np.delete(ends, join)
            edges = np.empty(2 * len(starts), dtype=np.int64)
            edges[0::2], edges[1::2] = starts, ends
            counts = np.diff(np.concatenate([[0], edges, [h * w]])).tolist()
    rle = mask_util.frPyObjects({"counts": counts, "size": [h, w]}, h, w)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def image_set(image_id: int, cats: List[dict], *, lvis_style: bool, dets_per_image: int, boxes_per_image: int,
              verified_fraction: float, size: Tuple[int, int], seed: int, masks: bool = True,
              detections: bool = True):
    """One image's entry, ground-truth annotations (ids to be set) and detection records (drawn
    after the ground truth, so `detections=False` gives the same image and annotations)."""
    rng = np.random.default_rng([seed, image_id])
    h, w = size
    k = len(cats)
    odds = _category_odds(cats, lvis_style)
    n_pos = min(1 + rng.poisson(2.7), k)
    pos = rng.choice(k, n_pos, replace=False, p=odds) + 1
    anns = []
    for c in pos:
        n = 1 + rng.poisson(2.3)
        for box in _random_boxes(rng, n, h, w):
            if not lvis_style and rng.random() < 0.05:  # a COCO crowd region, given as RLE
                rle = ellipse_rle(box, h, w)
                anns.append({"image_id": image_id, "category_id": int(c), "bbox": np.round(box, 2).tolist(),
                             "segmentation": rle, "area": float(mask_util.area(rle)), "iscrowd": 1})
                continue
            poly, area = _polygon(rng, box, int(rng.integers(8, 24)))
            ann = {"image_id": image_id, "category_id": int(c), "bbox": np.round(box, 2).tolist(),
                   "segmentation": [poly], "area": area}
            if not lvis_style:
                ann["iscrowd"] = 0
            anns.append(ann)
    image = {"id": image_id, "height": h, "width": w, "file_name": f"{image_id:012d}.jpg"}
    rest = np.setdiff1d(np.arange(1, k + 1), pos)
    if lvis_style:
        neg = rng.choice(rest, min(rng.poisson(6), len(rest)), replace=False)
        image["neg_category_ids"] = sorted(int(c) for c in neg)
        image["not_exhaustive_category_ids"] = sorted(int(c) for c in pos if rng.random() < 0.15)
        verified = np.concatenate([pos, neg]).astype(np.int64)
    else:
        verified = pos.astype(np.int64)
    if not detections:
        return image, anns, []

    # Detections: boxes near the ground truth and elsewhere, several classes per box (sharing its mask).
    gt_boxes = np.array([a["bbox"] for a in anns])
    gt_cats = np.array([a["category_id"] for a in anns])
    near = rng.random(boxes_per_image) < 0.4
    pick = rng.integers(0, len(anns), boxes_per_image)
    jitter = np.exp(rng.normal(0, 0.15, (boxes_per_image, 4))) * [1, 1, 1, 1]
    boxes = _random_boxes(rng, boxes_per_image, h, w)
    shifted = gt_boxes[pick].copy()
    shifted[:, :2] += rng.normal(0, 0.1, (boxes_per_image, 2)) * shifted[:, 2:]
    shifted[:, 2:] *= jitter[:, 2:]
    boxes[near] = shifted[near]
    boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
    per_box = np.full(boxes_per_image, dets_per_image // boxes_per_image)
    per_box[: dets_per_image - per_box.sum()] += 1
    box_of = np.repeat(np.arange(boxes_per_image), per_box)
    n = len(box_of)
    from_verified = rng.random(n) < verified_fraction
    classes = np.where(from_verified, rng.choice(verified, n), rng.integers(1, k + 1, n))
    first = np.concatenate([[True], box_of[1:] != box_of[:-1]])
    own = first & near[box_of]
    classes[own] = gt_cats[pick[box_of[own]]]
    scores = rng.random(n)
    rles = [ellipse_rle(b, h, w) for b in boxes] if masks else None
    box_list = np.round(boxes, 2).tolist()
    records = []
    for i in range(n):
        b = box_of[i]
        rec = {"image_id": image_id, "category_id": int(classes[i]), "bbox": box_list[b], "score": float(scores[i])}
        if masks:
            rec["segmentation"] = rles[b]
        records.append(rec)
    return image, anns, records


def make_set(num_images: int, *, num_categories: int = 1203, lvis_style: bool = True, dets_per_image: int = 300,
             boxes_per_image: int = 100, verified_fraction: float = 0.5, size: Tuple[int, int] = (480, 640),
             seed: int = 0, masks: bool = True) -> Tuple[Dict, Iterator[List[dict]]]:
    """(ground-truth dataset dict, iterator over each image's detection records).

    `verified_fraction` of the detections name a class the image is verified for (LVIS: in its
    ground truth or `neg_category_ids`; COCO: in its ground truth), the others any class; 40% of
    the boxes lie near a ground-truth box and carry its class first.
    """
    cats = categories(num_categories, lvis_style)
    kw = dict(lvis_style=lvis_style, dets_per_image=dets_per_image, boxes_per_image=boxes_per_image,
              verified_fraction=verified_fraction, size=size, seed=seed, masks=masks)
    images, anns = [], []
    for image_id in range(1, num_images + 1):
        image, a, _ = image_set(image_id, cats, **kw, detections=False)
        images.append(image)
        anns.extend(a)
    for i, a in enumerate(anns):
        a["id"] = i + 1
    gt = {"info": {"description": "synthetic"}, "images": images, "annotations": anns, "categories": cats}

    def detections():
        for image_id in range(1, num_images + 1):
            yield image_set(image_id, cats, **kw)[2]

    return gt, detections()
