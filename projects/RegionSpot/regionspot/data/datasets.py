"""Dataset registration. Roots come from $DETECTRON2_DATASETS (default ./datasets).

- The paper's training data, in COCO format: Objects365 v1 and v2, V3Det, OpenImages v6.
- LVIS v1 minival (train/val are detectron2's own built-ins).
- The synthetic shapes sets of the offline quickstart, generated on first use.
- Your own COCO- or LVIS-format sets, named in a config (MODEL.REGIONSPOT.REGISTER_DATASETS).
Every loader checks its files first, so a missing file is reported with its path and dataset.
"""
import json
import os
from functools import partial
from typing import Dict, List, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_lvis_instances
from detectron2.data.datasets.lvis import get_lvis_instances_meta, load_lvis_json
from detectron2.utils.file_io import PathManager

from .synthetic import make_synthetic_lvis, register_synthetic_lvis

# name -> (json file, image root), relative to the datasets root.
COCO_FORMAT_DATASETS: Dict[str, Tuple[str, str]] = {
    "objects365_v1_train": ("objects365/annotations/objects365_train.json", "objects365/train"),
    "objects365_v1_val": ("objects365/annotations/objects365_val.json", "objects365/val"),
    "objects365_v2_train": ("objects365v2/annotations/zhiyuan_objv2_train.json", "objects365v2/images/train"),
    "objects365_v2_val": ("objects365v2/annotations/zhiyuan_objv2_val.json", "objects365v2/images/val"),
    "v3det_train": ("v3det/annotations/v3det_2023_v1_train.json", "v3det"),
    "v3det_val": ("v3det/annotations/v3det_2023_v1_val.json", "v3det"),
    "openimages_v6_train": ("openimages/annotations/openimages_v6_train_bbox.json", "openimages/train"),
    "openimages_v6_val": ("openimages/annotations/openimages_v6_val_bbox.json", "openimages/validation"),
}
LVIS_EXTRA_DATASETS: Dict[str, Tuple[str, str]] = {
    "lvis_v1_minival": ("lvis/lvis_v1_minival.json", "coco/"),
}
# The LVIS sets whose loaders get the same file check.
_CHECKED_BUILTINS = ("lvis_v1_train", "lvis_v1_val")

# name -> (split, number of images, seed). Generated on first use, then reused.
SYNTHETIC_SPLITS = {
    "synthetic_shapes_train": ("train", 480, 0),
    "synthetic_shapes_val": ("val", 48, 1),
}


def _check_files(name: str, load, hint: str = "", validate=None):
    """Wrap a dataset loader so a missing annotation file or image folder names itself and the set
    (and `validate()`, if given, runs before the loader)."""

    def checked():
        meta = MetadataCatalog.get(name)
        for what in ("json_file", "image_root"):
            path = meta.get(what, None)
            if path and not os.path.exists(path):
                where = hint or (f"Put the data under $DETECTRON2_DATASETS (now "
                                 f"{os.getenv('DETECTRON2_DATASETS', 'unset, so ./datasets')}).")
                raise FileNotFoundError(f"Dataset {name!r}: {what} {path} does not exist. {where}")
        if validate is not None:
            validate()
        return load()

    return checked


def _wrap_with_check(name: str, hint: str = "", validate=None) -> None:
    load = DatasetCatalog[name]
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, _check_files(name, load, hint, validate))


def read_own_json(name: str, json_file: str, check_categories: bool = True) -> Dict:
    """A user's COCO/LVIS-format annotation file, checked for what detectron2's loaders would
    report without the file's name (malformed JSON, an unknown category_id) or not at all (two
    images with one id: pycocotools merges them, one image then gets both images' boxes)."""
    with PathManager.open(json_file) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"Dataset {name!r}: {json_file} is not valid JSON ({e.msg} at line {e.lineno}, "
                             f"column {e.colno}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"Dataset {name!r}: {json_file} is not a COCO/LVIS-format file: it needs an 'images' list "
                         "(and 'annotations' and 'categories').")
    seen: Dict = {}
    for img in data["images"]:
        i = img.get("id") if isinstance(img, dict) else None
        if i in seen:
            raise ValueError(
                f"Dataset {name!r}: {json_file} has two images with id {i!r} ({seen[i]!r} and "
                f"{img.get('file_name', img.get('coco_url', '?'))!r}). Image ids must be unique: give each image its "
                "own id (and its annotations that image_id).")
        seen[i] = img.get("file_name", img.get("coco_url", "?")) if isinstance(img, dict) else "?"
    if check_categories:
        check_category_ids(name, json_file, data)
    return data


def check_category_ids(name: str, json_file: str, data: Dict) -> None:
    """Raise ValueError naming the file and the annotation whose category_id is not a category."""
    categories = {c.get("id") for c in data.get("categories", []) if isinstance(c, dict)}
    for a in data.get("annotations", []):
        if a.get("category_id") not in categories:
            raise ValueError(
                f"Dataset {name!r}: {json_file}: annotation {a.get('id', '?')!r} (image {a.get('image_id')!r}) has "
                f"category_id {a.get('category_id')!r}, which is not among the file's categories (ids "
                f"{sorted(categories)[:10]}{' ...' if len(categories) > 10 else ''}).")


def register_all_paper_datasets(root: str) -> None:
    for name, (json_file, image_root) in COCO_FORMAT_DATASETS.items():
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, os.path.join(root, json_file), os.path.join(root, image_root))
            _wrap_with_check(name)
    for name, (json_file, image_root) in LVIS_EXTRA_DATASETS.items():
        if name not in DatasetCatalog.list():
            register_lvis_instances(name, get_lvis_instances_meta("lvis_v1"),
                                    os.path.join(root, json_file), os.path.join(root, image_root))
            _wrap_with_check(name)
    for name in _CHECKED_BUILTINS:
        if name in DatasetCatalog.list():
            _wrap_with_check(name)


def register_all_synthetic(root: str) -> None:
    """Register the synthetic shapes sets under `root/synthetic_shapes` (made when first loaded)."""
    folder = os.path.join(root, "synthetic_shapes")
    for name, (split, num, seed) in SYNTHETIC_SPLITS.items():
        json_path = os.path.join(folder, f"lvis_synthetic_{split}.json")
        register_synthetic_lvis(name, json_path, folder,
                                make=partial(make_synthetic_lvis, folder, split, num, seed))


def _load_own_lvis(name: str, json_file: str, image_root: str) -> List[dict]:
    """detectron2's LVIS loader for a set with its own categories (it only knows LVIS's own
    names), which also fills in the set's thing_classes, as the COCO loader does."""
    data = read_own_json(name, json_file, check_categories=False)
    categories = data.get("categories", [])
    ids = sorted(c["id"] for c in categories)
    if ids != list(range(1, len(ids) + 1)):
        # detectron2's LVIS loader maps category id k to class k - 1, as LVIS's own files need.
        raise ValueError(
            f"Dataset {name!r}: the LVIS-format {json_file} must number its categories 1..C "
            f"(found ids {ids[:5]}{' ...' if len(ids) > 5 else ''}); register it as COCO format instead."
        )
    check_category_ids(name, json_file, data)
    MetadataCatalog.get(name).set(thing_classes=[c["name"] for c in sorted(categories, key=lambda c: c["id"])])
    return load_lvis_json(json_file, image_root, None)


def register_own_dataset(name: str, json_file: str, image_root: str, fmt: str = "coco") -> None:
    """Register a COCO- or LVIS-format set under `name` with detectron2's loaders; registering the
    same files again is a no-op, another dataset under a taken name an error."""
    if fmt not in ("coco", "lvis"):
        raise ValueError(f"Dataset {name!r}: format must be 'coco' or 'lvis', not {fmt!r}.")
    if fmt == "lvis":
        image_root = os.path.join(image_root, "")  # load_lvis_json appends coco_url's folder to it
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("json_file", None) == json_file and meta.get("image_root", None) == image_root:
            return
        raise ValueError(
            f"Dataset {name!r} is already registered (json_file {meta.get('json_file', None)}), so it "
            f"cannot be registered again with {json_file}: choose another name."
        )
    validate = None
    if fmt == "coco":
        register_coco_instances(name, {}, json_file, image_root)
        validate = partial(read_own_json, name, json_file)  # the LVIS loader below reads it itself
    else:
        DatasetCatalog.register(name, partial(_load_own_lvis, name, json_file, image_root))
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="lvis")
    _wrap_with_check(name, "Check MODEL.REGIONSPOT.REGISTER_DATASETS (relative paths start at the "
                           f"current directory, {os.getcwd()}).", validate)


def register_datasets_from_cfg(cfg) -> List[str]:
    """Register each [name, json_file, image_root(, "coco"|"lvis")] of
    MODEL.REGIONSPOT.REGISTER_DATASETS (idempotent); returns the names."""
    entries: Sequence = cfg.MODEL.REGIONSPOT.REGISTER_DATASETS
    names = []
    for i, entry in enumerate(entries):
        if (not isinstance(entry, (list, tuple)) or len(entry) not in (3, 4)
                or not all(isinstance(v, str) and v for v in entry)):
            raise ValueError(
                f"MODEL.REGIONSPOT.REGISTER_DATASETS[{i}] is {entry!r}; each entry must be "
                '[name, json_file, image_root] or [name, json_file, image_root, "coco"|"lvis"], e.g. '
                '[["mydata_train", "mydata/train.json", "mydata/images"]].'
            )
        name, json_file, image_root = entry[:3]
        fmt = entry[3].lower() if len(entry) == 4 else "coco"
        try:
            register_own_dataset(name, os.path.expanduser(json_file), os.path.expanduser(image_root), fmt)
        except ValueError as e:
            raise ValueError(f"MODEL.REGIONSPOT.REGISTER_DATASETS[{i}]: {e}") from None
        names.append(name)
    return names


_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
register_all_paper_datasets(_root)
register_all_synthetic(_root)
