"""Dataset registration. Roots come from $DETECTRON2_DATASETS (default ./datasets).

- The paper's training data, in COCO format: Objects365 v1 and v2, V3Det, OpenImages v6.
- LVIS v1 minival (train/val are detectron2's own built-ins).
- The synthetic shapes sets of the offline quickstart, generated on first use.
Every loader checks its files first, so a missing file is reported with its path and dataset.
"""
import os
from functools import partial
from typing import Dict, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_lvis_instances
from detectron2.data.datasets.lvis import get_lvis_instances_meta

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


def _check_files(name: str, load):
    """Wrap a dataset loader so a missing annotation file or image folder names itself and the set."""

    def checked():
        meta = MetadataCatalog.get(name)
        for what in ("json_file", "image_root"):
            path = meta.get(what, None)
            if path and not os.path.exists(path):
                raise FileNotFoundError(
                    f"Dataset {name!r}: {what} {path} does not exist. Put the data under "
                    f"$DETECTRON2_DATASETS (now {os.getenv('DETECTRON2_DATASETS', 'unset, so ./datasets')})."
                )
        return load()

    return checked


def _wrap_with_check(name: str) -> None:
    load = DatasetCatalog[name]
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, _check_files(name, load))


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


_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
register_all_paper_datasets(_root)
register_all_synthetic(_root)
