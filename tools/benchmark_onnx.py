#!/usr/bin/env python
"""Per-stage speed of an exported RegionSpot on onnxruntime beside PyTorch (eager and compiled), and
the agreement of int8-quantized encoders; or, with --equality, the exported folder against the
PyTorch predictor at real size. Random weights, synthetic images, random unit-vector vocabulary.

    python tools/benchmark_onnx.py --sam vit_b --clip ViT-L/14 --repeats 2
    python tools/benchmark_onnx.py --equality                   # SAM ViT-B + CLIP ViT-B/16, SAM 2.1 Hiera-T + open_clip
    python tools/benchmark_onnx.py --tiny --backends onnxruntime eager int8   # seconds (tests)

Stages: SAM image encoder, CLIP image tower (to the token map), the region graph (prompt encoder,
mask decoder, head, classifier over --num-classes classes) at each --boxes count, and the text
tower on --prompts prompts. Backends: onnxruntime (fp32 graphs), int8 (onnxruntime, dynamically
quantized image encoders; agreement of class probabilities with fp32: top-1 and 1 - r), eager
(PyTorch), compiled (PyTorch with MODEL.REGIONSPOT.COMPILE default; compilation is not timed).
Each figure is the median of --repeats runs after one warm-up run.
"""
import regionspot.warnings_filter  # noqa: F401  (first: known-harmless warnings of the libraries)
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from regionspot.config import get_regionspot_cfg
from regionspot.modeling.region_pipeline import compile_frozen, find_pipeline
from regionspot.onnx_export import export_folder
from regionspot.predictor import RegionSpotPredictor
from regionspot_deploy import OnnxRegionSpotPredictor
from regionspot_deploy import preprocess as pp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "configs", "Base-RegionSpot.yaml")
TINY_CONFIG = os.path.join(ROOT, "configs", "quickstart", "RegionSpot-tiny-random_synthetic.yaml")
BACKENDS = ("onnxruntime", "int8", "eager", "compiled")
# --equality's pairs: (label, SAM type, CLIP backend, CLIP name, CLIP input size)
EQUALITY_PAIRS = (("SAM ViT-B + CLIP ViT-B/16", "vit_b", "clip", "ViT-B/16", 224),
                  ("SAM 2.1 Hiera-T + open_clip ViT-B-16", "sam2.1_hiera_t", "open_clip", "ViT-B-16", 224))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sam", default="vit_b")
    p.add_argument("--clip", default="ViT-L/14")
    p.add_argument("--clip-backend", default="clip", choices=("clip", "open_clip"))
    p.add_argument("--clip-size", type=int, default=224)
    p.add_argument("--tiny", action="store_true", help="the tests' tiny random encoders (seconds)")
    p.add_argument("--boxes", type=int, nargs="+", default=[12, 300])
    p.add_argument("--num-classes", type=int, default=1203)
    p.add_argument("--prompts", type=int, default=81, help="text prompts per text-tower call (one class, 81 templates)")
    p.add_argument("--image-size", default="1024x768", help="WxH of the synthetic image")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--device", default="cpu", help="PyTorch's device for the eager and compiled stages")
    p.add_argument("--equality", action="store_true", help="real-size equality of the exported folder instead")
    p.add_argument("--keep", default="", metavar="DIR", help="export into DIR (kept) instead of a temporary folder")
    p.add_argument("--json", default="", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return p


def make_cfg(args, sam: str, clip_backend: str, clip: str, clip_size: int, extra=()):
    if args.tiny:
        cfg = get_regionspot_cfg(TINY_CONFIG)
    else:
        cfg = get_regionspot_cfg(BASE_CONFIG)
        c = cfg.MODEL.REGIONSPOT
        c.SAM.TYPE, c.SAM.CHECKPOINT = sam, "random"
        c.CLIP.BACKEND, c.CLIP.NAME, c.CLIP.CHECKPOINT, c.CLIP.INPUT_SIZE = clip_backend, clip, "random", clip_size
    cfg.MODEL.DEVICE = args.device
    cfg.merge_from_list(list(args.opts) + list(extra))
    return cfg


def build(cfg, num_classes: int):
    """The model with random weights, and `num_classes` random unit vectors as vocabulary "bench"."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    text = F.normalize(torch.randn(num_classes, model.clip_encoder.text_dim), dim=-1)
    names = [f"class{i}" for i in range(num_classes)]
    model.vocabulary.register("bench", names, text)
    return model, names, text


def make_image(size: str, seed: int = 0) -> np.ndarray:
    w, h = (int(v) for v in size.split("x"))
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_boxes(n: int, image: np.ndarray, seed: int = 1) -> np.ndarray:
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.8, (n, 2)) * [w, h]
    wh = rng.uniform(0.05, 0.35, (n, 2)) * [w, h]
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def agreement(p: np.ndarray, q: np.ndarray) -> Dict[str, float]:
    p, q = p.astype(np.float64), q.astype(np.float64)
    return {"one_minus_r": float(1 - np.corrcoef(p.ravel(), q.ravel())[0, 1]),
            "top1_agreement": float((p.argmax(1) == q.argmax(1)).mean()), "max_abs_diff": float(np.abs(p - q).max())}


# ------------------------------------------------------------------ PyTorch stages
def torch_stages(model, image: np.ndarray, boxes: Dict[int, np.ndarray], prompts: List[str], repeats: int) -> Dict:
    predictor = RegionSpotPredictor(model=model, vocabulary="bench", test_augmentations=[])
    pipe = find_pipeline(model)
    x = torch.from_numpy(image.transpose(2, 0, 1).copy()).to(model.device)
    sam_in, size = pipe.sam_encoder.preprocess(x)
    clip_in = pipe.clip_encoder.preprocess(x)[None]
    out = {}
    with torch.no_grad():
        out["sam_encoder"] = timed(lambda: pipe.sam_encoder.encode_images(sam_in[None]), repeats)
        out["clip_tower"] = timed(lambda: pipe.clip_encoder.encode_image_tokens(clip_in), repeats)
        predictor.set_image(image)
        for n, b in boxes.items():
            out[f"region_{n}"] = timed(lambda: predictor.predict(boxes=b, return_masks=False), repeats)
        out["text"] = timed(lambda: pipe.clip_encoder.encode_text(prompts), repeats)
    return out


# ------------------------------------------------------------------ onnxruntime stages
def ort_stages(onnx: OnnxRegionSpotPredictor, image: np.ndarray, boxes: Dict[int, np.ndarray], prompts: List[str],
               repeats: int) -> Dict:
    m = onnx.manifest
    sam_in, _ = pp.sam_input(image, m["sam"])
    clip_in = pp.clip_input(image, m["clip"])
    out = {"sam_encoder": timed(lambda: onnx.sessions["sam_image"].run(None, {"image": sam_in}), repeats),
           "clip_tower": timed(lambda: onnx.sessions["clip_image"].run(None, {"image": clip_in}), repeats)}
    onnx.set_image(image)
    for n, b in boxes.items():
        out[f"region_{n}"] = timed(lambda: onnx.predict(boxes=b, return_masks=False), repeats)
    if "text" in onnx.sessions:
        out["text"] = timed(lambda: onnx.encode_prompts(prompts), repeats)
    return out


def speed(args) -> Dict:
    cfg = make_cfg(args, args.sam, args.clip_backend, args.clip, args.clip_size, ["INPUT.MIN_SIZE_TEST", "0"])
    model, names, text = build(cfg, args.num_classes)
    image = make_image(args.image_size)
    boxes = {n: make_boxes(n, image) for n in args.boxes}
    prompts = [f"a photo of a class {i}." for i in range(args.prompts)]
    results: Dict = {"device": describe(), "model": f"SAM {cfg.MODEL.REGIONSPOT.SAM.TYPE} + CLIP {cfg.MODEL.REGIONSPOT.CLIP.NAME}",
                     "image": args.image_size, "classes": args.num_classes, "repeats": args.repeats, "seconds": {}}
    folder = args.keep or os.path.join(tempfile.mkdtemp(prefix="regionspot-onnx-"), "export")
    if not os.path.isfile(os.path.join(folder, "manifest.json")):  # --keep: export once, reuse later
        t = time.perf_counter()
        export_folder(find_pipeline(model), cfg, folder, quantize_int8=True, vocabulary=(names, text.numpy()))
        results["export_s"] = time.perf_counter() - t
        print(f"exported to {folder} in {results['export_s']:.0f} s", flush=True)
    if "eager" in args.backends:
        results["seconds"]["eager"] = torch_stages(model, image, boxes, prompts, args.repeats)
        print("eager", fmt(results["seconds"]["eager"]), flush=True)
    probs = {}
    for backend in ("onnxruntime", "int8"):
        if backend in args.backends:
            onnx = OnnxRegionSpotPredictor(folder, int8=backend == "int8")
            results["seconds"][backend] = ort_stages(onnx, image, boxes, prompts, args.repeats)
            onnx.set_image(image)
            probs[backend] = onnx.predict(boxes=boxes[max(boxes)], return_masks=False).class_scores
            print(backend, fmt(results["seconds"][backend]), flush=True)
            del onnx
    if len(probs) == 2:
        results["int8_agreement"] = agreement(probs["onnxruntime"], probs["int8"])
        print("int8 vs fp32 at", max(boxes), "boxes:", results["int8_agreement"], flush=True)
    if "compiled" in args.backends:
        pipe = find_pipeline(model)
        compile_frozen(pipe.sam_encoder, pipe.clip_encoder, "default")
        results["seconds"]["compiled"] = torch_stages(model, image, boxes, prompts, args.repeats)
        print("compiled", fmt(results["seconds"]["compiled"]), flush=True)
    return results


def equality(args) -> Dict:
    """Each pair of EQUALITY_PAIRS (or --tiny): export, then the ONNX predictor against
    RegionSpotPredictor on one image with the test-time resize, boxes and points."""
    out = {"device": describe(), "pairs": {}}
    pairs = (("tiny", "", "clip", "", 0),) if args.tiny else EQUALITY_PAIRS
    for label, sam, backend, clip, size in pairs:
        cfg = make_cfg(args, sam, backend, clip, size)
        model, names, text = build(cfg, args.num_classes)
        predictor = RegionSpotPredictor(cfg, model=model, vocabulary="bench")
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "export")
            export_folder(find_pipeline(model), cfg, folder, vocabulary=(names, text.numpy()))
            onnx = OnnxRegionSpotPredictor(folder)
            image = make_image(args.image_size, seed=3)
            predictor.set_image(image)
            onnx.set_image(image)
            b = make_boxes(max(args.boxes), image, seed=4)
            rng = np.random.default_rng(5)
            pts = (rng.uniform(0.1, 0.9, (8, 2, 2)) * [image.shape[1], image.shape[0]]).astype(np.float32)
            lab = rng.integers(0, 2, (8, 2))
            rows = {}
            for name, kw in (("boxes", {"boxes": b}), ("points", {"points": pts, "point_labels": lab})):
                theirs, ours = predictor.predict(**kw).cpu(), onnx.predict(**kw)
                a, c = theirs.masks.numpy(), ours.masks
                iou = (a & c).sum((1, 2)) / np.maximum((a | c).sum((1, 2)), 1)
                rows[name] = {**agreement(theirs.class_scores.numpy(), ours.class_scores),
                              "min_mask_iou": float(iou.min()), "regions": len(ours)}
            out["pairs"][label] = rows
            print(label, json.dumps(rows), flush=True)
        del model, predictor, onnx
    return out


def describe() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def fmt(stages: Dict[str, float]) -> str:
    return "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in stages.items())


def table(results: Dict) -> str:
    stages = list(next(iter(results["seconds"].values())))
    lines = ["| backend | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for backend, s in results["seconds"].items():
        lines.append(f"| {backend} | " + " | ".join(f"{s[k] * 1000:.0f}" if k in s else "-" for k in stages) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    torch.manual_seed(0)
    results = equality(args) if args.equality else speed(args)
    if not args.equality:
        print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
