"""Every backbone pair through every entry point: SAM or SAM 2 with OpenAI CLIP or open_clip
(tiny random models built from each package's own classes).

Per pair: `--eval-only` with an oracle head gives box AP 100 (the head widths come from the
encoders, and the oracle is solved on the pair's own tokens); training runs a few steps on cached
tokens (extracted by the pair's SAM, keyed by its type) and online; the predictor, the demo, the
ROI-head plug-in route and the benchmark run on it; the text-embedding cache is keyed by the
text model.
"""
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

import train_net
from regionspot.data.token_cache import load_tokens, token_cache_folder, token_file
from regionspot.data.token_extraction import extract_tokens
from regionspot.predictor import RegionSpotPredictor

from conftest import (PLUGIN_CONFIG, PLUGIN_TINY, ROOT, TINY_CONFIG, _gt_by_image, gt_proposals_file, load_tool,
                      make_oracle_checkpoint, tiny_cfg)

SAM2 = ("MODEL.REGIONSPOT.SAM.TYPE", "sam2_tiny", "MODEL.REGIONSPOT.SAM.CHECKPOINT", "random")
OPEN_CLIP = ("MODEL.REGIONSPOT.CLIP.BACKEND", "open_clip", "MODEL.REGIONSPOT.CLIP.NAME", "tiny",
             "MODEL.REGIONSPOT.CLIP.CHECKPOINT", "random", "MODEL.REGIONSPOT.CLIP.INPUT_SIZE", "64")
OPEN_CLIP_TIMM = ("MODEL.REGIONSPOT.CLIP.BACKEND", "open_clip", "MODEL.REGIONSPOT.CLIP.NAME", "tiny-timm",
                  "MODEL.REGIONSPOT.CLIP.CHECKPOINT", "random", "MODEL.REGIONSPOT.CLIP.INPUT_SIZE", "160")
PAIRS = {
    "sam+clip": (),
    "sam+open_clip-timm": OPEN_CLIP_TIMM,
    "sam2+clip": SAM2,
    "sam+open_clip": OPEN_CLIP,
    "sam2+open_clip": SAM2 + OPEN_CLIP,
}
# The synthetic images are 192 x 256: these sizes keep them as they are.
NO_RESIZE = ("INPUT.MIN_SIZE_TRAIN", "(192,)", "INPUT.MAX_SIZE_TRAIN", "256")


@pytest.fixture(params=sorted(PAIRS), scope="module")
def pair(request):
    return request.param, PAIRS[request.param]


def _run(tmp_path, *opts, eval_only=False):
    argv = ["--config-file", TINY_CONFIG] + (["--eval-only"] if eval_only else [])
    args = default_argument_parser().parse_args(argv + ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path), *opts])
    return train_net.main(args)


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_eval_only_with_an_oracle_head_gives_box_ap_100(pair, synthetic_val, tmp_path):
    _, opts = pair
    weights = make_oracle_checkpoint(tiny_cfg(*opts), synthetic_val, tmp_path / "oracle.pth", original_layout=False)
    res = _run(tmp_path / "out", "DATASETS.TEST", f'("{synthetic_val}",)', "MODEL.WEIGHTS", weights, *opts,
               eval_only=True)
    res = res.get(synthetic_val, res)
    assert res["bbox"]["AP"] > 99.9
    assert "AP" in res["segm"]  # masks are evaluated too (the mask frames are checked in the encoders' tests)


def test_training_on_cached_and_on_online_tokens(pair, synthetic_val, tmp_path):
    name, opts = pair
    cfg = tiny_cfg(*opts)
    model = build_model(cfg).eval()
    root = str(tmp_path / "tokens")
    summary = extract_tokens(model.sam_encoder, cfg, synthetic_val, root)
    assert summary.images == len(DatasetCatalog.get(synthetic_val)) and not summary.failed
    # Token files are keyed by the backbone, and hold the pair's own token width.
    folder = token_cache_folder(root, synthetic_val, cfg.MODEL.REGIONSPOT.SAM.TYPE)
    assert os.path.basename(folder) == cfg.MODEL.REGIONSPOT.SAM.TYPE
    d = DatasetCatalog.get(synthetic_val)[0]
    cached = load_tokens(token_file(folder, d["image_id"]), d["image_id"])
    assert cached["tokens"].shape == (len(d["annotations"]), model.sam_encoder.token_dim)

    head0 = {k: v.clone() for k, v in model.head.state_dict().items()}
    common = ("DATASETS.TRAIN", f'("{synthetic_val}",)', "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2",
              "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "100",
              "SOLVER.BASE_LR", "0.001", "SEED", "1", *NO_RESIZE, *opts)
    for mode in ("cached", "online"):
        out = str(tmp_path / mode)
        _run(out, "MODEL.REGIONSPOT.TOKEN_MODE", mode, "MODEL.REGIONSPOT.TOKEN_CACHE_DIR", root, *common)
        losses = [m["total_loss"] for m in _metrics(out) if "total_loss" in m]
        assert losses and np.isfinite(losses).all() and all(v > 0 for v in losses), (name, mode, losses)
        final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)["model"]
        assert final and all(k.startswith("head.") for k in final)
        moved = [k for k, v in head0.items() if not torch.equal(final["head." + k], v)]
        assert len(moved) == len(head0), (mode, set(head0) - set(moved))


def test_predictor_gives_the_pipelines_scores(pair, synthetic_val):
    _, opts = pair
    cfg = tiny_cfg(*opts, "INPUT.MIN_SIZE_TEST", "0")
    predictor = RegionSpotPredictor(cfg)
    d = DatasetCatalog.get(synthetic_val)[0]
    boxes, _ = _gt_by_image(synthetic_val)[d["image_id"]]

    image = read_image(d["file_name"], format="RGB")  # (H, W, 3) uint8
    predictor.set_image(image)
    res = predictor.predict(boxes=boxes, vocabulary=synthetic_val)
    probs = res.class_scores
    assert probs is not None and probs.shape == (len(boxes), len(predictor.vocabulary_embeddings(synthetic_val)[0]))
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(boxes)), atol=1e-5, rtol=0)
    assert res.masks.shape[-2:] == image.shape[:2]

    # The same boxes through the model's own pipeline steps give the same probabilities.
    model = predictor.model
    x = torch.as_tensor(image).permute(2, 0, 1)
    sam_emb, _, clip_tokens = model.encode_images([x])
    tokens, _ = model.decode_regions(sam_emb[0], tuple(x.shape[-2:]), boxes=torch.as_tensor(boxes, dtype=torch.float32))
    emb = model.embed_regions([tokens], clip_tokens)[0]
    direct = model.probabilities(emb, model.text_embeddings(synthetic_val)[1])
    torch.testing.assert_close(probs, direct, atol=1e-5, rtol=1e-4)


def test_text_embedding_cache_is_keyed_by_the_text_model(synthetic_val):
    base = build_model(tiny_cfg()).eval()
    other = build_model(tiny_cfg(*OPEN_CLIP)).eval()
    assert base.vocabulary.fingerprint != other.vocabulary.fingerprint
    names_a, a = base.text_embeddings(synthetic_val)
    names_b, b = other.text_embeddings(synthetic_val)
    assert names_a == names_b
    assert a.shape[1] == base.clip_encoder.text_dim and b.shape[1] == other.clip_encoder.text_dim
    # Rebuilt, the open_clip model finds its own entry, not the OpenAI CLIP one.
    again = build_model(tiny_cfg(*OPEN_CLIP)).eval()
    torch.testing.assert_close(again.text_embeddings(synthetic_val)[1], b)


def test_benchmark_runs_and_counts_flops_for_each_new_backbone():
    benchmark = load_tool("benchmark")
    for argv in (["--sam", "sam2_tiny", "--clip", "tiny"], ["--sam", "tiny", "--clip-backend", "open_clip", "--clip", "tiny",
                                                           "--clip-size", "64"]):
        args = benchmark.parse_args([*argv, "--device", "cpu", "--boxes", "4"])
        model = benchmark.build(args, "")
        flops = benchmark.count_flops(model, benchmark.make_inputs(args, 1)[0])
        assert set(flops) >= {"sam_encoder", "mask_decoder", "clip"} and all(v > 0 for v in flops.values()), flops
        eight = benchmark.count_flops(model, benchmark.make_inputs(benchmark.parse_args(
            [*argv, "--device", "cpu", "--boxes", "8"]), 1)[0])
        # The decoder's cost grows with the boxes, the encoders' does not.
        assert eight["mask_decoder"] > flops["mask_decoder"]
        assert eight["sam_encoder"] == flops["sam_encoder"] and eight["clip"] == flops["clip"]


def test_roi_head_plug_in_with_an_oracle_head_gives_box_ap_100(pair, synthetic_val, tmp_path):
    """The RegionSpot ROI head in detectron2's GeneralizedRCNN, gt boxes as precomputed proposals."""
    _, opts = pair
    oracle = make_oracle_checkpoint(tiny_cfg(*opts), synthetic_val, tmp_path / "oracle.pth", original_layout=False)
    proposals = gt_proposals_file(tmp_path, synthetic_val)
    args = default_argument_parser().parse_args([
        "--config-file", PLUGIN_CONFIG, "--eval-only", "OUTPUT_DIR", str(tmp_path / "out"), *PLUGIN_TINY, *opts,
        "MODEL.PROPOSAL_GENERATOR.NAME", "PrecomputedProposals", "MODEL.LOAD_PROPOSALS", "True",
        "DATASETS.TEST", f'("{synthetic_val}",)', "DATASETS.PROPOSAL_FILES_TEST", f'("{proposals}",)',
        "MODEL.REGIONSPOT.HEAD_WEIGHTS", oracle, "TEST.DETECTIONS_PER_IMAGE", "1000"])
    res = train_net.main(args)
    res = res.get(synthetic_val, res)
    assert res["bbox"]["AP"] > 99.9


def test_demo_draws_and_writes_json(pair, synthetic_val, tmp_path):
    _, opts = pair
    demo = load_tool("demo")
    d = DatasetCatalog.get(synthetic_val)[0]
    boxes, _ = _gt_by_image(synthetic_val)[d["image_id"]]
    box_file = tmp_path / "boxes.json"
    box_file.write_text(json.dumps({os.path.basename(d["file_name"]): boxes.tolist()}))
    out, js = tmp_path / "drawn.png", tmp_path / "dets.json"
    rc = demo.main(["--config-file", TINY_CONFIG, "--input", d["file_name"], "--output", str(out),
                    "--json-output", str(js), "--boxes", str(box_file), "--vocabulary", synthetic_val,
                    "--opts", "MODEL.DEVICE", "cpu", *opts])
    assert rc == 0 and out.stat().st_size > 0
    dets = json.loads(js.read_text())
    assert len(dets) == len(boxes) and all(0 <= x["score"] <= 1 for x in dets)


def _lazy_args(opts):
    """A pair's yacs overrides as the LazyConfig builder's `sam` / `clip` arguments."""
    sam, clip = {}, {}
    for key, value in zip(opts[::2], opts[1::2]):
        node, name = key.split(".")[-2:]
        (sam if node == "SAM" else clip)[name.lower()] = int(value) if value.isdigit() else value
    return sam, clip


def test_lazy_config_builds_the_same_model_as_yacs(pair):
    from detectron2.config import LazyConfig, instantiate

    _, opts = pair
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "lazy", "RegionSpot-tiny_synthetic.py"))
    sam, clip = _lazy_args(opts)
    cfg.model.sam = {"type": "tiny", "checkpoint": "random", **sam}
    cfg.model.clip = {"name": "tiny", "checkpoint": "random", "input_size": 128, **clip}
    cfg.model.head.dim_feedforward = 256
    lazy = instantiate(cfg.model)
    yacs = build_model(tiny_cfg(*opts))
    assert type(lazy.sam_encoder) is type(yacs.sam_encoder) and type(lazy.clip_encoder) is type(yacs.clip_encoder)
    a, b = lazy.state_dict(), yacs.state_dict()
    assert a.keys() == b.keys()
    frozen = [k for k in a if not k.startswith("head.")]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)  # same seeded random encoders
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
