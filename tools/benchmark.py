#!/usr/bin/env python
"""Per-image time and peak memory of RegionSpot with real-size encoders (random weights).

    python tools/benchmark.py --sam vit_b --clip ViT-L/14 --boxes 12 --images 3 [--autocast bf16]
    python tools/benchmark.py ... --compare-autocast bf16      # fp32 vs bf16: speed-up and agreement
    python tools/benchmark.py ... --boxes 300 --max-rss-gb 6     # fails (exit 1) above the bound

Stages are timed by wrapping the model's own methods: SAM image encoder, SAM mask decoder (all
boxes), CLIP image tower, head (fusion head + classification + top-K) and masks (pasting kept
masks at full size); "other" is the rest of the end-to-end time (preprocessing, glue). Inputs are
synthetic images with random boxes; the vocabulary is random unit vectors of --num-classes
classes (text encoding is cached in real use, so it is not part of per-image cost).
"""
import argparse
import json
import os
import platform
import resource
import sys
import time
from collections import defaultdict

import regionspot  # noqa: F401
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from regionspot import add_regionspot_config

BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "Base-RegionSpot.yaml")
STAGES = ("sam_encoder", "mask_decoder", "clip", "head", "masks")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sam", default="vit_b")
    p.add_argument("--clip", default="ViT-L/14")
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
    p.add_argument("--json", default="", help="append the result as a JSON line to this file")
    p.add_argument("--startup", default="", metavar="VOCABULARY",
                   help="instead: time building the model and VOCABULARY's text embeddings, cold "
                        "(encoding, filling the cache) then warm (from the cache)")
    p.add_argument("--templates", default="ensemble", help="template set for --startup")
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
              f"{len(model.templates)} templates) {t2 - t1:.1f} s = {t2 - t0:.1f} s", flush=True)
        del model
    return times


def build(args, autocast: str, templates: str = "ensemble", extra_opts=()):
    cfg = get_cfg()
    add_regionspot_config(cfg)
    cfg.merge_from_file(BASE_CONFIG)
    c = cfg.MODEL.REGIONSPOT
    c.SAM.TYPE, c.SAM.CHECKPOINT = args.sam, "random"
    c.CLIP.NAME, c.CLIP.CHECKPOINT, c.CLIP.INPUT_SIZE = args.clip, "random", args.clip_size
    c.AUTOCAST = autocast
    c.TEXT.TEMPLATES = templates
    cfg.TEST.DETECTIONS_PER_IMAGE = args.top_k
    c.MASK_ON = not args.no_masks
    cfg.MODEL.DEVICE = args.device
    cfg.merge_from_list(list(args.opts) + list(extra_opts))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    text = F.normalize(torch.randn(args.num_classes, model.clip_encoder.text_dim), dim=-1)
    model._text_embeddings["bench"] = ([f"class{i}" for i in range(args.num_classes)], text.to(model.device))
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
            "masks": (model.sam_encoder, "paste_masks"),
        }
        for stage, (obj, name) in targets.items():
            setattr(obj, name, self._timed(stage, getattr(obj, name)))
        post = model._postprocess

        def postprocess(*a, **k):  # classification + top-K belong to "head"; pasting is timed inside
            t0 = self._now()
            before = self.times["masks"]
            out = post(*a, **k)
            self.times["head"] += self._now() - t0 - (self.times["masks"] - before)
            return out

        model._postprocess = postprocess

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
    for m, model in models.items():
        model(warm)
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
            tokens, _ = model.decode_regions(sam_emb[0], boxes, tuple(images[0].shape[-2:]))
            emb = model.embed_regions([tokens], clip_tokens)[0].float().cpu()
        results[m] = (per_image, outputs[m], emb)
    return results


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def describe(args) -> str:
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def fmt_row(label, t, mem) -> str:
    cells = " | ".join(f"{t[k] * 1000:.0f}" for k in (*STAGES, "other", "total"))
    return f"| {label} | {cells} | {1 / t['total']:.2f} | {mem:.2f} |"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.startup:
        record = {"args": vars(args), "device": describe(args), "startup": startup(args)}
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")
        return 0
    print(f"device: {describe(args)}; SAM {args.sam}, CLIP {args.clip}@{args.clip_size}, image {args.image_size}, "
          f"{args.boxes} boxes, {args.num_classes} classes, top-{args.top_k}, masks {'off' if args.no_masks else 'on'}, "
          f"batch {args.batch}, {args.images} timed images", flush=True)
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
        print(f"  time outside encoders/decoder/head/masks: {share * 100:.1f}%", flush=True)
    record = {"args": vars(args), "device": describe(args)}
    for k, v in results.items():
        record[k] = {"per_image_s": v["per_image_s"], "peak_gb": v["peak_gb"]}
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


if __name__ == "__main__":
    sys.exit(main())
