"""LazyConfig route: every shipped `configs/lazy/*.py` loads and builds; the paper configs hold the
yacs configs' values; the LazyConfig and yacs builds give identical detections and identical
training, both through `train_net.py`."""
import glob
import json
import os

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import build_augmentation
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from detectron2.structures import Boxes, Instances
from omegaconf import DictConfig, ListConfig, OmegaConf

import train_net
from regionspot import RegionSpot, add_regionspot_config
from regionspot.engine import lazy as rs_lazy
from regionspot.modeling import region_pipeline
from regionspot.data.synthetic import make_synthetic_lvis, register_synthetic_lvis
from regionspot.data.token_extraction import extract_tokens
from regionspot.engine.trainer import RegionSpotTrainer

from conftest import CONFIG_DIR, TINY_CONFIG, tiny_cfg

LAZY_DIR = os.path.join(CONFIG_DIR, "lazy")
LAZY_CONFIGS = sorted(glob.glob(os.path.join(LAZY_DIR, "*.py")))
TINY_LAZY = os.path.join(LAZY_DIR, "RegionSpot-tiny_synthetic.py")
# LazyConfig file -> (the yacs config of its model and evaluation, the yacs config of its training)
YACS_TWINS = {
    "RegionSpot-BB.py": ("RegionSpot-BB.yaml", "train/RegionSpot-BB_stage1_o365.yaml"),
    "RegionSpot-BL.py": ("RegionSpot-BL.yaml", "train/RegionSpot-BL_stage1_o365.yaml"),
    "RegionSpot-BL336.py": ("RegionSpot-BL336.yaml", "train/RegionSpot-BL336_stage1_o365.yaml"),
    "common.py": ("RegionSpot-BB.yaml", "train/RegionSpot-BB_stage1_o365.yaml"),
    "RegionSpot-tiny_synthetic.py": ("quickstart/RegionSpot-tiny_synthetic.yaml",) * 2,
}
TRAIN_SET = "lazy_test_train"
# The LazyConfig twin of TINY_CONFIG (the quickstart with random tiny encoders, as the tests use).
TINY_RANDOM = ("model.sam.checkpoint=random", "model.clip.checkpoint=random", "model.clip.input_size=128")


def _yacs(path):
    cfg = get_cfg()
    add_regionspot_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, path))
    return cfg


def _tiny_overrides(cfg):
    """The tiny encoders of the quickstart yaml, on the CPU, whatever the file's own encoders."""
    cfg.model.sam = dict(type="tiny")
    cfg.model.clip = dict(name="tiny", input_size=128)
    cfg.model.head.dim_feedforward = 256
    cfg.model.templates = ["a photo of a {}."]
    cfg.train.device = "cpu"
    return cfg


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lazy_train_data"))
    register_synthetic_lvis(TRAIN_SET, make_synthetic_lvis(root, "train", num_images=4, seed=5), root)
    yield TRAIN_SET
    DatasetCatalog.remove(TRAIN_SET)
    MetadataCatalog.remove(TRAIN_SET)


def test_every_yacs_twin_is_listed():
    assert sorted(os.path.basename(p) for p in LAZY_CONFIGS) == sorted(YACS_TWINS)


# --------------------------------------------------------------------------- every shipped file
@pytest.mark.parametrize("path", LAZY_CONFIGS, ids=os.path.basename)
def test_lazy_config_loads_and_builds_with_tiny_encoders(path):
    cfg = _tiny_overrides(LazyConfig.load(path))
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg)
    assert {"train", "test", "evaluator"} <= set(cfg.dataloader)
    model = instantiate(cfg.model)
    assert isinstance(model, RegionSpot) and model.device.type == "cpu"
    # The head's widths are the encoders' own.
    assert model.head.to_clip.in_features == model.sam_encoder.token_dim == 32
    assert model.head.to_clip.out_features == model.clip_encoder.width == 64
    assert model.head.projector.out_features == model.clip_encoder.text_dim == 32
    assert model.clip_encoder.input_size == 128
    assert model.head.decoder.layers[0].linear1.out_features == 256
    # It runs: two boxes of a random image against a two-class vocabulary.
    model.eval()
    model.vocabulary.set_custom(["cat", "dog"])
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    out = model([{"image": image, "vocabulary": "custom",
                  "instances": _gt_instances((96, 128), [[4, 4, 60, 50], [30, 20, 120, 90]])}])
    inst = out[0]["instances"]
    assert len(inst) == 4 and inst.image_size == (96, 128)
    # The optimizer and the schedule build on the model.
    cfg.optimizer.model = model
    optimizer = instantiate(cfg.optimizer)
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(model.head.parameters())
    instantiate(cfg.lr_multiplier)


def _gt_instances(size, boxes):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    return inst


def test_unknown_encoder_keys_are_refused():
    cfg = _tiny_overrides(LazyConfig.load(TINY_LAZY))
    cfg.model.sam.typo = 1
    with pytest.raises(KeyError, match=r"typo.*model\.sam"):
        instantiate(cfg.model)


def _lower(node):
    """A yacs node's keys in lower case: the lazy builder's argument names."""
    return {k.lower(): v for k, v in node.items()}


def test_builder_defaults_equal_the_yacs_defaults():
    base = get_cfg()
    add_regionspot_config(base)
    c = base.MODEL.REGIONSPOT
    assert rs_lazy.SAM_DEFAULTS == _lower(c.SAM)
    assert rs_lazy.CLIP_DEFAULTS == _lower(c.CLIP)
    assert rs_lazy.HEAD_DEFAULTS == dict(num_layers=c.HEAD.NUM_LAYERS, num_heads=c.HEAD.NUM_HEADS,
                                         dim_feedforward=c.HEAD.DIM_FEEDFORWARD, dropout=c.HEAD.DROPOUT)


# --------------------------------------------------------------------------- values equal yacs
def _plain(v):
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def _augs(augmentations):
    """Augmentations as (class, arguments), lists and tuples alike."""
    return [(type(a), {k: tuple(v) if isinstance(v, (list, tuple, ListConfig)) else v for k, v in vars(a).items()})
            for a in augmentations]


class _Encoder:
    token_dim, width, text_dim = 8, 16, 8


@pytest.mark.parametrize("name", sorted(YACS_TWINS))
def test_lazy_config_values_equal_the_yacs_configs(name, monkeypatch):
    lazy = LazyConfig.load(os.path.join(LAZY_DIR, name))
    eval_yaml, train_yaml = YACS_TWINS[name]
    ycfg, tcfg = _yacs(eval_yaml), _yacs(train_yaml)
    c, m = ycfg.MODEL.REGIONSPOT, lazy.model

    # Encoders and head.
    sam, clip, head = (rs_lazy._merged(d, m[k], k) for d, k in
                       ((rs_lazy.SAM_DEFAULTS, "sam"), (rs_lazy.CLIP_DEFAULTS, "clip"),
                        (rs_lazy.HEAD_DEFAULTS, "head")))
    assert sam == _lower(c.SAM)
    assert clip == _lower(c.CLIP)
    assert head == dict(num_layers=c.HEAD.NUM_LAYERS, num_heads=c.HEAD.NUM_HEADS,
                        dim_feedforward=c.HEAD.DIM_FEEDFORWARD, dropout=c.HEAD.DROPOUT)
    assert m.random_init_seed == c.RANDOM_INIT_SEED
    assert lazy.train.device == ycfg.MODEL.DEVICE

    # Every other argument of RegionSpot, against what its yacs from_config gives (encoders stubbed).
    monkeypatch.setattr(region_pipeline, "build_sam_encoder", lambda cfg: _Encoder())
    monkeypatch.setattr(region_pipeline, "build_clip_encoder", lambda cfg: _Encoder())
    expected = {k: v for k, v in RegionSpot.from_config(ycfg).items()
                if k not in ("sam_encoder", "clip_encoder", "head")}
    given = {k: _plain(instantiate(m[k])) for k in m if k not in ("_target_", "sam", "clip", "head",
                                                                   "random_init_seed", "device")}
    assert type(given.pop("prompt_source")) is type(expected.pop("prompt_source"))
    given["templates"], expected["templates"] = tuple(given["templates"]), tuple(expected["templates"])
    expected["custom_vocabulary"] = list(expected["custom_vocabulary"])
    assert given == expected

    # Test loader and evaluator.
    test = lazy.dataloader.test
    assert [test.dataset.name] == list(ycfg.DATASETS.TEST)
    assert _augs(instantiate(test.mapper.augmentations)) == _augs(build_augmentation(ycfg, False))
    assert test.mapper.image_format == ycfg.INPUT.FORMAT
    assert test.mapper.vocabulary == (c.VOCABULARY or test.dataset.name)
    assert test.batch_size == c.TEST_IMS_PER_BATCH
    assert test.num_workers == ycfg.DATALOADER.NUM_WORKERS
    assert test.dataset.missing_proposals == c.MISSING_PROPOSALS
    assert test.dataset.proposal_box_mode == c.PROPOSAL_BOX_MODE
    ev = lazy.dataloader.evaluator
    assert ev.dataset_name == test.dataset.name
    assert (ev.mask_on, ev.max_dets_per_image) == (c.MASK_ON, ycfg.TEST.DETECTIONS_PER_IMAGE)

    # Training: loader, optimizer, schedule, engine.
    t, tc = lazy.dataloader.train, tcfg.MODEL.REGIONSPOT
    assert list(t.names) == list(tcfg.DATASETS.TRAIN)
    assert _augs(instantiate(t.augmentations)) == _augs(build_augmentation(tcfg, True))
    assert (t.total_batch_size, t.num_workers, t.filter_empty) == (
        tcfg.SOLVER.IMS_PER_BATCH, tcfg.DATALOADER.NUM_WORKERS, tcfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    assert (t.token_mode, t.token_cache_dir, list(t.ratios)) == (
        tc.TOKEN_MODE, tc.TOKEN_CACHE_DIR, list(tc.DATASET_RATIOS))
    assert max(t.seed, 0) == max(tcfg.SEED, 0) and lazy.train.seed == tcfg.SEED
    assert dict(t.sam) == dict(m.sam) and t.random_init_seed == m.random_init_seed
    s = tcfg.SOLVER
    assert s.CLIP_GRADIENTS.ENABLED and s.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert (lazy.optimizer.lr, lazy.optimizer.weight_decay, lazy.optimizer.full_model_clip_norm) == (
        s.BASE_LR, s.WEIGHT_DECAY, s.CLIP_GRADIENTS.CLIP_VALUE)
    assert lazy.train.max_iter == s.MAX_ITER
    assert lazy.train.amp.enabled == s.AMP.ENABLED
    assert lazy.train.checkpointer.period == s.CHECKPOINT_PERIOD
    assert lazy.train.eval_period == tcfg.TEST.EVAL_PERIOD
    assert lazy.train.best_metric == tc.BEST_METRIC
    assert lazy.train.init_checkpoint == tcfg.MODEL.WEIGHTS
    assert lazy.train.ddp.broadcast_buffers is False  # what DefaultTrainer passes to DDP
    # The schedule: the same multiplier as detectron2's build_lr_scheduler, at every 1% of training.
    ours = instantiate(lazy.lr_multiplier)
    theirs = build_lr_scheduler(tcfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))._multiplier
    for i in range(100):
        assert ours(i / 100) == theirs(i / 100)


# --------------------------------------------------------------------------- same detections
def _tiny_lazy(*overrides):
    return LazyConfig.apply_overrides(LazyConfig.load(TINY_LAZY), [*TINY_RANDOM, *overrides])


def test_lazy_and_yacs_models_are_the_same_network(tmp_path):
    torch.manual_seed(5)
    yacs_model = build_model(tiny_cfg())
    lazy_model = instantiate(_tiny_lazy().model)
    lazy_model.head.load_state_dict(yacs_model.head.state_dict())
    a, b = yacs_model.state_dict(), lazy_model.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    def settings(obj):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_") and isinstance(v, (str, int, float, tuple, list))}

    assert settings(yacs_model) == settings(lazy_model)
    assert settings(yacs_model.vocabulary) == settings(lazy_model.vocabulary)


@pytest.fixture(scope="module")
def head_weights(tmp_path_factory):
    """A head-only checkpoint of a random head (seeded)."""
    path = tmp_path_factory.mktemp("lazy_head") / "head.pth"
    torch.manual_seed(11)
    model = build_model(tiny_cfg())
    torch.save({"model": {f"head.{k}": v for k, v in model.head.state_dict().items()}}, path)
    return str(path)


def _results(out_dir, dataset):
    with open(os.path.join(out_dir, "inference", dataset, "lvis_instances_results.json")) as f:
        return json.load(f)


def _eval_both(tmp_path, dataset, weights, yacs_opts=(), lazy_opts=()):
    """(yacs metrics, LazyConfig metrics, yacs detections, LazyConfig detections) of `train_net.py --eval-only`."""
    yacs_out, lazy_out = str(tmp_path / "yacs"), str(tmp_path / "lazy")
    yacs_res = train_net.main(default_argument_parser().parse_args([
        "--config-file", TINY_CONFIG, "--eval-only", "DATASETS.TEST", f'("{dataset}",)',
        "MODEL.WEIGHTS", weights, "OUTPUT_DIR", yacs_out, *yacs_opts]))
    lazy_res = train_net.main(default_argument_parser().parse_args([
        "--config-file", TINY_LAZY, "--eval-only", f"dataloader.test.dataset.name={dataset}",
        f"train.init_checkpoint={weights}", f"train.output_dir={lazy_out}", *lazy_opts, *TINY_RANDOM]))
    return yacs_res.get(dataset, yacs_res), lazy_res, _results(yacs_out, dataset), _results(lazy_out, dataset)


def test_lazy_eval_only_gives_the_yacs_detections(synthetic_val, head_weights, tmp_path):
    yacs_res, lazy_res, a, b = _eval_both(tmp_path, synthetic_val, head_weights)
    assert set(lazy_res) == {"bbox", "segm"}
    assert lazy_res == yacs_res
    assert len(a) == 6 * sum(len(d["annotations"]) for d in DatasetCatalog.get(synthetic_val))
    assert a == b  # every box, class, score and mask RLE
    # ... and the head was loaded: a random head gives other scores.
    train_net.main(default_argument_parser().parse_args([
        "--config-file", TINY_LAZY, "--eval-only", f"dataloader.test.dataset.name={synthetic_val}",
        f"train.output_dir={tmp_path / 'random'}", *TINY_RANDOM]))
    assert [d["score"] for d in _results(str(tmp_path / "random"), synthetic_val)] != [d["score"] for d in b]
    assert os.path.isfile(os.path.join(tmp_path, "lazy", "config.yaml"))  # default_setup saved the LazyConfig


def test_lazy_eval_with_proposals_gives_the_yacs_detections(synthetic_val, head_weights, tmp_path):
    """Proposals (GLIP-style JSON: shifted gt boxes, unequal scores) as prompts, scores multiplied in."""
    path = str(tmp_path / "proposals.json")
    data = {}
    for d in DatasetCatalog.get(synthetic_val):
        boxes = [[a["bbox"][0] + 2, a["bbox"][1] + 1, a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in d["annotations"]]  # the synthetic set's boxes are XYWH
        data[str(d["image_id"])] = {"boxes": boxes, "scores": [0.9 - 0.1 * i for i in range(len(boxes))]}
    with open(path, "w") as f:
        json.dump(data, f)
    yacs_res, lazy_res, a, b = _eval_both(
        tmp_path, synthetic_val, head_weights,
        ("MODEL.REGIONSPOT.PROMPT", "proposals", "DATASETS.PROPOSAL_FILES_TEST", f'("{path}",)'),
        ("model.prompt_source._target_=regionspot.modeling.prompt_sources.ProposalBoxes",
         f"dataloader.test.dataset.proposal_file={path}",
         "dataloader.test.mapper.precomputed_proposal_topk=1000"))
    assert lazy_res == yacs_res and a == b
    assert len(b) == 6 * sum(len(v["boxes"]) for v in data.values())
    assert max(d["score"] for d in b) <= 0.9 + 1e-6  # proposal scores were multiplied in


# --------------------------------------------------------------------------- same training
def _final_head(out_dir):
    state = torch.load(os.path.join(out_dir, "model_final.pth"), map_location="cpu", weights_only=False)["model"]
    assert state and all(k.startswith("head.") for k in state)  # head only, like the yacs route
    return state


def test_lazy_training_equals_yacs_training(train_set, synthetic_val, tmp_path):
    """Three online-token steps, evaluation and best checkpoint at the end: the same head as yacs."""
    yacs_out, lazy_out = str(tmp_path / "yacs"), str(tmp_path / "lazy")
    train_net.main(default_argument_parser().parse_args([
        "--config-file", TINY_CONFIG, "DATASETS.TRAIN", f'("{train_set}",)', "DATASETS.TEST", f'("{synthetic_val}",)',
        "MODEL.REGIONSPOT.TOKEN_MODE", "online", "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2",
        "TEST.EVAL_PERIOD", "3", "OUTPUT_DIR", yacs_out]))
    train_net.main(default_argument_parser().parse_args([
        "--config-file", TINY_LAZY, f"dataloader.train.names=[{train_set}]",
        f"dataloader.test.dataset.name={synthetic_val}",
        "dataloader.train.token_mode=online", "train.max_iter=3", "dataloader.train.total_batch_size=2",
        "train.eval_period=3", f"train.output_dir={lazy_out}", *TINY_RANDOM]))
    a, b = _final_head(yacs_out), _final_head(lazy_out)
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # The head did train (AdamW at lr 3e-3 x warmup moves every weight), and the best checkpoint exists.
    torch.manual_seed(0)
    init = build_model(tiny_cfg()).head.state_dict()
    assert any(not torch.equal(init[k[len("head."):]], b[k]) for k in b)
    assert os.path.isfile(os.path.join(lazy_out, "model_best.pth"))
    # The same losses, learning rates and evaluation, as detectron2's writers logged them.
    lazy_metrics, yacs_metrics = _metrics(lazy_out), _metrics(yacs_out)
    assert any("total_loss" in m for m in lazy_metrics) and any("bbox/AP" in m for m in lazy_metrics)
    assert lazy_metrics == yacs_metrics


def _metrics(out_dir):
    """metrics.json without its timings."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [{k: v for k, v in json.loads(line).items() if "time" not in k}
                for line in f if line.strip()]


def test_lazy_amp_on_cpu_is_refused_by_key(train_set, tmp_path):
    with pytest.raises(ValueError, match=r"train\.amp\.enabled.*train\.device"):
        train_net.main(default_argument_parser().parse_args([
            "--config-file", TINY_LAZY, f"dataloader.train.names=[{train_set}]", "train.amp.enabled=True",
            f"train.output_dir={tmp_path}", *TINY_RANDOM]))


def test_lazy_cached_train_loader_gives_the_yacs_batches(train_set, tmp_path):
    """Cached tokens through the LazyConfig loader: the same images, boxes and tokens as the
    trainer's loader (so the tokens' SAM check passes with the LazyConfig's SAM too)."""
    root = str(tmp_path / "tokens")
    torch.manual_seed(0)
    extract_tokens(build_model(tiny_cfg()).sam_encoder, tiny_cfg(), train_set, root)
    ycfg = tiny_cfg("DATASETS.TRAIN", f'("{train_set}",)', "MODEL.REGIONSPOT.TOKEN_CACHE_DIR", root,
                    "SOLVER.IMS_PER_BATCH", "2")
    lazy = _tiny_lazy(f"dataloader.train.names=[{train_set}]", f"dataloader.train.token_cache_dir={root}",
                      "dataloader.train.total_batch_size=2")
    batches = []
    for build in (lambda: RegionSpotTrainer.build_train_loader(ycfg), lambda: instantiate(lazy.dataloader.train)):
        torch.manual_seed(3)
        np.random.seed(3)
        batches.append(next(iter(build())))
    (a, b) = batches
    assert [x["image_id"] for x in a] == [x["image_id"] for x in b]
    for x, y in zip(a, b):
        assert "sam_tokens" in y and torch.equal(x["sam_tokens"], y["sam_tokens"])
        assert torch.equal(x["image"], y["image"]) and x["vocabulary"] == y["vocabulary"] == train_set
        assert torch.equal(x["instances"].gt_boxes.tensor, y["instances"].gt_boxes.tensor)
