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
from typing import Callable, Dict, List, Optional, Sequence

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
    p.add_argument("--interleave", action="store_true",
                   help="eager and onnxruntime backends take turns per stage and repeat (fair on a shared machine); "
                        "the compiled backend still runs after them")
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


def timed(fn, repeats: int, warm_up: bool = True) -> float:
    """Median seconds of `repeats` calls after one warm-up call (CUDA synchronised); with no
    repeats, only the warm-up call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    if warm_up:
        fn()
    if not repeats:
        return 0.0
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


# ------------------------------------------------------------------ stages
def torch_stages(model, image: np.ndarray, boxes: Dict[int, np.ndarray], prompts: List[str]) -> Dict[str, Callable]:
    """Stage -> a call running it once on PyTorch (the image already set for the region stages)."""
    predictor = RegionSpotPredictor(model=model, vocabulary="bench", test_augmentations=[])
    pipe = find_pipeline(model)
    x = torch.from_numpy(image.transpose(2, 0, 1).copy()).to(model.device)
    sam_in, _ = pipe.sam_encoder.preprocess(x)
    clip_in = pipe.clip_encoder.preprocess(x)[None]
    with torch.no_grad():
        predictor.set_image(image)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    out = {"sam_encoder": no_grad(lambda: pipe.sam_encoder.encode_images(sam_in[None])),
           "clip_tower": no_grad(lambda: pipe.clip_encoder.encode_image_tokens(clip_in))}
    for n, b in boxes.items():
        out[f"region_{n}"] = no_grad(lambda b=b: predictor.predict(boxes=b, return_masks=False))
    out["text"] = no_grad(lambda: pipe.clip_encoder.encode_text(prompts))
    return out


def ort_stages(onnx: OnnxRegionSpotPredictor, image: np.ndarray, boxes: Dict[int, np.ndarray],
               prompts: List[str]) -> Dict[str, Callable]:
    """Stage -> a call running it once on onnxruntime (the image already set for the region stages)."""
    m = onnx.manifest
    sam_in, _ = pp.sam_input(image, m["sam"])
    clip_in = pp.clip_input(image, m["clip"])
    onnx.set_image(image)
    out = {"sam_encoder": lambda: onnx.sessions["sam_image"].run(None, {"image": sam_in}),
           "clip_tower": lambda: onnx.sessions["clip_image"].run(None, {"image": clip_in})}
    for n, b in boxes.items():
        out[f"region_{n}"] = lambda b=b: onnx.predict(boxes=b, return_masks=False)
    if "text" in onnx.sessions:
        out["text"] = lambda: onnx.encode_prompts(prompts)
    return out


def interleaved(runners: Dict[str, Dict[str, Callable]], repeats: int) -> Dict[str, Dict[str, float]]:
    """Median seconds per (backend, stage), the backends taking turns within each stage and
    repeat, so a shared machine's changing load slows them alike (one warm-up call each first)."""
    times: Dict[str, Dict[str, List[float]]] = {b: {} for b in runners}
    stages = list(dict.fromkeys(st for r in runners.values() for st in r))
    for stage in stages:
        here = [b for b in runners if stage in runners[b]]
        for b in here:
            timed(runners[b][stage], 0)
        for _ in range(repeats):
            for b in here:
                times[b].setdefault(stage, []).append(timed(runners[b][stage], 1, warm_up=False))
        print(stage, "  ".join(f"{b} {np.median(times[b][stage]) * 1000:.0f} ms" for b in here), flush=True)
    return {b: {st: float(np.median(v)) for st, v in t.items()} for b, t in times.items()}


def speed(args) -> Dict:
    cfg = make_cfg(args, args.sam, args.clip_backend, args.clip, args.clip_size, ["INPUT.MIN_SIZE_TEST", "0"])
    model, names, text = build(cfg, args.num_classes)
    image = make_image(args.image_size)
    boxes = {n: make_boxes(n, image) for n in args.boxes}
    prompts = [f"a photo of a class {i}." for i in range(args.prompts)]
    results: Dict = {"device": describe(), "model": f"SAM {cfg.MODEL.REGIONSPOT.SAM.TYPE} + CLIP {cfg.MODEL.REGIONSPOT.CLIP.NAME}",
                     "image": args.image_size, "classes": args.num_classes, "repeats": args.repeats,
                     "interleaved": args.interleave, "seconds": {}}
    folder = args.keep or os.path.join(tempfile.mkdtemp(prefix="regionspot-onnx-"), "export")
    if not os.path.isfile(os.path.join(folder, "manifest.json")):  # --keep: export once, reuse later
        t = time.perf_counter()
        export_folder(find_pipeline(model), cfg, folder, quantize_int8=True, vocabulary=(names, text.numpy()))
        results["export_s"] = time.perf_counter() - t
        print(f"exported to {folder} in {results['export_s']:.0f} s", flush=True)
    onnx = {b: OnnxRegionSpotPredictor(folder, int8=b == "int8") for b in ("onnxruntime", "int8") if b in args.backends}
    if len(onnx) == 2:
        probs = []
        for p in (onnx["onnxruntime"], onnx["int8"]):
            p.set_image(image)
            probs.append(p.predict(boxes=boxes[max(boxes)], return_masks=False).class_scores)
        results["int8_agreement"] = agreement(*probs)
        print("int8 vs fp32 at", max(boxes), "boxes:", results["int8_agreement"], flush=True)
    runners = {}
    if "eager" in args.backends:
        runners["eager"] = torch_stages(model, image, boxes, prompts)
    for b, p in onnx.items():
        runners[b] = ort_stages(p, image, boxes, prompts)
    if args.interleave:
        results["seconds"] = interleaved(runners, args.repeats)
    else:
        for b, stages in runners.items():
            results["seconds"][b] = {st: timed(fn, args.repeats) for st, fn in stages.items()}
            print(b, fmt(results["seconds"][b]), flush=True)
    if "compiled" in args.backends:  # last: compiling changes the model in place
        pipe = find_pipeline(model)
        compile_frozen(pipe.sam_encoder, pipe.clip_encoder, "default")
        stages = torch_stages(model, image, boxes, prompts)
        results["seconds"]["compiled"] = {st: timed(fn, args.repeats) for st, fn in stages.items()}
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
