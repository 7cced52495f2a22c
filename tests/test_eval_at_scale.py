"""Evaluation at scale, end to end: results streamed to per-process shards, the chunked evaluation,
`--eval-only --resume` after a killed run, and DDP on the CPU (gloo). The metrics and the results
file must equal detectron2's own route (its LVIS/COCO evaluator on an in-memory list)."""
import json
import os
import socket

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.structures import Boxes, Instances

import train_net
from regionspot import RegionSpot
from regionspot import evaluation_results as shards
from regionspot.engine.launch import launch
from regionspot.engine.trainer import RegionSpotTrainer
from regionspot.evaluation import (RegionSpotCOCOEvaluator, RegionSpotLVISEvaluator, instances_to_json,
                                   patch_lvis_for_numpy2)

from conftest import TINY_CONFIG

LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


class _OldLVISEvaluator(LVISEvaluator):
    """The route before streaming: detectron2's LVISEvaluator (gather, in-memory list, `lvis`
    package) fed by `instances_to_json`."""

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            self._predictions.append({"image_id": inp["image_id"],
                                      "instances": instances_to_json(out["instances"].to("cpu"), inp["image_id"])})

    def evaluate(self):
        patch_lvis_for_numpy2()
        return super().evaluate()


def _args(dataset, out, *opts, resume=False):
    return default_argument_parser().parse_args(
        ["--config-file", TINY_CONFIG, "--eval-only"] + (["--resume"] if resume else []) + [
            "DATASETS.TEST", f'("{dataset}",)', "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", "",
            "MODEL.DEVICE", "cpu", "SEED", "0", *opts])


def _eval(dataset, out, *opts, resume=False):
    res = train_net.main(_args(dataset, out, *opts, resume=resume))
    return res.get(dataset, res)


def _results(out, dataset):
    with open(os.path.join(str(out), "inference", dataset, "lvis_instances_results.json")) as f:
        return json.load(f)


def _key(d):
    return d["image_id"], d["category_id"], tuple(np.round(d["bbox"], 3)), round(d["score"], 4)  # batches: ~1e-6


@pytest.fixture
def count_images(monkeypatch):
    """Counts the images the model runs on; `count_images.fail_after = n` kills the run (an
    exception) when the model meets image n + 1."""
    seen = []
    inference = RegionSpot.inference

    def spy(self, batched_inputs):
        for _ in batched_inputs:
            if spy.fail_after is not None and len(seen) >= spy.fail_after:
                raise KeyboardInterrupt("killed by the test")
            seen.append(1)
        return inference(self, batched_inputs)

    spy.fail_after = None
    spy.seen = seen
    monkeypatch.setattr(RegionSpot, "inference", spy)
    return spy


@pytest.fixture(scope="module")
def full_run(synthetic_val, tmp_path_factory):
    """A whole run of the random-head tiny model (AP well below 100, so the figures say something):
    (output folder, metrics)."""
    out = tmp_path_factory.mktemp("full")
    return out, _eval(synthetic_val, out, "MODEL.REGIONSPOT.EVAL.IMAGES_PER_SHARD", "4")


def test_metrics_and_results_equal_detectron2s_in_memory_route(synthetic_val, full_run, tmp_path, monkeypatch):
    out, res = full_run
    monkeypatch.setattr(RegionSpotTrainer, "build_evaluator", classmethod(
        lambda cls, cfg, name, output_folder=None: _OldLVISEvaluator(
            name, ("bbox", "segm"), True, os.path.join(cfg.OUTPUT_DIR, "inference", name), max_dets_per_image=300)))
    old = _eval(synthetic_val, tmp_path)
    for task in ("bbox", "segm"):
        assert set(res[task]) == set(old[task]) == set(LVIS_METRICS)  # metrics.json keys unchanged
        assert all(abs(res[task][m] - old[task][m]) < 1e-6 for m in LVIS_METRICS), (task, res[task], old[task])
    assert 0 < res["bbox"]["AP"] < 90  # random head: the figures say something (random SAM: segm AP 0)
    ours, theirs = _results(out, synthetic_val), _results(tmp_path, synthetic_val)
    assert len(ours) == len(theirs) > 0
    assert sorted(map(_key, ours)) == sorted(map(_key, theirs))
    # Each process streamed its images to shards of at most 4 images; together they hold all 6 once.
    folder = shards.results_folder(os.path.join(out, "inference", synthetic_val))
    files = shards.shard_files(folder)
    assert [os.path.basename(f) for f in files] == ["rank0-part00000.jsonl", "rank0-part00001.jsonl"]
    assert len(shards.completed_image_ids(folder)) == 6
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_resume_after_a_kill_runs_only_the_missing_images(synthetic_val, full_run, tmp_path, count_images):
    opts = ("MODEL.REGIONSPOT.EVAL.IMAGES_PER_SHARD", "3")
    count_images.fail_after = 4  # image 5 kills it: shard 0 (images 1-3) is complete, image 4's is not
    with pytest.raises(KeyboardInterrupt):
        _eval(synthetic_val, tmp_path, *opts)
    folder = shards.results_folder(os.path.join(tmp_path, "inference", synthetic_val))
    assert len(shards.completed_image_ids(folder)) == 3
    assert [n for n in os.listdir(folder) if n.endswith(".tmp")]  # the open shard, never renamed

    count_images.fail_after, count_images.seen[:] = None, []
    # How it runs may change (shard size, batch): the detections do not.
    res = _eval(synthetic_val, tmp_path, "MODEL.REGIONSPOT.EVAL.IMAGES_PER_SHARD", "2",
                "MODEL.REGIONSPOT.TEST_IMS_PER_BATCH", "2", resume=True)
    assert len(count_images.seen) == 3  # images 4-6 only: the loader never gave the model the others
    _, full = full_run
    for task in ("bbox", "segm"):
        assert all(abs(res[task][m] - full[task][m]) < 1e-6 for m in LVIS_METRICS), (task, res[task], full[task])
    assert sorted(map(_key, _results(tmp_path, synthetic_val))) == sorted(map(_key, _results(full_run[0], synthetic_val)))

    # Resuming a complete run evaluates again without running the model; a plain run starts over.
    count_images.seen[:] = []
    again = _eval(synthetic_val, tmp_path, *opts, resume=True)
    assert count_images.seen == [] and again == res
    _eval(synthetic_val, tmp_path, *opts)
    assert len(count_images.seen) == 6


def test_resume_with_another_configuration_is_refused(synthetic_val, tmp_path, count_images):
    count_images.fail_after = 2
    with pytest.raises(KeyboardInterrupt):
        _eval(synthetic_val, tmp_path, "MODEL.REGIONSPOT.EVAL.IMAGES_PER_SHARD", "1")
    count_images.fail_after = None
    with pytest.raises(ValueError, match="another configuration"):
        _eval(synthetic_val, tmp_path, "MODEL.REGIONSPOT.EVAL.IMAGES_PER_SHARD", "1", "TEST.DETECTIONS_PER_IMAGE",
              "100", resume=True)


def test_unknown_engine_is_refused_before_inference(synthetic_val, tmp_path, count_images):
    with pytest.raises(ValueError, match="EVAL.ENGINE"):
        _eval(synthetic_val, tmp_path, "MODEL.REGIONSPOT.EVAL.ENGINE", "fastest")
    assert count_images.seen == []


# ------------------------------------------------------------------------------ evaluators alone
def _fake_outputs(json_file, num_classes, seed=0, per_image=30):
    """Per image: (input, output) with random boxes, classes and scores, and masks."""
    data = json.load(open(json_file))
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for img in data["images"]:
        h, w = img["height"], img["width"]
        inst = Instances((h, w))
        xy = torch.rand(per_image, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(per_image, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4]) + 2
        inst.pred_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.scores = torch.rand(per_image, generator=g)
        inst.pred_classes = torch.randint(0, num_classes, (per_image,), generator=g)
        inst.pred_masks = torch.rand(per_image, h, w, generator=g) > 0.5
        pairs.append(({"image_id": img["id"]}, {"instances": inst}))
    return pairs


def _run_evaluator(ev, pairs):
    ev.reset()
    for inp, out in pairs:
        ev.process([inp], [out])
    return ev.evaluate()


@pytest.mark.parametrize("engine", ["reference", "faster_coco_eval"])
def test_coco_evaluator_equals_detectron2s(synthetic_val, tmp_path, engine):
    # The synthetic LVIS file registered as a COCO-format set (ids mapped to contiguous classes).
    meta = MetadataCatalog.get(synthetic_val)
    name = f"test_eval_at_scale_coco_{engine}"
    data = json.load(open(meta.json_file))
    for a in data["annotations"]:
        a["iscrowd"] = 0
    coco_json = str(tmp_path / "coco.json")
    json.dump(data, open(coco_json, "w"))
    cats = sorted(data["categories"], key=lambda c: c["id"])
    MetadataCatalog.get(name).set(json_file=coco_json, evaluator_type="coco",
                                  thing_classes=[c["name"] for c in cats],
                                  thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)})
    classes = MetadataCatalog.get(name).thing_classes
    pairs = _fake_outputs(meta.json_file, len(classes))
    ours = _run_evaluator(RegionSpotCOCOEvaluator(name, ("bbox", "segm"), True, str(tmp_path / "a"),
                                                  max_dets_per_image=300, engine=engine, images_per_shard=2), pairs)
    theirs = _run_evaluator(COCOEvaluator(name, ("bbox", "segm"), True, str(tmp_path / "b"),
                                          max_dets_per_image=300, use_fast_impl=False), pairs)
    for task in ("bbox", "segm"):
        assert set(ours[task]) == set(theirs[task])  # the 6 figures and every AP-<class>
        for k, v in theirs[task].items():
            assert (np.isnan(v) and np.isnan(ours[task][k])) or abs(ours[task][k] - v) < 1e-6, (task, k)
    a = json.load(open(tmp_path / "a" / "coco_instances_results.json"))
    b = json.load(open(tmp_path / "b" / "coco_instances_results.json"))
    assert sorted(map(_key, a)) == sorted(map(_key, b))


def test_lvis_evaluator_without_output_folder(synthetic_val):
    meta = MetadataCatalog.get(synthetic_val)
    pairs = _fake_outputs(meta.json_file, len(meta.thing_classes), seed=1)
    ours = _run_evaluator(RegionSpotLVISEvaluator(synthetic_val, ("bbox",), True, None), pairs)
    patch_lvis_for_numpy2()
    theirs = _run_evaluator(_OldLVISEvaluator(synthetic_val, ("bbox",), True, None), pairs)
    assert all(abs(ours["bbox"][m] - theirs["bbox"][m]) < 1e-6 for m in LVIS_METRICS)


# ------------------------------------------------------------------------------ distributed
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_eval(args, path):
    res = train_net.main(args)
    from detectron2.utils import comm
    torch.save(res, f"{path}.rank{comm.get_rank()}")


def test_two_cpu_processes_write_their_shards_and_rank0_evaluates(synthetic_val, oracle, tmp_path, monkeypatch):
    # The oracle's weights: a random head would differ between the processes (seeded SEED + rank).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    meta = MetadataCatalog.get(synthetic_val)
    name = "test_eval_at_scale_ddp"  # registered in each spawned process from the config
    register = f'[["{name}", "{meta.json_file}", "{meta.image_root}", "lvis"]]'
    opts = ("MODEL.REGIONSPOT.REGISTER_DATASETS", register, "MODEL.REGIONSPOT.EVAL.IMAGES_PER_SHARD", "2",
            "MODEL.WEIGHTS", oracle)
    args = _args(name, tmp_path / "out", *opts)
    args.num_gpus = 2
    args.dist_url = f"tcp://127.0.0.1:{_free_port()}"
    launch(_distributed_eval, 2, num_machines=1, machine_rank=0, dist_url=args.dist_url,
           args=(args, str(tmp_path / "res")))
    folder = shards.results_folder(str(tmp_path / "out" / "inference" / name))
    names = [os.path.basename(f) for f in shards.shard_files(folder)]
    assert {n.split("-")[0] for n in names} == {"rank0", "rank1"}  # each process wrote its own
    assert len(shards.completed_image_ids(folder)) == 6
    res = torch.load(f"{tmp_path / 'res'}.rank0", weights_only=False)
    assert torch.load(f"{tmp_path / 'res'}.rank1", weights_only=False) == {}  # rank 1 does not evaluate
    one = _eval(name, tmp_path / "one", *opts)
    res = res.get(name, res)
    for task in ("bbox", "segm"):
        assert all(abs(res[task][m] - one[task][m]) < 1e-6 for m in LVIS_METRICS), (task, res[task], one[task])

    def key(d):
        return d["image_id"], d["category_id"], tuple(np.round(d["bbox"], 2)), round(d["score"], 4)

    two = _results(tmp_path / "out", name)
    assert len(two) > 0 and sorted(map(key, two)) == sorted(map(key, _results(tmp_path / "one", name)))


def _lazy_eval(dataset, output_dir, checkpoint, per_shard, resume=False):
    """`train_net.main` on the tiny LazyConfig, --eval-only (and --resume)."""
    from conftest import CONFIG_DIR

    return train_net.main(default_argument_parser().parse_args(
        ["--config-file", os.path.join(CONFIG_DIR, "lazy", "RegionSpot-tiny_synthetic.py"), "--eval-only"]
        + (["--resume"] if resume else [])
        + [f"dataloader.test.dataset.name={dataset}", f"train.init_checkpoint={checkpoint}",
           f"train.output_dir={output_dir}", f"dataloader.evaluator.images_per_shard={per_shard}",
           "model.sam.checkpoint=random", "model.clip.checkpoint=random", "model.clip.input_size=128"]))


def test_lazy_config_eval_resumes_too(synthetic_val, oracle, tmp_path, count_images):
    def run(resume=False):
        return _lazy_eval(synthetic_val, tmp_path, oracle, 2, resume)

    count_images.fail_after = 3  # images 1-2 complete, image 3's shard open
    with pytest.raises(KeyboardInterrupt):
        run()
    count_images.fail_after, count_images.seen[:] = None, []
    resumed = run(resume=True)
    assert len(count_images.seen) == 4
    count_images.seen[:] = []
    assert run() == resumed and len(count_images.seen) == 6


def test_lazy_config_resume_of_another_checkpoint_is_refused(synthetic_val, oracle, tmp_path, count_images):
    count_images.fail_after = 2
    with pytest.raises(KeyboardInterrupt):
        _lazy_eval(synthetic_val, tmp_path, oracle, 1)
    count_images.fail_after = None
    with pytest.raises(ValueError, match="another configuration"):
        _lazy_eval(synthetic_val, tmp_path, "", 1, resume=True)


def test_eval_resume_with_empty_weights_beside_a_trained_checkpoint_is_refused(synthetic_val, tmp_path, count_images):
    # detectron2's --resume would evaluate OUTPUT_DIR's last checkpoint; ours continues an
    # evaluation of MODEL.WEIGHTS, so an empty one there would silently evaluate a random head.
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    with pytest.raises(ValueError, match="MODEL.WEIGHTS, which is empty"):
        _eval(synthetic_val, tmp_path, resume=True)
    assert count_images.seen == []


def test_training_refuses_eval_resume(tmp_path):
    from conftest import tiny_cfg

    cfg = tiny_cfg("MODEL.REGIONSPOT.EVAL.RESUME", "True", "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="in training, every evaluation starts afresh"):
        RegionSpotTrainer(cfg)


def test_results_another_machine_wrote_but_this_one_cannot_read_are_an_error(synthetic_val, tmp_path):
    ev = RegionSpotLVISEvaluator(synthetic_val, ("bbox",), True, str(tmp_path), max_dets_per_image=300)
    ev.reset()
    ev._writer.close()
    with pytest.raises(RuntimeError, match="filesystem every machine shares"):
        ev._evaluate_shards(None, {123456})
