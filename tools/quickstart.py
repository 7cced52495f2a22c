#!/usr/bin/env python
"""The offline quickstart: the whole RegionSpot loop on the synthetic shapes dataset, on the CPU.

1. generate the synthetic LVIS-format dataset (once; reused afterwards) and cache the frozen SAM's
   tokens of the training boxes (tools/extract_sam_tokens.py's work; resumable);
2. evaluate the untrained head with LVISEvaluator;
3. train the head on the cached tokens;
4. evaluate the trained head (bbox and segm AP);
5. label every validation box with its top class, and draw the first images with detectron2's
   Visualizer, the truth beside each wrong label.

The frozen "foundation models" are a tiny SAM and a tiny CLIP pretrained on the synthetic shapes
world (tools/pretrain_tiny_encoders.py; shipped with the package), so it runs in minutes with
no download. Real results need the real SAM and CLIP weights (README).
Progress goes to the console; detectron2's full log to OUTPUT_DIR/log.txt (--verbose: both).
"""
import argparse
import json
import os
import platform
import sys
from typing import Dict, List, Tuple

# The figures depend on the CPU's kernels and threads: torch, MKL and oneDNN pick AVX-512 or AVX2
# code by CPU and split sums by thread, their float sums differ in the last bits, and 400
# iterations of training turn that into another head. Measured on one 2-core AVX-512 machine, segm
# AP: 64.8 (AVX-512 kernels, 1 thread), 64.2 (2 threads), 64.6 (torch's AVX2 kernels only), 65.0
# (torch, MKL and oneDNN all on AVX2); top-1 100% and bbox AP 24.3 -> 100.0 in every case. So
# the quickstart runs on 1 thread (--threads) and, on x86-64, on the AVX2 kernels every such CPU
# of the last decade has: a fresh machine prints the README's figures. Set these variables
# yourself to choose other kernels. They must be set before torch loads (so: when run as a script;
# a process that imports this module keeps its own).
KERNEL_SETTINGS = (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"))
if __name__ == "__main__" and platform.machine().lower() in ("x86_64", "amd64"):
    for _key, _value in KERNEL_SETTINGS:
        os.environ.setdefault(_key, _value)

import regionspot  # noqa: F401,E402  (registers datasets; filters known-harmless warnings)
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

from regionspot.utils.console import ProgressBar
from regionspot.modeling.encoders import build_sam_encoder
from regionspot.data.token_extraction import extract_tokens
from regionspot.engine.trainer import RegionSpotTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train_net import setup  # noqa: E402  (the same cfg setup as training and evaluation)

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "quickstart", "RegionSpot-tiny_synthetic.yaml")
RIGHT, WRONG = (0.1, 0.75, 0.1), (1.0, 0.1, 0.1)  # label colours in the pictures


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--num-vis", type=int, default=4, help="validation images to draw")
    p.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    p.add_argument("--verbose", action="store_true", help="also print detectron2's full log on the console")
    # The tiny models' matrices are too small to gain from threads, and on a busy machine extra
    # threads cost a lot: 0.15 s vs 1.97 s per validation image with 1 vs 2 threads, measured on
    # 2 cores shared with other jobs.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = p.parse_args(argv)
    # Evaluate the trained head once, after training, not also periodically during it.
    args.opts = ["TEST.EVAL_PERIOD", "0", *args.opts]
    return args


def ap(results: Dict, task: str) -> float:
    return float(results[task]["AP"]) if task in results else float("nan")


def top_class_per_box(inst) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (box, class) pairs of one image, reduced to one per distinct box: its top class.

    Pairs come sorted by score, so a box's first pair is its top class. Returns (indices of those
    pairs, their boxes (M, 4), their classes (M,)).
    """
    seen, keep = {}, []
    for j, box in enumerate(inst.pred_boxes.tensor.tolist()):
        key = tuple(round(v, 3) for v in box)
        if key not in seen:
            seen[key] = j
            keep.append(j)
    keep = torch.tensor(keep, dtype=torch.long)
    return keep, inst.pred_boxes.tensor[keep], inst.pred_classes[keep]


def gt_of(record: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth boxes (XYXY, original pixels) and classes of a dataset record."""
    anns = record.get("annotations", [])
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
    return torch.tensor(boxes, dtype=torch.float32).view(-1, 4), torch.tensor([a["category_id"] for a in anns])


def _label_position(box, text: str, font_px: float, width: int) -> Tuple[Tuple[float, float], str]:
    """Where a label above `box` fits inside the image: left-aligned at the box, else right-aligned.

    Sizes in image pixels: Visualizer draws `font_px` as points at 100 dpi on the scaled canvas,
    so a character is about 0.85 * font_px wide and a boxed line about 2 * font_px tall.
    """
    x0, y0, x1, _ = box
    text_w, line_h = 0.85 * font_px * len(text), 2.0 * font_px
    y = y0 - line_h if y0 >= line_h else y0 + 1
    if x0 + text_w <= width:
        return (x0, y), "left"
    return (min(max(x1, text_w), width - 1), y), "right"


def draw_labels(image, record: Dict, pred_boxes, pred_classes, scores, masks, gt_classes,
                metadata, path: str, scale: float = 2.0):
    """Each box with its predicted class and score (green if right; red with the truth if wrong),
    SAM's mask shaded, all labels kept inside the picture."""
    names = metadata.thing_classes
    vis = Visualizer(image, metadata, scale=scale)
    font_px = vis._default_font_size  # what draw_text uses, in image pixels
    for k, box in enumerate(pred_boxes.tolist()):
        ok = gt_classes[k] < 0 or int(pred_classes[k]) == int(gt_classes[k])
        colour = RIGHT if ok else WRONG
        if masks is not None:
            vis.draw_binary_mask(masks[k].numpy(), color=(1.0, 1.0, 1.0), edge_color=colour, alpha=0.25)
        vis.draw_box(box, edge_color=colour)
        text = f"{names[int(pred_classes[k])]} {float(scores[k]):.0%}"
        if not ok:
            text += f" (truth: {names[int(gt_classes[k])]})"
        pos, align = _label_position(box, text, font_px, image.shape[1])
        vis.draw_text(text, pos, color=colour, horizontal_alignment=align, font_size=font_px)
    out = vis.get_output()
    out.save(path)
    return out


@torch.no_grad()
def recognize_validation(cfg, model, out_dir: str, num_vis: int) -> Dict:
    """Label every validation box with its top class; draw the first `num_vis` images.

    Returns {"correct", "boxes", "pictures"}: how many gt boxes got their own class as top-1.
    """
    os.makedirs(out_dir, exist_ok=True)
    dataset = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    records = {r["image_id"]: r for r in DatasetCatalog.get(dataset)}
    loader = RegionSpotTrainer.build_test_loader(cfg, dataset)
    model.eval()
    correct = total = 0
    pictures: List[str] = []
    for batch in tqdm(loader, desc="labelling validation boxes", unit="img", leave=False):
        record = records[batch[0]["image_id"]]
        inst = model(batch)[0]["instances"].to("cpu")
        keep, boxes, classes = top_class_per_box(inst)
        gt_boxes, gt_classes = gt_of(record)
        # Each predicted box is a gt box prompt: pair them back by overlap.
        match = pairwise_iou(Boxes(boxes), Boxes(gt_boxes)) if len(gt_boxes) and len(boxes) else None
        matched = torch.full((len(boxes),), -1, dtype=torch.long)
        if match is not None:
            best_iou, best = match.max(dim=1)
            matched[best_iou > 0.9] = gt_classes[best[best_iou > 0.9]]
        correct += int((matched == classes).sum())
        total += len(gt_boxes)
        if len(pictures) < num_vis:
            masks = inst.pred_masks[keep] if inst.has("pred_masks") else None
            masks = masks.tensor if hasattr(masks, "tensor") else masks
            path = os.path.join(out_dir, f"{os.path.splitext(os.path.basename(record['file_name']))[0]}.png")
            draw_labels(read_image(record["file_name"], format="RGB"), record, boxes, classes,
                        inst.scores[keep], masks, matched, metadata, path)
            pictures.append(path)
    return {"correct": correct, "boxes": total, "pictures": pictures}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = setup(args)
    out = cfg.OUTPUT_DIR
    print(f"[1/5] Caching the frozen SAM's tokens of the training boxes ({', '.join(cfg.DATASETS.TRAIN)})",
          flush=True)
    sam = build_sam_encoder(cfg).to(cfg.MODEL.DEVICE)
    for name in cfg.DATASETS.TRAIN:
        summary = extract_tokens(sam, cfg, name, cfg.MODEL.REGIONSPOT.TOKEN_CACHE_DIR)
        print(f"      {summary}", flush=True)
    del sam

    trainer = RegionSpotTrainer(cfg)
    trainer.register_hooks([ProgressBar(f"[3/5] training the head ({cfg.SOLVER.MAX_ITER} it)")])
    trainer.resume_or_load(resume=args.resume)
    print(f"[2/5] Evaluating the untrained head on {cfg.DATASETS.TEST[0]}", flush=True)
    before = RegionSpotTrainer.test(cfg, trainer.model)
    print(f"      bbox AP {ap(before, 'bbox'):.1f}", flush=True)
    trainer.train()
    print("[4/5] Evaluating the trained head", flush=True)
    after = RegionSpotTrainer.test(cfg, trainer.model)
    print(f"      bbox AP {ap(after, 'bbox'):.1f}, segm AP {ap(after, 'segm'):.1f}", flush=True)
    print("[5/5] Labelling the validation boxes and drawing pictures", flush=True)
    rec = recognize_validation(cfg, trainer.model, os.path.join(out, "predictions"), args.num_vis)

    summary = {
        "bbox_AP_untrained": ap(before, "bbox"), "bbox_AP_trained": ap(after, "bbox"),
        "segm_AP_trained": ap(after, "segm"),
        "top1_accuracy": rec["correct"] / max(rec["boxes"], 1), "validation_boxes": rec["boxes"],
        "iterations": cfg.SOLVER.MAX_ITER, "trained_head": os.path.join(out, "model_final.pth"),
        "pictures": rec["pictures"], "log": os.path.join(out, "log.txt"),
        "kernels": {k: os.environ[k] for k, _ in KERNEL_SETTINGS if k in os.environ},
        "threads": torch.get_num_threads(),
    }
    summary_path = os.path.join(out, "quickstart_summary.json")
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    pictures = os.path.join(os.path.dirname(rec["pictures"][0]), "") if rec["pictures"] else "-"
    print(f"\nRegionSpot quickstart: tiny SAM + CLIP pretrained on synthetic shapes (frozen), head trained "
          f"{cfg.SOLVER.MAX_ITER} iterations.\n"
          f"On {cfg.DATASETS.TEST[0]} ({rec['boxes']} ground-truth boxes as prompts):\n"
          f"  top-1 label right:  {summary['top1_accuracy']:.1%} of the boxes\n"
          f"  bbox AP:            {summary['bbox_AP_untrained']:.1f} untrained head -> "
          f"{summary['bbox_AP_trained']:.1f} trained head\n"
          f"  segm AP:            {summary['segm_AP_trained']:.1f} (SAM's masks)\n"
          f"Trained head:  {summary['trained_head']}\n"
          f"Pictures:      {pictures} ({len(rec['pictures'])}; green = right, red = wrong with the truth)\n"
          f"Metrics:       {summary_path}\n"
          f"Full log:      {summary['log']}\n"
          f"Kernels:       {' '.join(f'{k}={v}' for k, v in summary['kernels'].items()) or 'the CPU default'}, "
          f"{summary['threads']} thread{'s' if summary['threads'] > 1 else ''} (other kernels or threads change the "
          "APs by a few tenths)", flush=True)
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
