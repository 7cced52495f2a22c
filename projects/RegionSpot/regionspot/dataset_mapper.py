"""Dataset mapper that keeps what RegionSpot needs at test time: gt boxes and proposals."""
import copy
import logging
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

logger = logging.getLogger(__name__)


class RegionSpotDatasetMapper(DatasetMapper):
    """detectron2's `DatasetMapper`, with three differences:

    - ground-truth instances are kept at test time too (they are the box prompts of GT-box
      evaluation, which the original code dropped and then crashed on);
    - each output names its vocabulary (the dataset's, unless the config fixes one), so one
      model serves datasets with different class lists;
    - an unreadable image raises an error that names the file.
    """

    @configurable
    def __init__(self, is_train: bool, *, vocabulary: str = "", **kwargs):
        """
        Args:
            is_train: whether the outputs feed training (only changes logging here; gt
                instances are always kept).
            vocabulary: vocabulary spec written into every output as "vocabulary".
            kwargs: as for :class:`detectron2.data.DatasetMapper`.
        """
        # The parent drops annotations when is_train=False; we always want them.
        super().__init__(True, **kwargs)
        self.training = is_train
        self.vocabulary = vocabulary

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: str = ""):
        ret = super().from_config(cfg, is_train)
        if not is_train:
            # RegionSpot resizes on the device for SAM and CLIP: test images stay at full size.
            ret["augmentations"] = []
        if cfg.MODEL.REGIONSPOT.PROMPT == "proposals" and not is_train:
            ret["precomputed_proposal_topk"] = cfg.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST
        ret["use_instance_mask"] = False
        ret["recompute_boxes"] = False
        ret["vocabulary"] = cfg.MODEL.REGIONSPOT.VOCABULARY or dataset_name
        return ret

    def __call__(self, dataset_dict: Dict) -> Dict:
        try:
            out = super().__call__(dataset_dict)
        except (OSError, ValueError) as e:
            raise type(e)(f"Cannot read image {dataset_dict.get('file_name')!r}: {e}") from e
        if self.vocabulary:
            out["vocabulary"] = self.vocabulary
        return out
