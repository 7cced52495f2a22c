"""Import the SAM token files released with the original RegionSpot into our token cache.

The authors published ViT-B mask tokens for Objects365, V3Det and OpenImages as one file per
image, ``<root>/<folder>/<image_id>.pth``: a dict with ``mask_tokens`` (one 256-d token per box)
and ``classes`` (those boxes' category ids). The files hold no boxes, and the tool that made them
was never released, so each file is matched to its image's annotations by count and class before
its tokens are paired with boxes. A file that does not match is refused by name, never
silently misaligned.
"""
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from tqdm import tqdm

from .token_cache import is_valid, sam_weights_id, save_tokens, source_key, token_cache_folder, token_file
from .token_extraction import ExtractionSummary
from ..utils.safe_load import UnsafeFileError, torch_load

logger = logging.getLogger(__name__)

# How a released file's `classes` relate to detectron2's contiguous `category_id`s:
# the dataset's own ids (through the metadata's thing_dataset_id_to_contiguous_id), the contiguous
# ids themselves, or contiguous + 1 (the original training code subtracts 1 for these datasets).
CLASS_ID_CONVENTIONS = ("dataset", "contiguous", "contiguous+1")
# Folder names of the release, by the prefix of our dataset names.
RELEASED_FOLDERS = {"objects365": "objects365", "v3det": "v3det", "openimages": "openimages"}


class TokenMismatch(ValueError):
    """A released file that cannot be paired with its image's annotations."""


def released_folder(dataset_name: str) -> str:
    for prefix, folder in RELEASED_FOLDERS.items():
        if dataset_name.startswith(prefix):
            return folder
    raise ValueError(f"No released token folder is known for dataset {dataset_name!r}: give it with --source-folder.")


def _class_map(convention: str, dataset_name: str) -> Callable[[int], int]:
    if convention == "contiguous":
        return lambda c: c
    if convention == "contiguous+1":
        return lambda c: c - 1
    mapping = MetadataCatalog.get(dataset_name).get("thing_dataset_id_to_contiguous_id")
    if mapping is None:
        raise ValueError(f"Dataset {dataset_name!r} has no thing_dataset_id_to_contiguous_id metadata, so "
                         "class ids convention 'dataset' cannot be used.")
    return lambda c: mapping.get(c, -1)


def read_released_file(path: str) -> Dict[str, torch.Tensor]:
    """A released file's tokens (N, C) float32 and classes (N,) int64, checked for shape and values."""
    try:
        payload = torch_load(path, path)  # tensors and plain data only: no code runs
    except UnsafeFileError:
        raise
    except Exception as e:
        raise TokenMismatch(f"{path} is unreadable ({type(e).__name__}: {e}).") from e
    if not isinstance(payload, dict) or "mask_tokens" not in payload or "classes" not in payload:
        raise TokenMismatch(f"{path} is not a released token file: it needs 'mask_tokens' and 'classes'.")
    tokens = torch.as_tensor(payload["mask_tokens"]).float()
    classes = torch.as_tensor(payload["classes"]).long().flatten()
    if tokens.ndim == 3 and tokens.shape[1] == 1:
        tokens = tokens[:, 0]
    if tokens.ndim != 2 or tokens.shape[0] != classes.shape[0]:
        raise TokenMismatch(f"{path}: mask_tokens of shape {tuple(tokens.shape)} do not give one token per class "
                            f"entry ({classes.shape[0]}).")
    if not torch.isfinite(tokens).all():
        raise TokenMismatch(f"{path} holds non-finite tokens.")
    return {"tokens": tokens, "classes": classes}


def match_order(file_classes: Sequence[int], ann_classes: Sequence[int]) -> Optional[List[int]]:
    """For each annotation, the index of its token in the file; None when the pairing is not certain.

    Same classes in the same order pair one to one. A reordering is accepted only when every
    class occurs once, so that the class alone says which token is whose."""
    file_classes, ann_classes = list(file_classes), list(ann_classes)
    if len(file_classes) != len(ann_classes):
        return None
    if file_classes == ann_classes:
        return list(range(len(ann_classes)))
    if sorted(file_classes) == sorted(ann_classes) and len(set(ann_classes)) == len(ann_classes):
        where = {c: i for i, c in enumerate(file_classes)}
        return [where[c] for c in ann_classes]
    return None


def _non_crowd(d: Dict) -> List[Dict]:
    return [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]


def pick_convention(dicts: Sequence[Dict], folder: str, dataset_name: str, probe: int = 20) -> str:
    """The class-id convention under which most of the first `probe` existing files match (at
    least half of them: a few bad files are then refused one by one, not the whole set)."""
    files = [(d, token_file(folder, d["image_id"])) for d in dicts]
    files = [(d, p) for d, p in files if os.path.isfile(p)][:probe]
    if not files:
        raise FileNotFoundError(f"No released token file of dataset {dataset_name!r} under {folder}.")
    loaded = []
    for d, p in files:
        try:
            loaded.append((d, read_released_file(p)))
        except TokenMismatch:
            pass  # refused by name in the import itself
    matches = {}
    for convention in CLASS_ID_CONVENTIONS:
        try:
            to_ours = _class_map(convention, dataset_name)
        except ValueError:
            continue
        matches[convention] = sum(
            match_order([to_ours(c) for c in f["classes"].tolist()], [a["category_id"] for a in _non_crowd(d)])
            is not None for d, f in loaded)
    best = max(matches, key=matches.get) if matches else None
    if best is None or 2 * matches[best] < len(files):
        raise TokenMismatch(f"The released token files under {folder} match the annotations of {dataset_name!r} under "
                            f"no class-id convention {CLASS_ID_CONVENTIONS} (matches {matches} of {len(files)} files, "
                            f"e.g. {files[0][1]}): are they this dataset's files?")
    return best


def common_width(dicts: Sequence[Dict], folder: str, probe: int = 20) -> Optional[int]:
    """The token width most of the first `probe` readable released files have (None: no file).
    A file of another width (tokens of another SAM mixed in) is then refused by name: it would
    otherwise stop training much later with a bare matrix-shape error."""
    widths: Dict[int, int] = {}
    for d in dicts:
        p = token_file(folder, d["image_id"])
        if not os.path.isfile(p):
            continue
        try:
            w = int(read_released_file(p)["tokens"].shape[1])
        except TokenMismatch:
            continue
        widths[w] = widths.get(w, 0) + 1
        if sum(widths.values()) >= probe:
            break
    return max(widths, key=widths.get) if widths else None


RELEASED_SAM = "vit_b|official"  # `sam_weights_id` of the SAM that made the released files


def import_released_tokens(cfg, dataset_name: str, released_root: str, output_root: str, *,
                           source_folder: str = "", class_ids: str = "auto",
                           allow_other_sam: bool = False) -> ExtractionSummary:
    """Convert `released_root/<source_folder>/<image_id>.pth` files of `dataset_name` into our
    token cache (`token_cache_folder(output_root, dataset_name, SAM.TYPE)`), labelled as tokens of
    the config's SAM. Valid cache files are skipped, so a killed run resumes; a missing or
    mismatching released file is recorded with its reason and the run goes on.

    The released files come from the official SAM ViT-B; `allow_other_sam` labels files in that
    layout as tokens of another SAM (e.g. your own re-extraction), which is then your promise."""
    if sam_weights_id(cfg) != RELEASED_SAM and not allow_other_sam:
        raise ValueError(
            f"The released token files were made by SAM ViT-B with its official weights, but the config's SAM is "
            f"{sam_weights_id(cfg)!r}: set MODEL.REGIONSPOT.SAM.TYPE vit_b and SAM.CHECKPOINT '' (or the official "
            "file), so that training and evaluation use the SAM the tokens came from.")
    if class_ids != "auto" and class_ids not in CLASS_ID_CONVENTIONS:
        raise ValueError(f"class_ids must be 'auto' or one of {CLASS_ID_CONVENTIONS}, not {class_ids!r}.")
    src = os.path.join(released_root, source_folder or released_folder(dataset_name))
    if not os.path.isdir(src):
        raise FileNotFoundError(f"Released token folder not found: {src}")
    dicts = DatasetCatalog.get(dataset_name)
    convention = pick_convention(dicts, src, dataset_name) if class_ids == "auto" else class_ids
    to_ours = _class_map(convention, dataset_name)
    width = common_width(dicts, src)
    logger.info(f"Importing released SAM tokens of {dataset_name} from {src} (class ids: {convention}).")
    out_folder = token_cache_folder(output_root, dataset_name, cfg.MODEL.REGIONSPOT.SAM.TYPE)
    sam_weights = sam_weights_id(cfg)
    summary = ExtractionSummary()
    for d in tqdm(dicts, desc=f"importing tokens {dataset_name}", unit="img"):
        source = source_key(d, sam_weights)
        target = token_file(out_folder, d["image_id"])
        if is_valid(target, d["image_id"], source):
            summary.skipped += 1
            continue
        path = token_file(src, d["image_id"])
        try:
            if not os.path.isfile(path):
                raise TokenMismatch(f"no released token file {path}")
            f = read_released_file(path)
            if f["tokens"].shape[1] != width:
                raise TokenMismatch(
                    f"{path} holds {f['tokens'].shape[1]}-d tokens, but the other released files of {dataset_name!r} "
                    f"under {src} hold {width}-d tokens: it was made by another SAM and is not imported")
            anns = _non_crowd(d)
            file_classes = [to_ours(c) for c in f["classes"].tolist()]
            order = match_order(file_classes, [a["category_id"] for a in anns])
            if order is None:
                raise TokenMismatch(
                    f"{path} holds {len(file_classes)} tokens of classes {file_classes[:10]}, but the image has "
                    f"{len(anns)} annotations of classes {[a['category_id'] for a in anns][:10]}: the pairing "
                    "of tokens and boxes is not certain")
            image_size = (d["height"], d["width"])
            # The boxes our own extraction would cache: detectron2's annotation handling, no resize.
            annos = [utils.transform_instance_annotations(
                {k: v for k, v in a.items() if k not in ("segmentation", "keypoints")}, T.TransformList([]), image_size)
                for a in anns]
            instances = utils.annotations_to_instances(annos, image_size)
            instances, keep = utils.filter_empty_instances(instances, return_mask=True)
            tokens = f["tokens"][torch.as_tensor(order, dtype=torch.long)][keep]
            save_tokens(target, image_id=d["image_id"], file_name=d.get("file_name", ""), image_size=image_size,
                        tokens=tokens, boxes=instances.gt_boxes.tensor, classes=instances.gt_classes,
                        sam_type=cfg.MODEL.REGIONSPOT.SAM.TYPE, source=source)
        except (TokenMismatch, KeyError, ValueError) as e:
            summary.failed[d.get("file_name", str(d["image_id"]))] = str(e)
            continue
        summary.images += 1
        summary.boxes += len(instances)
    return summary
