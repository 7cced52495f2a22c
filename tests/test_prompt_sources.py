"""Prompt sources: the registry, a user's own source in a few lines, and any detectron2 detector
as the source (a test detector that returns the gt boxes gives AP 100 with the oracle head; a
real GeneralizedRCNN from detectron2's model zoo runs end to end)."""
import numpy as np
import pytest
import torch
import yaml
from detectron2.config import configurable
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import default_argument_parser
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import Boxes, Instances
from torch import nn

import train_net
from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.dataset_mapper import RegionSpotDatasetMapper
from regionspot.prompt_sources import PROMPT_SOURCE_REGISTRY, DetectorBoxes, PromptSource

from conftest import TINY_CONFIG, _gt_by_image, tiny_cfg

SEEN = {}  # what the test detector was given, by image id


@META_ARCH_REGISTRY.register()
class GTBoxTestDetector(nn.Module):
    """A detectron2 meta-architecture that 'detects' the dataset's gt boxes of each image."""

    @configurable
    def __init__(self, *, dataset: str):
        super().__init__()
        self.gt = _gt_by_image(dataset)
        self.sizes = {d["image_id"]: (d["height"], d["width"]) for d in DatasetCatalog.get(dataset)}
        self.register_buffer("anchor", torch.zeros(1))

    @classmethod
    def from_config(cls, cfg):
        return {"dataset": cfg.DATASETS.TEST[0]}

    def forward(self, batched_inputs):
        out = []
        for x in batched_inputs:
            SEEN[x["image_id"]] = x
            boxes, _ = self.gt[x["image_id"]]
            h0, w0 = self.sizes[x["image_id"]]
            scale = np.array([x["width"] / w0, x["height"] / h0] * 2)
            inst = Instances((x["height"], x["width"]))
            inst.pred_boxes = Boxes(torch.as_tensor(boxes * scale, dtype=torch.float32))
            inst.scores = torch.ones(len(boxes))
            inst.pred_classes = torch.zeros(len(boxes), dtype=torch.long)
            out.append({"instances": inst})
        return out


def _detector_config(tmp_path, dataset, min_size=0):
    path = tmp_path / "gt_detector.yaml"
    path.write_text(yaml.safe_dump({
        "MODEL": {"META_ARCHITECTURE": "GTBoxTestDetector", "DEVICE": "cpu"},
        "INPUT": {"FORMAT": "BGR", "MIN_SIZE_TEST": min_size, "MAX_SIZE_TEST": 4000},
        "DATASETS": {"TEST": [dataset]},
    }))
    return str(path)


def _eval(tmp_path, dataset, weights, *opts):
    args = default_argument_parser().parse_args([
        "--config-file", TINY_CONFIG, "--eval-only", "DATASETS.TEST", f'("{dataset}",)',
        "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu", *opts])
    res = train_net.main(args)
    return res.get(dataset, res)


@pytest.mark.parametrize("min_size", [0, 96])  # the detector's own test resize: none, or half size
def test_detector_source_gives_ap_100_with_the_oracle(synthetic_val, oracle, tmp_path, min_size):
    SEEN.clear()
    config = _detector_config(tmp_path, synthetic_val, min_size)
    res = _eval(tmp_path, synthetic_val, oracle, "MODEL.REGIONSPOT.PROMPT", "detector",
                "MODEL.REGIONSPOT.DETECTOR.CONFIG_FILE", config, "MODEL.REGIONSPOT.DETECTOR.SCORE_THRESH", "0.5")
    assert res["bbox"]["AP"] > 99.9
    d = DatasetCatalog.get(synthetic_val)[0]
    x = SEEN[d["image_id"]]
    image = x["image"].permute(1, 2, 0).numpy()
    bgr = read_image(d["file_name"], format="BGR")
    assert (x["height"], x["width"]) == bgr.shape[:2]  # its boxes come back in RegionSpot's pixels
    if min_size == 0:
        assert np.array_equal(image, bgr)  # the detector's own channel order
    else:
        assert image.shape[:2] == (96, 128)  # and its own test resize


def test_detector_filters_scores_topk_and_nms():
    class Fixed(nn.Module):
        def forward(self, inputs):
            inst = Instances((100, 100))
            inst.pred_boxes = Boxes(torch.tensor([[0, 0, 50, 50], [1, 1, 50, 50], [60, 60, 90, 90],
                                                  [10, 60, 30, 90]], dtype=torch.float32))
            inst.scores = torch.tensor([0.9, 0.8, 0.3, 0.05])
            return [{"instances": inst} for _ in inputs]

    image = torch.zeros(3, 100, 100)
    src = DetectorBoxes(detector=Fixed(), input_format="RGB", score_thresh=0.1, topk=0, nms_thresh=0.5)
    (boxes, scores), = src([{}], [image], None, None)
    assert scores.tolist() == pytest.approx([0.9, 0.3])  # 0.05 under the threshold, box 1 suppressed
    src = DetectorBoxes(detector=Fixed(), input_format="RGB", score_thresh=0.0, topk=2)
    (boxes, scores), = src([{}], [image], None, None)
    assert scores.tolist() == pytest.approx([0.9, 0.8]) and boxes.shape == (2, 4)


def test_detector_that_finds_nothing_gives_empty_instances(synthetic_val):
    class Nothing(nn.Module):
        def forward(self, inputs):
            inst = Instances((inputs[0]["height"], inputs[0]["width"]))
            inst.pred_boxes, inst.scores = Boxes(torch.zeros(0, 4)), torch.zeros(0)
            return [{"instances": inst}]

    cfg = tiny_cfg()
    model = build_model(cfg).eval()
    model.prompt_source = DetectorBoxes(detector=Nothing(), input_format="BGR")
    x = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)(DatasetCatalog.get(synthetic_val)[0])
    inst = model([x])[0]["instances"]
    assert len(inst) == 0 and inst.image_size == (x["height"], x["width"])
    assert inst.pred_masks.shape[0] == 0


@PROMPT_SOURCE_REGISTRY.register()
class WholeImageTestSource(PromptSource):
    """A user's own source: one box over each whole image."""

    def forward(self, batched_inputs, images, features, pipeline):
        return [(torch.tensor([[0.0, 0.0, img.shape[-1], img.shape[-2]]], device=img.device), None) for img in images]


def test_a_registered_source_is_used_by_name(synthetic_val):
    cfg = tiny_cfg("MODEL.REGIONSPOT.PROMPT", "WholeImageTestSource")
    model = build_model(cfg).eval()
    x = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)(DatasetCatalog.get(synthetic_val)[0])
    inst = model([x])[0]["instances"]
    assert torch.allclose(inst.pred_boxes.tensor, torch.tensor([[0.0, 0.0, x["width"], x["height"]]]))


def test_unknown_source_lists_the_choices():
    with pytest.raises(ValueError, match="MODEL.REGIONSPOT.PROMPT.*WholeImageTestSource"):
        build_model(tiny_cfg("MODEL.REGIONSPOT.PROMPT", "no_such_source"))


def test_real_generalized_rcnn_from_the_model_zoo_runs(synthetic_val, tmp_path):
    """detectron2's own Faster R-CNN R50-FPN config, random weights, as the prompt source."""
    cfg = tiny_cfg("MODEL.REGIONSPOT.PROMPT", "detector",
                   "MODEL.REGIONSPOT.DETECTOR.CONFIG_FILE", "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
                   "MODEL.REGIONSPOT.DETECTOR.WEIGHTS", "random", "MODEL.REGIONSPOT.DETECTOR.SCORE_THRESH", "0.0",
                   "MODEL.REGIONSPOT.DETECTOR.OPTS",
                   "['INPUT.MIN_SIZE_TEST', '128', 'INPUT.MAX_SIZE_TEST', '256', 'MODEL.ROI_HEADS.SCORE_THRESH_TEST', '0.0']")
    model = build_model(cfg).eval()
    assert type(model.prompt_source.detector).__name__ == "GeneralizedRCNN"
    x = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)(DatasetCatalog.get(synthetic_val)[0])
    inst = model([x])[0]["instances"]
    h, w = x["height"], x["width"]
    assert inst.image_size == (h, w)
    b = inst.pred_boxes.tensor
    assert len(inst) > 0 and (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()
    # The frozen detector, like SAM and CLIP, stays out of RegionSpot's head-only checkpoints.
    RegionSpotCheckpointer(model, str(tmp_path)).save("head")
    saved = torch.load(tmp_path / "head.pth", weights_only=False)["model"]
    assert saved and all(k.startswith("head.") for k in saved)
