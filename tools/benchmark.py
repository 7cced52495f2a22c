#!/usr/bin/env python
"""Per-image time and peak memory of RegionSpot with real-size encoders (random weights).

    python tools/benchmark.py --sam vit_b --clip ViT-L/14 --boxes 12 --images 3 [--autocast bf16]
    python tools/benchmark.py --sam sam2.1_hiera_b+ --clip-backend open_clip --clip ViT-L-14-quickgelu
    python tools/benchmark.py ... --compare-autocast bf16      # fp32 vs bf16: speed-up and agreement
    python tools/benchmark.py ... --boxes 300 --max-rss-gb 6     # fails (exit 1) above the bound
    python tools/benchmark.py ... --roofline                     # distance to the matmul roofline

Stages are timed by wrapping the model's own methods: SAM image encoder, SAM mask decoder (all
boxes), CLIP image tower, head (fusion head + classification + top-K) and masks (pasting kept
masks at full size); "other" is the rest of the end-to-end time (preprocessing, glue). Inputs are
synthetic images with random boxes; the vocabulary is random unit vectors of --num-classes
classes (text encoding is cached in real use, so it is not part of per-image cost).

--pipeline N times the whole evaluation path instead: N JPEG images with --boxes boxes each, as
an LVIS-format set of --num-classes classes, through detectron2's test loader (--workers decoding
processes, --batch images per forward), the model, and LVISEvaluator.process (RLE encoding of the
kept masks, detections to JSON), after --warmup batches. That is the per-image cost of an
`--eval-only` run; the final LVIS evaluation (once per run) is timed apart with --evaluate.
--pipeline-seconds bounds the timed part, for a measurement that must fit a time budget. Its
"masks" is making the kept masks (run lengths from the low-res logits; --mask-route dense: dense
pastes) and "rle" the RLE encoding inside the evaluator's process. Random SAM
weights give masks over about two thirds of the image; --box-masks makes each box's low-res logits
box-shaped instead (positive inside the box), like a trained SAM's mask of the prompted object.

--lvis-eval-size N measures the final evaluation alone at LVIS scale: a synthetic LVIS-like results
set of N images (19809 = LVIS v1 val) with 300 detections each, masks as RLE (made once, cached
under --lvis-eval-root), evaluated bbox+segm by RegionSpot's route (results shards on disk,
regionspot.fast_eval by chunks of categories) at N, and by detectron2's LVISEvaluator with the
`lvis` package on an in-memory list at each --lvis-eval-baseline size, extrapolated linearly to
N. Each measurement runs in its own process (its peak RSS is its own). The figures of both
routes at the first baseline size must agree to 1e-6.

    python tools/benchmark.py --lvis-eval-size 19809 --lvis-eval-baseline 1000,2000

--roofline counts the FLOPs of one image through the SAM encoder, the mask decoder (--boxes
boxes) and the CLIP image tower (torch's FlopCounterMode, attention through its math kernel so
that every matmul is seen), measures the device's own square-matmul rate in the run's precision,
and reports the time those FLOPs would take at that rate against the measured time (with
--pipeline: against the pipeline's per-stage and per-image times).
"""
import regionspot.warnings_filter  # noqa: F401  (first: known-harmless warnings of the libraries)
import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections import defaultdict
from typing import Tuple

import numpy as np
from PIL import Image

import regionspot  # noqa: F401
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from regionspot.config import get_regionspot_cfg
from regionspot.modeling.region_pipeline import AUTOCAST_DTYPES

BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "Base-RegionSpot.yaml")
STAGES = ("sam_encoder", "mask_decoder", "clip", "head", "masks")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sam", default="vit_b")
    p.add_argument("--clip", default="ViT-L/14", help="CLIP model name (of the --clip-backend package)")
    p.add_argument("--clip-backend", default="clip", choices=["clip", "open_clip"],
                   help="package of the vision-language model (MODEL.REGIONSPOT.CLIP.BACKEND)")
    p.add_argument("--clip-size", type=int, default=224)
    p.add_argument("--image-size", default="1024x768", help="WxH of the synthetic images")
    p.add_argument("--boxes", type=int, default=12, help="box prompts per image")
    p.add_argument("--num-classes", type=int, default=1203, help="vocabulary size (LVIS: 1203)")
    p.add_argument("--images", type=int, default=3, help="timed images (after one warm-up image)")
    p.add_argument("--batch", type=int, default=1, help="images per forward")
    p.add_argument("--top-k", type=int, default=300)
    p.add_argument("--no-masks", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autocast", default="", choices=["", "bf16", "fp16"])
    p.add_argument("--compare-autocast", default="", choices=["", "bf16", "fp16"],
                   help="run fp32 and this precision on the same inputs; report speed-up and agreement")
    p.add_argument("--compare-opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="run without and with these config overrides, alternating per image, e.g. "
                        "MODEL.REGIONSPOT.SAM.FUSED_ATTENTION False")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--max-rss-gb", type=float, default=0.0,
                   help="exit 1 if peak RSS exceeds this (CPU; measure one precision at a time)")
    p.add_argument("--pipeline", type=int, default=0, metavar="N",
                   help="time N images through the test loader, the model and the LVIS evaluator")
    p.add_argument("--pipeline-root", default=os.path.join(tempfile.gettempdir(), "regionspot_benchmark"),
                   help="where --pipeline writes its images (made once per set of parameters)")
    p.add_argument("--workers", type=int, default=4, help="--pipeline: loader worker processes")
    p.add_argument("--warmup", type=int, default=1, help="--pipeline: untimed first batches")
    p.add_argument("--pipeline-seconds", type=float, default=0.0, metavar="S",
                   help="--pipeline: stop after S timed seconds (0 = time all N images)")
    p.add_argument("--evaluate", action="store_true", help="--pipeline: also time the final LVIS evaluation")
    p.add_argument("--box-masks", action="store_true",
                   help="--pipeline: box-shaped low-res mask logits (SAM types), like trained SAM's masks")
    p.add_argument("--mask-route", choices=("runs", "dense"), default="runs",
                   help="how evaluation's masks are made: run lengths from the low-res logits (runs, the "
                        "model's) or dense (N, H, W) windowed pastes encoded by the evaluator (dense)")
    p.add_argument("--roofline", action="store_true",
                   help="also report FLOPs per image and the distance to the measured matmul rate")
    p.add_argument("--json", default="", help="append the result as a JSON line to this file")
    p.add_argument("--startup", default="", metavar="VOCABULARY",
                   help="instead: time building the model and VOCABULARY's text embeddings, cold "
                        "(encoding, filling the cache) then warm (from the cache)")
    p.add_argument("--templates", default="ensemble", help="template set for --startup")
    add_lvis_eval_args(p)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides KEY VALUE ..., e.g. MODEL.REGIONSPOT.SAM.FUSED_ATTENTION False")
    return p.parse_args(argv)


def startup(args) -> dict:
    """Build + vocabulary embeddings, first with an empty cache entry, then warm."""
    times = {}
    for phase in ("cold", "warm"):
        t0 = time.perf_counter()
        model = build(args, args.autocast, templates=args.templates)
        t1 = time.perf_counter()
        names, _ = model.text_embeddings(args.startup)
        t2 = time.perf_counter()
        times[phase] = {"build_s": t1 - t0, "vocabulary_s": t2 - t1, "total_s": t2 - t0}
        print(f"{phase}: build {t1 - t0:.1f} s + {args.startup} vocabulary ({len(names)} classes x "
              f"{len(model.vocabulary.templates)} templates) {t2 - t1:.1f} s = {t2 - t0:.1f} s", flush=True)
        del model
    return times


def bench_cfg(args, autocast: str, templates: str = "ensemble", extra_opts=()):
    cfg = get_regionspot_cfg(BASE_CONFIG)
    c = cfg.MODEL.REGIONSPOT
    c.SAM.TYPE, c.SAM.CHECKPOINT = args.sam, "random"
    c.CLIP.BACKEND, c.CLIP.NAME, c.CLIP.CHECKPOINT = args.clip_backend, args.clip, "random"
    c.CLIP.INPUT_SIZE = args.clip_size
    c.AUTOCAST = autocast
    c.TEXT.TEMPLATES = templates
    cfg.TEST.DETECTIONS_PER_IMAGE = args.top_k
    c.MASK_ON = not args.no_masks
    cfg.MODEL.DEVICE = args.device
    cfg.merge_from_list(list(args.opts) + list(extra_opts))
    return cfg


def build(args, autocast: str, templates: str = "ensemble", extra_opts=(), cfg=None, vocabulary="bench"):
    """The model with random weights, and random unit vectors as `vocabulary`'s class embeddings."""
    cfg = cfg or bench_cfg(args, autocast, templates, extra_opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    text = F.normalize(torch.randn(args.num_classes, model.clip_encoder.text_dim), dim=-1)
    model.vocabulary.register(vocabulary, [f"class{i}" for i in range(args.num_classes)], text)
    return model


def make_inputs(args, n: int, seed: int = 0):
    w, h = (int(v) for v in args.image_size.split("x"))
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for i in range(n):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        xy = torch.rand(args.boxes, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = (torch.rand(args.boxes, 2, generator=g) * 0.3 + 0.05) * torch.tensor([w, h])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inputs.append({"image": image, "height": h, "width": w, "instances": inst, "vocabulary": "bench",
                       "image_id": i})
    return inputs


class StageTimer:
    """Wraps the model's stage methods with timers (synchronising CUDA so times are real)."""

    def __init__(self, model):
        self.model, self.times = model, defaultdict(float)
        self._sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        targets = {
            "sam_encoder": (model.sam_encoder, "encode_images"),
            "mask_decoder": (model, "decode_regions"),
            "clip": (model.clip_encoder, "encode_image_tokens"),
            "head": (model, "embed_regions"),
            "masks": (model, "detection_masks"),
        }
        for stage, (obj, name) in targets.items():
            setattr(obj, name, self._timed(stage, getattr(obj, name)))
        model.probabilities = self._timed("head", model.probabilities)  # classification
        detections = model.detections

        def timed_detections(*a, **k):  # top-K belongs to "head"; pasting is timed inside
            t0 = self._now()
            before = self.times["masks"]
            out = detections(*a, **k)
            self.times["head"] += self._now() - t0 - (self.times["masks"] - before)
            return out

        model.detections = timed_detections

    def _now(self):
        self._sync()
        return time.perf_counter()

    def _timed(self, stage, fn):
        def wrapper(*a, **k):
            t0 = self._now()
            out = fn(*a, **k)
            self.times[stage] += self._now() - t0
            return out
        return wrapper


def run(args, variants):
    """Time each (label, autocast, config overrides) variant on the same images, alternating per
    image so that a noisy, shared machine slows them alike; returns per label (per-image stage
    times, outputs, region embeddings of the first image)."""
    modes = [label for label, _, _ in variants]
    models = {label: build(args, autocast, extra_opts=opts) for label, autocast, opts in variants}
    timers = {m: StageTimer(model) for m, model in models.items()}
    warm = make_inputs(args, args.batch, seed=1)
    warmup_s = {}
    for m, model in models.items():
        t0 = timers[m]._now()
        model(warm)
        warmup_s[m] = timers[m]._now() - t0
        timers[m].times.clear()
    inputs = make_inputs(args, args.images)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    totals = {m: 0.0 for m in modes}
    outputs = {m: [] for m in modes}
    for i in range(0, len(inputs), args.batch):
        for m, model in models.items():
            t0 = timers[m]._now()
            outputs[m] += model(inputs[i:i + args.batch])
            totals[m] += timers[m]._now() - t0
    n = len(inputs)
    results = {}
    for m, model in models.items():
        per_image = {k: timers[m].times[k] / n for k in STAGES}
        per_image["total"] = totals[m] / n
        per_image["other"] = per_image["total"] - sum(per_image[k] for k in STAGES)
        # Region embeddings of the first image, for agreement checks (same inputs, same weights).
        with torch.no_grad():
            images = [inputs[0]["image"].to(model.device)]
            sam_emb, _, clip_tokens = model.encode_images(images)
            boxes = inputs[0]["instances"].gt_boxes.tensor.to(model.device)
            tokens, _ = model.decode_regions(sam_emb[0], tuple(images[0].shape[-2:]), boxes=boxes)
            emb = model.embed_regions([tokens], clip_tokens)[0].float().cpu()
        per_image["warmup_batch"] = warmup_s[m]
        results[m] = (per_image, outputs[m], emb)
    return results


def make_pipeline_dataset(args, root: str, classes) -> str:
    """Write --pipeline's JPEGs and LVIS-format json (once per parameters); return the json path."""
    w, h = (int(v) for v in args.image_size.split("x"))
    tag = f"{args.pipeline}x{w}x{h}_{args.boxes}boxes_{len(classes)}classes"
    json_path = os.path.join(root, f"bench_{tag}.json")
    if os.path.exists(json_path):
        return json_path
    folder = os.path.join(root, tag)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    images, annotations = [], []
    for i in range(args.pipeline):
        # Smooth colour fields with grain: decodes like a photo, unlike pure noise.
        low = rng.randint(0, 256, (h // 48 + 2, w // 48 + 2, 3)).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(pixels + rng.randint(-8, 9, pixels.shape), 0, 255).astype(np.uint8)
        fname = f"{i:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(folder, fname), quality=90)
        images.append({"id": i + 1, "width": w, "height": h, "coco_url": f"bench://{tag}/{fname}",
                       "neg_category_ids": [], "not_exhaustive_category_ids": []})
        for _ in range(args.boxes):
            bw, bh = (rng.rand(2) * 0.3 + 0.05) * (w, h)
            x0, y0 = rng.rand(2) * (w - bw, h - bh)
            poly = [x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "bbox": [x0, y0, bw, bh],
                                "category_id": int(rng.randint(len(classes))) + 1, "area": bw * bh,
                                "segmentation": [[float(v) for v in poly]]})
    categories = [{"id": k + 1, "name": n, "synonyms": [n], "frequency": "fcr"[k % 3]}
                  for k, n in enumerate(classes)]
    tmp = json_path + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    os.replace(tmp, json_path)
    return json_path


def pipeline(args) -> dict:
    """Images/s of the evaluation path: loader workers -> model -> LVISEvaluator.process."""
    from regionspot.evaluation import build_regionspot_evaluator
    from regionspot.data.synthetic import register_synthetic_lvis
    from regionspot.engine.trainer import RegionSpotTrainer

    name = "regionspot_benchmark_pipeline"
    classes = [f"class{i}" for i in range(args.num_classes)]
    json_path = make_pipeline_dataset(args, args.pipeline_root, classes)
    register_synthetic_lvis(name, json_path, args.pipeline_root, classes)
    cfg = bench_cfg(args, args.autocast)
    cfg.DATASETS.TEST = (name,)
    cfg.DATALOADER.NUM_WORKERS = args.workers
    cfg.MODEL.REGIONSPOT.TEST_IMS_PER_BATCH = args.batch
    model = build(args, args.autocast, cfg=cfg, vocabulary=name)
    loader = RegionSpotTrainer.build_test_loader(cfg, name)
    evaluator = build_regionspot_evaluator(cfg, name, os.path.join(args.pipeline_root, "eval"))
    evaluator.reset()
    if args.box_masks:
        box_shaped_masks(model.sam_encoder)
    if args.mask_route == "dense":
        dense_mask_route(model)
    timer = StageTimer(model)
    import regionspot.evaluation as evaluation
    encode_shared = evaluation._encode_shared  # the evaluator's RLE strings, timed apart (restored below)
    evaluation._encode_shared = timer._timed("rle", encode_shared)
    spent, timed, start = defaultdict(float), 0, None
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        previous = begin = timer._now()
        for b, inputs in enumerate(loader):
            got = timer._now()
            if b == args.warmup:  # compilation, allocator growth and worker start-up are behind us
                timer.times.clear()
                start = previous
            outputs = model(inputs)
            done_model = timer._now()
            evaluator.process(inputs, outputs)
            done = timer._now()
            if start is not None:
                spent["loader_wait"] += got - previous
                spent["model"] += done_model - got
                spent["evaluator_process"] += done - done_model
                timed += len(inputs)
            previous = done
            if start is not None and args.pipeline_seconds and done - start >= args.pipeline_seconds:
                break
    evaluation._encode_shared = encode_shared
    if not timed:
        raise SystemExit(f"--pipeline {args.pipeline} images in batches of {args.batch} leave nothing to time "
                         f"after --warmup {args.warmup} batches.")
    wall = previous - start
    per_image = {k: v / timed for k, v in spent.items()}
    per_image.update({k: timer.times[k] / timed for k in (*STAGES, "rle")})
    per_image["total"] = wall / timed
    out = {"images_timed": timed, "images_per_s": timed / wall, "per_image_s": per_image,
           "peak_gb": peak_memory_gb(args.device), "warmup_s": start - begin}
    print(f"pipeline: {timed} images in {wall:.1f} s = {timed / wall:.2f} img/s ({args.workers} loader workers, "
          f"batch {args.batch}, after {args.warmup} warm-up batches of {out['warmup_s']:.1f} s); "
          f"peak {'GPU' if args.device.startswith('cuda') else 'RSS'} {out['peak_gb']:.2f} GB")
    print("per image ms: " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in per_image.items()), flush=True)
    if args.roofline:
        rf, rate = pipeline_roofline(args, per_image)
        print_roofline("the pipeline", rf, rate, args.autocast or "fp32", args.boxes)
        out["roofline"] = {"matmul_flops_per_s": rate, **rf}
    if args.evaluate:
        t0 = time.perf_counter()
        evaluator.evaluate()
        out["evaluate_s"] = time.perf_counter() - t0
        print(f"final LVIS evaluation of {args.pipeline} images: {out['evaluate_s']:.1f} s", flush=True)
    return out


def dense_mask_route(model) -> None:
    """--mask-route dense: the kept boxes' masks pasted as (N, H, W) booleans within their windows,
    which the evaluator then RLE-encodes column by column (the route before run lengths)."""
    from regionspot.structures import IndexedMasks

    def dense(low_res, input_size, out_size, index):
        masks, windows = model.sam_encoder.paste_masks(low_res, input_size, out_size, fast=model.fast_mask_paste,
                                                       return_windows=True)
        return IndexedMasks(masks, index, windows)

    model.detection_masks = dense


def box_shaped_masks(enc) -> None:
    """--box-masks: `enc.decode_prompts` gives, per box, low-res logits of the box's shape (their
    own magnitude plus 0.5, positive inside the box and negative outside)."""
    if not hasattr(enc, "transform"):
        raise SystemExit("--box-masks supports the SAM types (not SAM 2).")
    decode = enc.decode_prompts

    def box_shaped(embedding, original_size, boxes=None, **kwargs):
        tokens, low = decode(embedding, original_size, boxes=boxes, **kwargs)
        if low is None or boxes is None:
            return tokens, low
        b = enc.transform.apply_boxes_torch(boxes.float(), original_size) / 4  # in low-res cells
        c = torch.arange(low.shape[-1], device=low.device) + 0.5
        rows = (c >= b[:, 1, None]) & (c < b[:, 3, None])
        cols = (c >= b[:, 0, None]) & (c < b[:, 2, None])
        magnitude = low.abs() + 0.5
        return tokens, torch.where((rows[:, :, None] & cols[:, None, :])[:, None], magnitude, -magnitude)

    enc.decode_prompts = box_shaped


def count_flops(model, x) -> dict:
    """FLOPs (multiply-add = 2) of one image through the frozen stages that dominate the cost.

    Fused attention kernels are invisible to FlopCounterMode, so attention runs through the math
    kernel (same arithmetic, as matmuls) and nn.MultiheadAttention's fast path is off meanwhile.
    """
    image = x["image"].to(model.device)
    boxes = x["instances"].gt_boxes.tensor.to(model.device)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    flops = {}
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            pre = model.sam_encoder.preprocess(image)[0][None]
            with FlopCounterMode(display=False) as fc:
                emb = model.sam_encoder.encode_images(pre)
            flops["sam_encoder"] = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                model.sam_encoder.decode_boxes(emb[0], boxes, tuple(image.shape[-2:]))
            flops["mask_decoder"] = fc.get_total_flops()
            clip_in = model.clip_encoder.preprocess(image)[None]
            with FlopCounterMode(display=False) as fc:
                model.clip_encoder.encode_image_tokens(clip_in)
            flops["clip"] = fc.get_total_flops()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return flops


_FLOPS, _RATES = {}, {}


def pipeline_roofline(args, per_image: dict):
    """--roofline of a --pipeline run. FLOPs are counted on an eager fp32 build (compiled code hides
    its ops from FlopCounterMode) once per model and box count, the matmul rate once per precision:
    both are cached, so a process timing several configurations pays them once."""
    key = (args.sam, args.clip_backend, args.clip, args.clip_size, args.image_size, args.boxes, args.device)
    if key not in _FLOPS:
        model = build(args, "", extra_opts=["MODEL.REGIONSPOT.COMPILE", ""])
        _FLOPS[key] = count_flops(model, make_inputs(args, 1)[0])
    dtype = AUTOCAST_DTYPES[args.autocast] or torch.float32
    if (args.device, dtype) not in _RATES:
        _RATES[args.device, dtype] = matmul_rate(args.device, dtype)
    rate = _RATES[args.device, dtype]
    return roofline(_FLOPS[key], per_image, rate), rate


def matmul_rate(device: str, dtype: torch.dtype, n: int = 0, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n x n matmul in `dtype` on `device`: the roofline we compare to."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def roofline(flops: dict, per_image: dict, rate: float) -> dict:
    """Seconds the counted FLOPs take at `rate`, per stage and in all, against measured seconds."""
    out = {}
    for stage, f in flops.items():
        out[stage] = {"gflop": f / 1e9, "measured_s": per_image[stage], "ideal_s": f / rate}
    total = sum(flops.values())
    out["total"] = {"gflop": total / 1e9, "measured_s": per_image["total"], "ideal_s": total / rate}
    for v in out.values():
        v["fraction"] = v["ideal_s"] / v["measured_s"] if v["measured_s"] > 0 else float("nan")
    return out


def print_roofline(label: str, rf: dict, rate: float, dtype_name: str, boxes: int) -> None:
    print(f"roofline of {label}: measured {dtype_name} matmul rate {rate / 1e12:.2f} TFLOP/s")
    print("| stage | GFLOP/image | measured ms | at matmul rate ms | fraction of roofline |\n|---|---|---|---|---|")
    for stage, v in rf.items():
        name = {"mask_decoder": f"mask_decoder ({boxes} boxes)", "total": "end to end (vs the three stages)"}.get(stage, stage)
        print(f"| {name} | {v['gflop']:.1f} | {v['measured_s'] * 1000:.1f} | {v['ideal_s'] * 1000:.2f} | "
              f"{v['fraction'] * 100:.1f}% |")
    t = rf["total"]
    print(f"  bound {1 / t['ideal_s']:.3g} img/s at the matmul rate; measured {1 / t['measured_s']:.3g} img/s", flush=True)


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def describe(args) -> str:
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def describe_run(args) -> str:
    return (f"device: {describe(args)}; SAM {args.sam}, {args.clip_backend} {args.clip}@{args.clip_size}, image {args.image_size}, "
            f"{args.boxes} boxes, {args.num_classes} classes, top-{args.top_k}, "
            f"masks {'off' if args.no_masks else 'on'}, batch {args.batch}")


def fmt_row(label, t, mem) -> str:
    cells = " | ".join(f"{t[k] * 1000:.0f}" for k in (*STAGES, "other", "total"))
    return f"| {label} | {cells} | {1 / t['total']:.2f} | {mem:.2f} |"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.lvis_eval_child:
        return lvis_eval_child(args)
    if args.lvis_eval_size:
        return lvis_eval(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.startup or args.pipeline:
        record = {"args": vars(args), "device": describe(args)}
        if args.startup:
            record["startup"] = startup(args)
        else:
            print(describe_run(args), flush=True)
            record["pipeline"] = pipeline(args)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")
        return 0
    print(f"{describe_run(args)}, {args.images} timed images", flush=True)
    header = "| precision | " + " | ".join(f"{k} ms" for k in (*STAGES, "other", "total")) + " | img/s | peak GB |"
    print(header + "\n|" + "---|" * (len(STAGES) + 5))
    base = args.autocast or "fp32"
    if args.compare_autocast:
        variants = [("fp32", "", []), (args.compare_autocast, args.compare_autocast, [])]
    elif args.compare_opts:
        variants = [(base, args.autocast, []), (f"{base} + {' '.join(args.compare_opts)}", args.autocast,
                                                args.compare_opts)]
    else:
        variants = [(base, args.autocast, [])]
    results = {}
    for label, (t, outputs, emb) in run(args, variants).items():
        mem = peak_memory_gb(args.device)  # when comparing: both models together
        results[label] = {"per_image_s": t, "peak_gb": mem, "emb": emb, "outputs": outputs}
        print(fmt_row(label, t, mem), flush=True)
        share = t["other"] / t["total"]
        print(f"  time outside encoders/decoder/head/masks: {share * 100:.1f}%; first (warm-up) batch, "
              f"compilation included: {t['warmup_batch']:.1f} s", flush=True)
    record = {"args": vars(args), "device": describe(args)}
    for k, v in results.items():
        record[k] = {"per_image_s": v["per_image_s"], "peak_gb": v["peak_gb"]}
    if args.roofline:
        flops = count_flops(build(args, ""), make_inputs(args, 1)[0])
        for label, autocast, _ in variants:
            dtype = AUTOCAST_DTYPES[autocast] or torch.float32
            rate = matmul_rate(args.device, dtype)
            rf = roofline(flops, results[label]["per_image_s"], rate)
            print_roofline(label, rf, rate, str(dtype).replace("torch.", ""), args.boxes)
            record[label]["roofline"] = {"matmul_flops_per_s": rate, **rf}
    if len(variants) == 2:
        a, b = results[variants[0][0]], results[variants[1][0]]
        speedup = a["per_image_s"]["total"] / b["per_image_s"]["total"]
        cos = F.cosine_similarity(a["emb"], b["emb"], dim=-1)
        same_top = sum(
            int((x["instances"].pred_classes[:1] == y["instances"].pred_classes[:1]).all())
            for x, y in zip(a["outputs"], b["outputs"])
        )
        print(f"{variants[1][0]} vs {variants[0][0]}: speed-up {speedup:.2f}x end to end; region-embedding cosine "
              f"min {cos.min():.4f} mean {cos.mean():.4f}; same top detection class on {same_top}/{len(a['outputs'])} images")
        record["compare"] = {"speedup": speedup, "cos_min": float(cos.min()), "cos_mean": float(cos.mean())}
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    if args.max_rss_gb and not args.device.startswith("cuda"):
        peak = max(v["peak_gb"] for v in results.values())
        if peak > args.max_rss_gb:
            print(f"FAIL: peak RSS {peak:.2f} GB exceeds the bound {args.max_rss_gb} GB", flush=True)
            return 1
        print(f"OK: peak RSS {peak:.2f} GB within {args.max_rss_gb} GB", flush=True)
    return 0



# ------------------------------------------------------------------------------ --lvis-eval-size
LVIS_EVAL_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def add_lvis_eval_args(p) -> None:
    g = p.add_argument_group("final evaluation at LVIS scale")
    g.add_argument("--lvis-eval-size", type=int, default=0, metavar="N",
                   help="measure the final LVIS evaluation of N synthetic images (19809 = LVIS val)")
    g.add_argument("--lvis-eval-baseline", default="1000,2000", metavar="N1,N2",
                   help="sizes at which detectron2's in-memory route is measured and extrapolated ('' = none)")
    g.add_argument("--lvis-eval-engine", default="auto", help="regionspot.fast_eval engine")
    g.add_argument("--lvis-eval-root", default=os.path.join(tempfile.gettempdir(), "regionspot_lvis_eval"),
                   help="cache of the synthetic sets")
    g.add_argument("--lvis-eval-dets", type=int, default=300, help="detections per image")
    g.add_argument("--lvis-eval-verified", type=float, default=0.5,
                   help="share of the detections of a class the image is verified for (in its ground "
                        "truth or neg_category_ids); the others name any class")
    g.add_argument("--lvis-eval-child", default="", help=argparse.SUPPRESS)  # ROUTE,N: one measurement


def lvis_eval_folder(args) -> str:
    return os.path.join(args.lvis_eval_root, f"n{args.lvis_eval_size}-d{args.lvis_eval_dets}-v{args.lvis_eval_verified}")


def make_lvis_eval_set(args) -> str:
    """The synthetic set of --lvis-eval-size images: ground truth and results shards (as an
    evaluation run leaves them), made once; returns its folder."""
    from regionspot.data.synthetic_results import make_set
    from regionspot.evaluation_results import ShardWriter, results_folder

    folder = lvis_eval_folder(args)
    done = os.path.join(folder, "complete")
    if os.path.isfile(done):
        return folder
    n = args.lvis_eval_size
    print(f"Making a synthetic LVIS-like set of {n} images, {args.lvis_eval_dets} detections each, in {folder} "
          "(once) ...", flush=True)
    os.makedirs(folder, exist_ok=True)
    # Several classes per box, sharing its mask, as RegionSpot's top-300 (box, class) pairs do.
    gt, detections = make_set(n, dets_per_image=args.lvis_eval_dets, boxes_per_image=max(1, args.lvis_eval_dets // 3),
                              verified_fraction=args.lvis_eval_verified)
    with open(os.path.join(folder, "gt.json"), "w") as f:
        json.dump(gt, f)
    writer = ShardWriter(results_folder(os.path.join(folder, "full")), 0, images_per_shard=500,
                         seconds_per_shard=float("inf"))
    start = time.perf_counter()
    for i, records in enumerate(detections):
        writer.add(records[0]["image_id"], records)
        if (i + 1) % 1000 == 0:
            print(f"  {i + 1}/{n} images ({time.perf_counter() - start:.0f} s)", flush=True)
    writer.close()
    open(done, "w").close()
    return folder


def _lvis_eval_subset(folder: str, n: int, total: int) -> Tuple[str, str]:
    """(ground-truth file, output folder with its results shards) of the first n images."""
    from regionspot.evaluation_results import ShardWriter, iter_lines, results_folder

    if n == total:
        return os.path.join(folder, "gt.json"), os.path.join(folder, "full")
    sub = os.path.join(folder, f"first{n}")
    gt_file = os.path.join(sub, "gt.json")
    if not os.path.isfile(gt_file):
        with open(os.path.join(folder, "gt.json")) as f:
            gt = json.load(f)
        gt["images"] = [im for im in gt["images"] if im["id"] <= n]
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] <= n]
        writer = ShardWriter(results_folder(sub), 0, images_per_shard=500, seconds_per_shard=float("inf"))
        for image_id, line in iter_lines(results_folder(os.path.join(folder, "full"))):
            if image_id <= n:
                writer.add(image_id, json.loads(line)["instances"])
        writer.close()
        with open(gt_file + ".tmp", "w") as f:
            json.dump(gt, f)
        os.replace(gt_file + ".tmp", gt_file)
    return gt_file, sub


def lvis_eval_child(args) -> int:
    """One measurement, in its own process: ROUTE ("new" or "old") at N images; prints a JSON line."""
    import contextlib
    import io

    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import LVISEvaluator
    from regionspot.evaluation import RegionSpotLVISEvaluator, patch_lvis_for_numpy2
    from regionspot.evaluation_results import iter_lines, results_folder

    route, n = args.lvis_eval_child.split(",")
    n = int(n)
    folder = lvis_eval_folder(args)
    gt_file, out = _lvis_eval_subset(folder, n, args.lvis_eval_size)
    name = f"regionspot_bench_lvis_eval_{n}"
    MetadataCatalog.get(name).set(json_file=gt_file, evaluator_type="lvis")
    patch_lvis_for_numpy2()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with contextlib.redirect_stdout(io.StringIO()):
        if route == "new":
            start = time.perf_counter()
            ev = RegionSpotLVISEvaluator(name, ("bbox", "segm"), True, out, max_dets_per_image=300, resume=True,
                                         engine=args.lvis_eval_engine)
            ev.reset()  # resume: keeps the shards
            res = ev.evaluate()
            seconds = time.perf_counter() - start
        else:
            ev = LVISEvaluator(name, ("bbox", "segm"), True, None, max_dets_per_image=300)
            ev.reset()
            for _, line in iter_lines(results_folder(out)):  # what process() would have gathered
                rec = json.loads(line)
                for r in rec["instances"]:
                    r["category_id"] -= 1  # contiguous, as the evaluator gets them
                ev._predictions.append(rec)
            start = time.perf_counter()
            res = ev.evaluate()
            seconds = time.perf_counter() - start
    # The route's processes together: this one and the task process it forks (an upper bound: their
    # peaks need not coincide, and pages they share count twice).
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    forked = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    cpu = sum(getattr(resource.getrusage(who), k) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for k in ("ru_utime", "ru_stime"))  # CPU seconds of the whole process, imports included
    print(json.dumps({"route": route, "images": n, "seconds": seconds, "cpu_s": cpu, "peak_rss_gb": own + forked,
                      "peak_rss_main_gb": own, "peak_rss_forked_gb": forked, "rss_before_gb": rss_before,
                      "metrics": res}), flush=True)
    return 0


def _lvis_eval_run(args, route: str, n: int) -> dict:
    import subprocess

    argv = [sys.executable, os.path.abspath(__file__), "--lvis-eval-child", f"{route},{n}",
            "--lvis-eval-size", str(args.lvis_eval_size), "--lvis-eval-root", args.lvis_eval_root,
            "--lvis-eval-dets", str(args.lvis_eval_dets), "--lvis-eval-verified", str(args.lvis_eval_verified),
            "--lvis-eval-engine", args.lvis_eval_engine]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"--lvis-eval-size: the {route} route at {n} images failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {'RegionSpot (shards + fast_eval)' if route == 'new' else 'detectron2 LVISEvaluator (in memory)'}"
          f", {n} images: {out['seconds']:.1f} s, peak RSS {out['peak_rss_gb']:.2f} GB "
          f"({out['cpu_s']:.0f} CPU s in the process, start-up included)", flush=True)
    return out


def lvis_eval(args) -> int:
    """--lvis-eval-size: the final evaluation's time and peak RSS, both routes (see the docstring)."""
    from regionspot.fast_eval import resolve_engine

    folder = make_lvis_eval_set(args)
    n = args.lvis_eval_size
    sizes = [int(x) for x in args.lvis_eval_baseline.split(",") if x.strip()]
    if any(s > n for s in sizes):
        raise SystemExit(f"--lvis-eval-baseline sizes {sizes} must be at most --lvis-eval-size {n}.")
    print(f"Final LVIS evaluation (bbox + segm) of {args.lvis_eval_dets} detections an image, engine "
          f"{resolve_engine(args.lvis_eval_engine)}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs", flush=True)
    record = {"images": n, "dets_per_image": args.lvis_eval_dets, "baseline": [], "cpus": os.cpu_count()}
    for s in sizes:
        record["baseline"].append(_lvis_eval_run(args, "old", s))
    if sizes:  # the same figures as the lvis package at the first baseline size
        check = _lvis_eval_run(args, "new", sizes[0])
        old = record["baseline"][0]["metrics"]
        diff = max(abs(check["metrics"][t][m] - old[t][m]) for t in ("bbox", "segm") for m in LVIS_EVAL_METRICS)
        record["check"] = {"images": sizes[0], "max_abs_diff": diff, "new": check}
        print(f"  AP, AP50, AP75, APs/m/l, APr/c/f of both routes at {sizes[0]} images: max difference {diff:.2e}",
              flush=True)
    record["new"] = _lvis_eval_run(args, "new", n) if n not in sizes[:1] else record["check"]["new"]
    if len(sizes) >= 2:
        (a, ta, ra), (b, tb, rb) = [(r["images"], r["seconds"], r["peak_rss_gb"]) for r in record["baseline"][:2]]
        t_n, r_n = ta + (tb - ta) * (n - a) / (b - a), ra + (rb - ra) * (n - a) / (b - a)
        record["baseline_extrapolated"] = {"images": n, "seconds": t_n, "peak_rss_gb": r_n}
        print(f"  detectron2 LVISEvaluator extrapolated to {n} images: {t_n / 60:.1f} min, peak RSS {r_n:.1f} GB",
              flush=True)
    new = record["new"]
    print(f"RegionSpot route at {n} images: {new['seconds'] / 60:.2f} min, peak RSS {new['peak_rss_gb']:.2f} GB; "
          f"bbox AP {new['metrics']['bbox']['AP']:.3f}, segm AP {new['metrics']['segm']['AP']:.3f}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"lvis_eval": record}) + "\n")
    return 0

if __name__ == "__main__":
    sys.exit(main())
