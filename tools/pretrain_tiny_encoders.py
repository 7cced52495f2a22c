#!/usr/bin/env python
"""Pretrain the offline quickstart's tiny SAM and tiny CLIP on the synthetic shapes world.

RegionSpot joins two *pretrained* foundation models and keeps them frozen. The quickstart cannot
download the real ones, so this script makes small stand-ins that know the synthetic world, each
trained the way its real counterpart was, on fresh scenes (never the quickstart's images):

- tiny SAM (SAM.TYPE "tiny", segment_anything's own classes): box prompt -> mask of the shape
  in the box (BCE + dice on the low-resolution mask logits, as SAM is trained), plus its IoU head.
  Real SAM's region tokens carry what and where the region is (RegionSpot's premise), learned
  from a billion masks; a model this small does not get there from masks alone (a linear probe
  reads the class from about 42% of its tokens). So a linear read-out of the region token must also
  give the region's box and mean colour (an auxiliary loss; the read-out is thrown away);
- tiny CLIP (clip.model.CLIP with small widths): image-text contrast on single-shape scenes with
  captions such as "a photo of a red circle." over all 18 colour x shape pairs, written in the
  templates RegionSpot formats class names into (both "red circle" and "red_circle" spellings).

Both are written gzip-compressed to regionspot/pretrained/, where the quickstart config finds them
(`regionspot://pretrained/...`). Seeded and single-threaded, so a rerun gives the same files.
A few CPU minutes:

    .venv/bin/python tools/pretrain_tiny_encoders.py
"""
import argparse
import gzip
import io
import os
import sys
import time
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from regionspot import warnings_filter  # noqa: F401  (only the known-harmless warnings filtered)
import clip
from clip.model import CLIP
from regionspot.modeling.encoders.clip_encoder import ClipImageTextEncoder
from regionspot.utils.file_io import atomic_write_bytes
from regionspot.modeling.encoders.sam_encoder import SamRegionEncoder, build_sam
from regionspot.data.synthetic import ALL_CLASSES, COLOURS, DEFAULT_CLASSES, render_scene
from regionspot.modeling.text_embeddings import TEMPLATE_SETS
from regionspot.utils.weights import PACKAGE_DIR

OUT_DIR = os.path.join(PACKAGE_DIR, "pretrained")
SAM_FILE = "tiny_sam_synthetic.pth.gz"
CLIP_FILE = "tiny_clip_synthetic.pth.gz"
IMAGE_SIZE = (192, 256)  # (H, W) of the quickstart's synthetic images
# Tiny CLIP: (embed_dim, image_resolution, vision_layers, vision_width, patch, text_width,
# text_heads, text_layers). Patch 8 at 96 px gives a 12 x 12 token map: the quickstart's shapes
# are 2-5 patches wide in it. Widths are multiples of 64: CLIP derives head counts as width // 64.
CLIP_ARCH = (32, 96, 2, 64, 8, 64, 1, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=OUT_DIR)
    p.add_argument("--sam-steps", type=int, default=600)
    p.add_argument("--clip-steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoders", choices=("both", "sam", "clip"), default="both", help="which to (re)make")
    p.add_argument("--check-scenes", type=int, default=64, help="fresh scenes for the after-training checks")
    return p.parse_args(argv)


def save_gz(state: dict, path: str) -> int:
    """torch.save into gzip (mtime 0, so equal weights give equal bytes), written atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = gzip.compress(buf.getvalue(), compresslevel=9, mtime=0)
    atomic_write_bytes(data, path)
    return len(data)


def scene_batch(rng: np.random.RandomState, n: int, classes: Sequence[str], max_objects: int):
    """n rendered scenes: (images (n, 3, H, W) uint8, per image a list of (class index, polygon))."""
    images, objects = [], []
    for _ in range(n):
        canvas, objs = render_scene(rng, IMAGE_SIZE, classes, max_objects)
        images.append(torch.from_numpy(np.array(canvas)).permute(2, 0, 1))
        objects.append(objs)
    return torch.stack(images), objects


# ---------------------------------------------------------------------------------------- SAM
def low_res_targets(polys: List[List[float]], scale: float, side: int) -> torch.Tensor:
    """Soft masks (N, 1, side/4, side/4) of the polygons in SAM's padded input frame, where SAM's
    low-resolution logits live: drawn at full input size, then area-averaged 4 x 4."""
    out = []
    for poly in polys:
        canvas = Image.new("L", (side, side), 0)
        ImageDraw.Draw(canvas).polygon([c * scale for c in poly], fill=255)
        out.append(torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0))
    return F.avg_pool2d(torch.stack(out)[:, None], 4)


def boxes_of(polys: List[List[float]]) -> torch.Tensor:
    return torch.tensor([[min(p[0::2]), min(p[1::2]), max(p[0::2]), max(p[1::2])] for p in polys])


def jitter(boxes: torch.Tensor, gen: torch.Generator, frac: float = 0.05) -> torch.Tensor:
    """Box prompts with noise of `frac` of each side, as SAM trains on imperfect boxes."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noisy = boxes + torch.randn(boxes.shape, generator=gen) * frac * wh
    h, w = IMAGE_SIZE
    return noisy.clamp(min=0).minimum(torch.tensor([w, h, w, h], dtype=torch.float32))


def region_summary(objs, classes: Sequence[str]) -> torch.Tensor:
    """What the auxiliary read-out of each region token must give: its box (centre and size,
    relative to the image) and its colour (RGB in [0, 1]); (N, 7)."""
    h, w = IMAGE_SIZE
    box = boxes_of([p for _, p in objs])
    geom = torch.stack([(box[:, 0] + box[:, 2]) / (2 * w), (box[:, 1] + box[:, 3]) / (2 * h),
                        (box[:, 2] - box[:, 0]) / w, (box[:, 3] - box[:, 1]) / h], dim=1)
    rgb = torch.tensor([COLOURS[classes[c].split("_")[0]] for c, _ in objs], dtype=torch.float32) / 255.0
    return torch.cat([geom, rgb], dim=1)


def sam_step(enc: SamRegionEncoder, readout: torch.nn.Linear, images: torch.Tensor, objects,
             gen: torch.Generator):
    """Mask loss (BCE + dice on low-res logits), IoU-head loss (MSE) and region-summary loss
    (MSE of the token read-out) of one batch."""
    sam = enc.sam
    x, sizes = zip(*(enc.preprocess(img) for img in images))
    emb = enc.encode_images(torch.stack(x))
    scale = enc.image_size / max(IMAGE_SIZE)
    dense_pe = sam.prompt_encoder.get_dense_pe()
    mask_loss, iou_loss, aux_loss, n = 0.0, 0.0, 0.0, 0
    for i, objs in enumerate(objects):
        polys = [p for _, p in objs]
        boxes = enc.transform.apply_boxes_torch(jitter(boxes_of(polys), gen), IMAGE_SIZE)
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        captured = []
        hook = sam.mask_decoder.transformer.register_forward_hook(
            lambda m, i, o: captured.append(o[0][:, 1, :]))  # the region token, as SamRegionEncoder reads it
        try:
                logits, iou_pred = sam.mask_decoder(image_embeddings=emb[i:i + 1], image_pe=dense_pe,
                                                sparse_prompt_embeddings=sparse,
                                                dense_prompt_embeddings=dense, multimask_output=False)
        finally:
            hook.remove()
        aux_loss = aux_loss + F.mse_loss(readout(captured[0]), region_summary(objs, ALL_CLASSES), reduction="sum")
        target = low_res_targets(polys, scale, enc.image_size)
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * target).sum((1, 2, 3)) + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
        mask_loss = mask_loss + F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2, 3)).sum() + dice.sum()
        with torch.no_grad():
            pred, gt = logits > 0, target > 0.5
            iou = (pred & gt).sum((1, 2, 3)) / (pred | gt).sum((1, 2, 3)).clamp(min=1)
        iou_loss = iou_loss + F.mse_loss(iou_pred[:, 0], iou.float(), reduction="sum")
        n += len(polys)
    return mask_loss / n, iou_loss / n, aux_loss / n


def train_sam(steps: int, seed: int):
    rng, gen = np.random.RandomState(seed), torch.Generator().manual_seed(seed)
    sam = build_sam("tiny", "random", seed)
    enc = SamRegionEncoder(sam, decode_chunk=64).train()
    readout = torch.nn.Linear(enc.token_dim, 7)
    opt = torch.optim.AdamW([*sam.parameters(), *readout.parameters()], lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="tiny SAM", unit="step", dynamic_ncols=True)
    for _ in bar:
        images, objects = scene_batch(rng, 8, ALL_CLASSES, 4)
        mask_loss, iou_loss, aux_loss = sam_step(enc, readout, images, objects, gen)
        opt.zero_grad()
        (mask_loss + iou_loss + aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(mask=f"{mask_loss.item():.3f}", iou=f"{iou_loss.item():.3f}", aux=f"{aux_loss.item():.3f}")
    return sam.eval()


@torch.no_grad()
def check_sam(sam, seed: int, num: int = 64) -> Tuple[float, float]:
    """Mean mask IoU on fresh scenes, and how well a linear probe reads the 6 quickstart classes
    from the region tokens (fit on half, scored on the other half): a diagnostic only."""
    rng = np.random.RandomState(seed)
    enc = SamRegionEncoder(sam).eval()
    ious, tokens, labels = [], [], []
    for _ in range(num):
        images, objects = scene_batch(rng, 1, DEFAULT_CLASSES, 4)
        x, size = enc.preprocess(images[0])
        emb = enc.encode_images(x[None])[0]
        polys = [p for _, p in objects[0]]
        tok, logits = enc.decode_boxes(emb, boxes_of(polys), IMAGE_SIZE)
        target = low_res_targets(polys, enc.image_size / max(IMAGE_SIZE), enc.image_size) > 0.5
        pred = logits > 0
        ious += ((pred & target).sum((1, 2, 3)) / (pred | target).sum((1, 2, 3)).clamp(min=1)).tolist()
        tokens.append(tok)
        labels += [c for c, _ in objects[0]]
    return float(np.mean(ious)), linear_probe(torch.cat(tokens), torch.tensor(labels), len(DEFAULT_CLASSES))


def linear_probe(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    half = len(y) // 2
    mean, std = x[:half].mean(0), x[:half].std(0) + 1e-6
    x = (x - mean) / std
    with torch.enable_grad():
        lin = torch.nn.Linear(x.shape[1], k)
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=200)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(lin(x[:half]), y[:half]) + 1e-3 * lin.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
    return float((lin(x[half:]).argmax(1) == y[half:]).float().mean())


# --------------------------------------------------------------------------------------- CLIP
def caption_names(name: str) -> Tuple[str, str]:
    return name.replace("_", " "), name  # "red circle", and the raw dataset spelling "red_circle"


def train_clip(steps: int, seed: int):
    rng, gen = np.random.RandomState(seed), torch.Generator().manual_seed(seed)
    embed, res, vl, vw, patch, tw, th, tl = CLIP_ARCH
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(embed, res, vl, vw, patch, 77, 49408, tw, th, tl).float()
    enc = ClipImageTextEncoder(model, res)
    templates = TEMPLATE_SETS["ensemble"]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    batch = 32
    bar = tqdm(range(steps), desc="tiny CLIP", unit="step", dynamic_ncols=True)
    for _ in bar:
        images, objects = scene_batch(rng, batch, ALL_CLASSES, 1)
        labels = torch.tensor([objs[0][0] for objs in objects])
        captions = [templates[rng.randint(len(templates))].format(caption_names(ALL_CLASSES[c])[rng.randint(2)])
                    for c in labels.tolist()]
        img = F.normalize(model.encode_image(torch.stack([enc.preprocess(i) for i in images])), dim=-1)
        txt = F.normalize(model.encode_text(clip.tokenize(captions)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        # Several pairs of a batch share a class: every caption of the image's class is a positive.
        same = (labels[:, None] == labels[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean()) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP caps the temperature at 100
        bar.set_postfix(loss=f"{loss.item():.3f}")
    used = set()
    for t in templates:
        for name in ALL_CLASSES:
            for spelling in caption_names(name):
                used.update(clip.tokenize([t.format(spelling)])[0].tolist())
    # Rows of tokens never seen in training carry only their random init: zero them, so the
    # shipped file compresses to little (the text encoder reads them as "no word").
    with torch.no_grad():
        unused = torch.ones(model.token_embedding.weight.shape[0], dtype=torch.bool)
        unused[sorted(used)] = False
        model.token_embedding.weight[unused] = 0
    return model.eval(), enc


@torch.no_grad()
def check_clip(model, enc, seed: int, num: int = 256) -> Tuple[float, float]:
    """Zero-shot top-1 on fresh single-shape scenes over all 18 pairs and over the 6 quickstart
    classes, with the quickstart's single template on raw class names."""
    rng = np.random.RandomState(seed)
    images, objects = scene_batch(rng, num, ALL_CLASSES, 1)
    labels = torch.tensor([objs[0][0] for objs in objects])
    img = F.normalize(model.encode_image(torch.stack([enc.preprocess(i) for i in images])), dim=-1)
    template = TEMPLATE_SETS["single"][0]
    txt = F.normalize(model.encode_text(clip.tokenize([template.format(n) for n in ALL_CLASSES])), dim=-1)
    acc_all = float(((img @ txt.t()).argmax(1) == labels).float().mean())
    sub = [ALL_CLASSES.index(n) for n in DEFAULT_CLASSES]
    keep = torch.tensor([int(l) in sub for l in labels])
    pred6 = torch.tensor(sub)[(img[keep] @ txt[sub].t()).argmax(1)]
    return acc_all, float((pred6 == labels[keep]).float().mean())


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)  # with the seeds: bit-for-bit the same files on every rerun
    torch.manual_seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    figures, written = {}, []
    if args.encoders in ("both", "sam"):
        figures.update(pretrain_sam(args))
        written.append(os.path.join(args.out_dir, SAM_FILE))
    if args.encoders in ("both", "clip"):
        figures.update(pretrain_clip(args))
        written.append(os.path.join(args.out_dir, CLIP_FILE))
    print("\nWrote " + "\n      ".join(f"{p} ({os.path.getsize(p) / 1e3:.0f} kB)" for p in written)
          + f"\nin {time.time() - t0:.0f} s", flush=True)
    return figures


def pretrain_sam(args) -> dict:
    print(f"[1/2] Pretraining tiny SAM ({args.sam_steps} steps: box prompt -> mask of the shape)", flush=True)
    sam = train_sam(args.sam_steps, args.seed)
    iou, probe = check_sam(sam, args.seed + 1, args.check_scenes)
    sam_path = os.path.join(args.out_dir, SAM_FILE)
    save_gz({k: v.contiguous() for k, v in sam.state_dict().items()}, sam_path)
    print(f"      mask IoU {iou:.3f} on fresh scenes; linear probe on its region tokens: {probe:.1%} "
          f"of 6 classes", flush=True)
    return {"sam_mask_iou": iou, "sam_token_probe": probe}


def pretrain_clip(args) -> dict:
    print(f"[2/2] Pretraining tiny CLIP ({args.clip_steps} steps: image-text contrast on shape captions)", flush=True)
    model, enc = train_clip(args.clip_steps, args.seed)
    acc_all, acc6 = check_clip(model, enc, args.seed + 1, 4 * args.check_scenes)
    clip_path = os.path.join(args.out_dir, CLIP_FILE)
    save_gz(model.state_dict(), clip_path)
    print(f"      zero-shot top-1 on fresh scenes: {acc_all:.1%} of 18 colour x shape pairs, "
          f"{acc6:.1%} of the 6 quickstart classes", flush=True)
    return {"clip_top1_18": acc_all, "clip_top1_6": acc6}


if __name__ == "__main__":
    main()
    sys.exit(0)
