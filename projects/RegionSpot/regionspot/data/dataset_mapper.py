"""Dataset mapper that keeps what RegionSpot needs: gt boxes at test time, cached SAM tokens in training."""
import copy
import logging
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances

from .images import read_image
from .token_cache import CorruptTokenFile, load_tokens, sam_weights_id, source_key, token_cache_folder, token_file

logger = logging.getLogger(__name__)

# detectron2's `filter_empty_instances` drops boxes whose width or height is at most this.
_EMPTY_BOX_THRESHOLD = 1e-5
_warned_degenerate = set()


def is_degenerate(annotation: Dict) -> bool:
    """Whether a (non-crowd) annotation's box has zero or negative width or height, or NaN."""
    if annotation.get("iscrowd", 0):
        return False
    b, mode = annotation.get("bbox"), annotation.get("bbox_mode")
    if mode == BoxMode.XYWH_ABS:
        w, h = b[2], b[3]
    elif mode == BoxMode.XYXY_ABS:
        w, h = b[2] - b[0], b[3] - b[1]
    else:
        return False
    return not (w > _EMPTY_BOX_THRESHOLD and h > _EMPTY_BOX_THRESHOLD)


def warn_degenerate_annotations(dataset_dicts: List[Dict], dataset_name: str, evaluation: bool = False) -> int:
    """Count the annotations whose box has zero or negative width or height (or NaN), and warn
    once per dataset and use (per process) with the count and the first of them. Returns the count.

    Such a box is no region: the mapper drops it (detectron2's `filter_empty_instances`), so it
    is never a prompt nor a training target, and token extraction drops it too. The dataset's
    json keeps it, and the LVIS/COCO evaluators read their ground truth from there: with
    `evaluation` the warning says that it still counts as a ground-truth object (a miss).
    """
    count, first = 0, None
    for d in dataset_dicts:
        for i, a in enumerate(d.get("annotations", ())):
            if is_degenerate(a):
                count += 1
                if first is None:
                    ann = f"annotation id {a['id']}" if "id" in a else f"annotation #{i}"
                    first = (f"{ann} of image {d.get('image_id')} ({d.get('file_name', '?')}), bbox "
                             f"{list(a['bbox'])} in {BoxMode(a['bbox_mode']).name}")
    if count and (dataset_name, evaluation) not in _warned_degenerate:
        _warned_degenerate.add((dataset_name, evaluation))
        message = (f"Dataset {dataset_name!r}: {count} annotations have a box of zero or negative width or height "
                   f"(first: {first}). They are left out of prompts, training and token extraction.")
        if evaluation:
            json_file = MetadataCatalog.get(dataset_name).get("json_file", None) or "the dataset's annotations"
            message += (f" The evaluator reads its ground truth from {json_file}, where they remain: they still "
                        "count as objects, which no prediction can match; fix or remove them there for a "
                        "score that ignores them.")
        logger.warning(message)
    return count


# Transforms under which a cached SAM token still describes the same image content at its box.
_TOKEN_SAFE_TRANSFORMS = (T.ResizeTransform, T.CropTransform, T.NoOpTransform, T.ScaleTransform)


class RegionSpotDatasetMapper(DatasetMapper):
    """detectron2's `DatasetMapper`, with these differences:

    - test images are resized by `INPUT.MIN_SIZE_TEST`/`MAX_SIZE_TEST` like detectron2's, and the
      boxes and proposals with them;
    - ground-truth instances are kept at test time too (they are the box prompts of GT-box
      evaluation, which the original code dropped and then crashed on);
    - each output names its vocabulary (the dataset's, unless the config fixes one at test time),
      so one model serves datasets with different class lists;
    - with a token folder (cached training), boxes, classes and SAM tokens come together from the
      cache; only resizes and crops are allowed, and a crop drops every box it cuts together with
      its token, so tokens and the image CLIP sees never disagree;
    - images are read by `images.read_image` (16-bit grayscale scaled, not clipped);
    - an unreadable image raises an error that names the file.
    """

    @configurable
    def __init__(self, is_train: bool, *, vocabulary: str = "", token_folder: Optional[str] = None,
                 sam_weights: str = "", **kwargs):
        """
        Args:
            is_train: whether the outputs feed training (chooses augmentations in `from_config`;
                gt instances are kept either way).
            vocabulary: vocabulary spec written into every output as "vocabulary".
            token_folder: folder of cached SAM tokens of this dataset (cached training), or None.
            sam_weights: `token_cache.sam_weights_id` of the SAM the tokens must come from.
            kwargs: as for :class:`detectron2.data.DatasetMapper`.
        """
        # The parent drops annotations when is_train=False; we always want them.
        super().__init__(True, **kwargs)
        self.vocabulary = vocabulary
        self.token_folder = token_folder
        self.sam_weights = sam_weights
        if token_folder is not None:
            for aug in self.augmentations.augs:
                if isinstance(aug, T.RandomFlip):
                    raise ValueError(
                        "Cached SAM tokens cannot follow a flip (MODEL.REGIONSPOT.TOKEN_MODE='cached'): set "
                        "INPUT.RANDOM_FLIP to 'none', or use TOKEN_MODE 'online' where SAM sees the flipped image."
                    )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: str = ""):
        ret = super().from_config(cfg, is_train)
        c = cfg.MODEL.REGIONSPOT
        # At test time detectron2's own ResizeShortestEdge(INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST) runs
        # first, as in the original code; SAM's and CLIP's resizes then start from that image.
        # MIN_SIZE_TEST 0 skips it. Outputs still come out at the original size ("height", "width").
        if c.PROMPT == "proposals" and not is_train:
            ret["precomputed_proposal_topk"] = cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST
        ret["use_instance_mask"] = False
        ret["recompute_boxes"] = False
        # Training always uses the dataset's own classes; evaluation may fix a vocabulary.
        ret["vocabulary"] = dataset_name if is_train else (c.VOCABULARY or dataset_name)
        if is_train and c.TOKEN_MODE == "cached":
            ret["token_folder"] = token_cache_folder(c.TOKEN_CACHE_DIR, dataset_name, c.SAM.TYPE)
            ret["sam_weights"] = sam_weights_id(cfg)
        elif c.TOKEN_MODE not in ("online", "cached"):
            raise ValueError(f"MODEL.REGIONSPOT.TOKEN_MODE must be 'online' or 'cached', not {c.TOKEN_MODE!r}.")
        return ret

    def _read_image(self, dataset_dict: Dict) -> np.ndarray:
        try:
            image = read_image(dataset_dict["file_name"], format=self.image_format)
        except (OSError, ValueError) as e:
            e.add_note(f"Cannot read image {dataset_dict.get('file_name')!r}")
            raise
        utils.check_image_size(dataset_dict, image)
        return image

    def _call_cached(self, dataset_dict: Dict) -> Dict:
        # Boxes and classes come from the cache: copy everything but the annotations.
        d = copy.deepcopy({k: v for k, v in dataset_dict.items() if k != "annotations"})
        path = token_file(self.token_folder, d["image_id"])
        cache = load_tokens(path, d["image_id"])
        if cache.get("source") != source_key(dataset_dict, self.sam_weights):
            raise CorruptTokenFile(
                f"SAM token cache file {path} was made from other annotations of image "
                f"{d.get('file_name')} or by other SAM weights than {self.sam_weights!r}: rerun "
                "tools/extract_sam_tokens.py (it redoes stale files)."
            )
        aug_input = T.AugInput(self._read_image(d))
        transforms = self.augmentations(aug_input)
        unsafe = [t for t in transforms.transforms if not isinstance(t, _TOKEN_SAFE_TRANSFORMS)]
        if unsafe:
            raise ValueError(f"Augmentations {unsafe} would desynchronise cached SAM tokens from the image.")
        image = aug_input.image
        h, w = image.shape[:2]
        boxes = transforms.apply_box(cache["boxes"].numpy())
        eps = 1e-3
        inside = ((boxes[:, 0] >= -eps) & (boxes[:, 1] >= -eps) & (boxes[:, 2] <= w + eps) & (boxes[:, 3] <= h + eps)
                  & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
        inside_t = torch.from_numpy(inside)
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.as_tensor(boxes[inside], dtype=torch.float32))
        instances.gt_boxes.clip((h, w))
        instances.gt_classes = cache["classes"][inside_t]
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        d["instances"] = instances
        d["sam_tokens"] = cache["tokens"][inside_t]
        d["sam_tokens_file"] = path  # named by the model if the tokens do not fit its head
        return d

    def _call_online(self, dataset_dict: Dict) -> Dict:
        """`DatasetMapper.__call__` (no semantic segmentation) with our image reader: detectron2's
        mapper reads through its own `read_image`, which clips 16-bit images."""
        dataset_dict = copy.deepcopy(dataset_dict)
        aug_input = T.AugInput(self._read_image(dataset_dict))
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)
        if "annotations" in dataset_dict:
            # Before any transform: a resize would turn a negative-width box into a valid mirrored one.
            dataset_dict["annotations"] = [a for a in dataset_dict["annotations"] if not is_degenerate(a)]
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict

    def __call__(self, dataset_dict: Dict) -> Dict:
        if self.token_folder is not None:
            out = self._call_cached(dataset_dict)
        else:
            try:
                out = self._call_online(dataset_dict)
            except Exception as e:  # name the image; the exception itself stays as it was
                e.add_note(f"while mapping image {dataset_dict.get('file_name')!r}")
                raise
        if self.vocabulary:
            out["vocabulary"] = self.vocabulary
        return out
