"""RegionSpotROIHeads inside detectron2's GeneralizedRCNN: the shipped RPN R50-FPN config with the
tiny encoders, PrecomputedProposals = gt boxes, an oracle head (AP 100 through train_net.py),
the same scores and masks as the meta-architecture and the predictor, empty proposals, and one
training step that moves only the fusion head."""
import copy

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import train_net
from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.data.dataset_mapper import RegionSpotDatasetMapper
from regionspot.predictor import RegionSpotPredictor
from regionspot.data.proposals import attach_proposals
from regionspot.engine.trainer import RegionSpotTrainer

from conftest import PLUGIN_CONFIG, PLUGIN_TINY, _gt_by_image, gt_proposals_file, tiny_cfg

def _plugin_cfg(*opts):
    cfg = tiny_cfg()  # the tiny keys, then the plug-in config and overrides over them
    cfg.defrost()
    cfg.merge_from_file(PLUGIN_CONFIG)
    cfg.merge_from_list([*PLUGIN_TINY, *opts])
    return cfg


def _precomputed(tmp_path, dataset, oracle):
    return ("MODEL.PROPOSAL_GENERATOR.NAME", "PrecomputedProposals", "MODEL.LOAD_PROPOSALS", "True",
            "DATASETS.TEST", f'("{dataset}",)', "DATASETS.PROPOSAL_FILES_TEST", f'("{gt_proposals_file(tmp_path, dataset)}",)',
            "MODEL.REGIONSPOT.HEAD_WEIGHTS", oracle, "TEST.DETECTIONS_PER_IMAGE", "1000")


def _pairs(inst):
    """[(box, class, score, index)] of an output."""
    return [(b, c, s, i) for i, (b, c, s) in enumerate(
        zip(inst.pred_boxes.tensor.numpy(), inst.pred_classes.tolist(), inst.scores.tolist()))]


def _find(pairs, box, cls):
    found = [p for p in pairs if p[1] == cls and np.allclose(p[0], box, atol=1e-2)]
    assert len(found) == 1
    return found[0]


def test_roi_head_with_gt_proposals_and_oracle_gives_ap_100(synthetic_val, oracle, tmp_path):
    args = default_argument_parser().parse_args(
        ["--config-file", PLUGIN_CONFIG, "--eval-only", "OUTPUT_DIR", str(tmp_path / "out"),
         *PLUGIN_TINY, *_precomputed(tmp_path, synthetic_val, oracle)])
    res = train_net.main(args)
    res = res.get(synthetic_val, res)
    assert res["bbox"]["AP"] > 99.9


def test_same_scores_and_masks_as_meta_architecture_and_predictor(synthetic_val, oracle, tmp_path):
    cfg = _plugin_cfg(*_precomputed(tmp_path, synthetic_val, oracle))
    rcnn = build_model(cfg).eval()
    assert type(rcnn.roi_heads).__name__ == "RegionSpotROIHeads"
    d = DatasetCatalog.get(synthetic_val)[1]
    with_proposals = attach_proposals([copy.deepcopy(d)], cfg.DATASETS.PROPOSAL_FILES_TEST[0])[0]  # as train_net does
    x = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)(with_proposals)
    out = rcnn([x])[0]["instances"]

    meta_cfg = tiny_cfg("TEST.DETECTIONS_PER_IMAGE", "1000")
    meta = build_model(meta_cfg).eval()
    RegionSpotCheckpointer(meta).load(oracle)
    y = RegionSpotDatasetMapper(meta_cfg, is_train=False, dataset_name=synthetic_val)(d)
    ref = meta([y])[0]["instances"]

    a, b = _pairs(out), _pairs(ref)
    assert len(a) == len(b) == len(d["annotations"]) * 6
    ious = []
    for box, cls, score, j in b:
        _, _, s, i = _find(a, box, cls)
        assert s == pytest.approx(score, rel=1e-4, abs=1e-6)
        # detectron2's masks live inside their box: compare with the full-image SAM mask there.
        inside = torch.zeros_like(ref.pred_masks[j], dtype=torch.bool)
        x0, y0, x1, y1 = box.round().astype(int)
        inside[y0:y1, x0:x1] = True
        m1, m2 = out.pred_masks[i].bool() & inside, ref.pred_masks[j].bool() & inside
        ious.append(((m1 & m2).sum() / (m1 | m2).sum().clamp(min=1)).item() if (m1 | m2).any() else 1.0)
    assert min(ious) >= 0.99, ious
    assert any(0 < m.sum() < m.numel() for m in ref.pred_masks)  # masks with content: a real comparison

    predictor = RegionSpotPredictor(meta_cfg, model=meta)
    predictor.set_image(d["file_name"])
    gt, _ = _gt_by_image(synthetic_val)[d["image_id"]]
    res = predictor.predict(boxes=gt, vocabulary=synthetic_val, top_k=6)
    for i, box in enumerate(res.boxes.numpy()):
        for c, s in zip(res.topk_classes[i].tolist(), res.topk_scores[i].tolist()):
            assert _find(a, box, c)[2] == pytest.approx(s, rel=1e-4, abs=1e-6)


def test_no_proposals_gives_empty_instances(synthetic_val, tmp_path, oracle):
    cfg = _plugin_cfg(*_precomputed(tmp_path, synthetic_val, oracle))
    rcnn = build_model(cfg).eval()
    d = DatasetCatalog.get(synthetic_val)[0]
    x = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)(d)
    empty = Instances((x["image"].shape[-2], x["image"].shape[-1]))
    empty.proposal_boxes = Boxes(torch.zeros(0, 4))
    empty.objectness_logits = torch.zeros(0)
    x["proposals"] = empty
    out = rcnn([x])[0]["instances"]
    assert len(out) == 0 and out.image_size == (d["height"], d["width"])


def test_rpn_proposals_run_end_to_end(synthetic_val):
    """The shipped config as it is (RPN proposals, random detector weights)."""
    cfg = _plugin_cfg("DATASETS.TEST", f'("{synthetic_val}",)', "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
                      "MODEL.REGIONSPOT.USE_PROPOSAL_SCORE", "True")
    rcnn = build_model(cfg).eval()
    d = DatasetCatalog.get(synthetic_val)[0]
    x = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=synthetic_val)(d)
    out = rcnn([x])[0]["instances"]
    assert 0 < len(out) <= 20 * 6 and out.pred_masks.shape[-2:] == (d["height"], d["width"])
    assert (out.scores <= 1).all()


def test_one_training_step_moves_only_the_fusion_head(synthetic_val):
    cfg = _plugin_cfg("DATASETS.TRAIN", f'("{synthetic_val}",)', "SOLVER.BASE_LR", "0.01",
                      "SOLVER.CLIP_GRADIENTS.ENABLED", "False", "MODEL.REGIONSPOT.TOKEN_MODE", "online")
    rcnn = build_model(cfg).train()
    optimizer = RegionSpotTrainer.build_optimizer(cfg, rcnn)
    before = {k: v.clone() for k, v in rcnn.state_dict().items()}
    mapper = RegionSpotDatasetMapper(cfg, is_train=True, dataset_name=synthetic_val)
    batch = [mapper(d) for d in DatasetCatalog.get(synthetic_val)[:2]]
    with EventStorage():
        losses = rcnn(batch)
    assert "loss_focal" in losses and losses["loss_focal"] > 0
    sum(losses.values()).backward()
    optimizer.step()
    changed = {k for k, v in rcnn.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])}
    assert changed and all(k.startswith("roi_heads.regionspot.head.") for k in changed)
    assert any(".projector." in k for k in changed)
