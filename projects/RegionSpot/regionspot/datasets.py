"""Dataset registration. Roots come from $DETECTRON2_DATASETS (default ./datasets)."""
import os
from functools import partial

from .synthetic import make_synthetic_lvis, register_synthetic_lvis

# name -> (split, number of images, seed). Generated on first use, then reused.
SYNTHETIC_SPLITS = {
    "synthetic_shapes_train": ("train", 96, 0),
    "synthetic_shapes_val": ("val", 24, 1),
}


def register_all_synthetic(root: str) -> None:
    """Register the synthetic shapes sets under `root/synthetic_shapes` (made when first loaded)."""
    folder = os.path.join(root, "synthetic_shapes")
    for name, (split, num, seed) in SYNTHETIC_SPLITS.items():
        json_path = os.path.join(folder, f"lvis_synthetic_{split}.json")
        register_synthetic_lvis(name, json_path, folder,
                                make=partial(make_synthetic_lvis, folder, split, num, seed))


_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
register_all_synthetic(_root)
