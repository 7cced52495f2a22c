#!/usr/bin/env python
"""The offline quickstart: the whole RegionSpot loop on the synthetic shapes dataset, on the CPU.

1. generate the synthetic LVIS-format dataset (once; reused afterwards);
2. cache SAM tokens of the training boxes (tools/extract_sam_tokens.py's work; resumable);
3. evaluate the untrained head with LVISEvaluator;
4. train the head (cached tokens), evaluating periodically;
5. evaluate the trained head, and draw predictions on validation images with detectron2's Visualizer.

Tiny randomly initialised SAM and CLIP stand in for the real ones, so it runs in minutes without
any download; the numbers show the machinery learns, not what RegionSpot achieves. Real results
need the pretrained weights (README, "Pretrained weights").
"""
import argparse
import json
import logging
import os
import sys

import regionspot  # noqa: F401  (registers datasets)
import torch
from detectron2.data import MetadataCatalog
from detectron2.utils.visualizer import Visualizer
from regionspot.trainer import RegionSpotTrainer
from regionspot.token_extraction import extract_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train_net import setup  # noqa: E402  (the same cfg setup as training and evaluation)

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "quickstart", "RegionSpot-tiny_synthetic.yaml")
logger = logging.getLogger("regionspot.quickstart")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--num-vis", type=int, default=4, help="validation images to draw")
    p.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def bbox_ap(results) -> float:
    return float(results["bbox"]["AP"]) if "bbox" in results else float("nan")


@torch.no_grad()
def draw_predictions(cfg, model, out_dir: str, num: int, score_threshold: float = 0.0):
    """Draw each gt box's top class and score on the first `num` validation images."""
    os.makedirs(out_dir, exist_ok=True)
    dataset = cfg.DATASETS.TEST[0]
    loader = RegionSpotTrainer.build_test_loader(cfg, dataset)
    metadata = MetadataCatalog.get(dataset)
    model.eval()
    paths = []
    for i, batch in enumerate(loader):
        if i >= num:
            break
        inst = model(batch)[0]["instances"].to("cpu")
        # Pairs are sorted by score, so the first pair of each box is its top class.
        if inst.has("pred_masks"):
            box_ids = inst.pred_masks.index
        else:
            box_ids = torch.unique(inst.pred_boxes.tensor, dim=0, return_inverse=True)[1]
        seen, keep = set(), []
        for j, b in enumerate(box_ids.tolist()):
            if b not in seen and inst.scores[j] >= score_threshold:
                seen.add(b)
                keep.append(j)
        inst = inst[keep]
        if inst.has("pred_masks"):
            inst.remove("pred_masks")  # the tiny SAM is random: its masks would only clutter the picture
        image = batch[0]["image"].permute(1, 2, 0).numpy()
        if cfg.INPUT.FORMAT == "BGR":
            image = image[:, :, ::-1]  # Visualizer draws RGB
        vis = Visualizer(image, metadata, scale=2.0).draw_instance_predictions(inst)
        path = os.path.join(out_dir, f"{os.path.splitext(os.path.basename(batch[0]['file_name']))[0]}.png")
        vis.save(path)
        paths.append(path)
    return paths


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = setup(args)

    print("[1/4] Caching SAM tokens of the training boxes", flush=True)
    model = RegionSpotTrainer.build_model(cfg)
    for name in cfg.DATASETS.TRAIN:
        summary = extract_tokens(model.sam_encoder, cfg, name, cfg.MODEL.REGIONSPOT.TOKEN_CACHE_DIR)
        print(f"      {name}: {summary}", flush=True)
    del model

    trainer = RegionSpotTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    print("[2/4] Evaluating the untrained head", flush=True)
    before = RegionSpotTrainer.test(cfg, trainer.model)
    print(f"[3/4] Training for {cfg.SOLVER.MAX_ITER} iterations", flush=True)
    trainer.train()
    after = RegionSpotTrainer.test(cfg, trainer.model)
    print("[4/4] Drawing predictions", flush=True)
    pictures = draw_predictions(cfg, trainer.model, os.path.join(cfg.OUTPUT_DIR, "predictions"), args.num_vis)

    summary = {
        "bbox_AP_untrained": bbox_ap(before), "bbox_AP_trained": bbox_ap(after),
        "iterations": cfg.SOLVER.MAX_ITER, "pictures": pictures,
    }
    with open(os.path.join(cfg.OUTPUT_DIR, "quickstart_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\nRegionSpot quickstart (tiny random SAM + CLIP, synthetic shapes, LVIS bbox AP on "
          f"{cfg.DATASETS.TEST[0]}):\n"
          f"  untrained head: {summary['bbox_AP_untrained']:.1f}\n"
          f"  trained head:   {summary['bbox_AP_trained']:.1f}\n"
          f"  pictures:       {os.path.dirname(pictures[0]) if pictures else '-'}\n", flush=True)
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
