#!/usr/bin/env python
"""Time SAM's mask decoder alone, with and without masks, on one image's box prompts.

    python tools/decoder_benchmark.py --sam vit_b sam2.1_hiera_b+ --boxes 12 300

Random weights and a random image embedding of the right shape (the image encoder is not run):
what `decode_prompts` costs per image with masks (evaluation with MASK_ON) and without them
(`masks=False`: MASK_ON False, token extraction, online training), on the same prompts. The two
alternate every --slice prompts (each timed call decodes one slice), so that a shared machine's
changing load slows both alike; the sums over all slices are reported, the best of --repeats, and
the tokens are checked to be identical.
"""
import regionspot.warnings_filter  # noqa: F401  (first: known-harmless warnings of the libraries)
import argparse
import sys
import time

import torch

from regionspot.config import get_regionspot_cfg
from regionspot.modeling.encoders.build import build_sam_encoder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sam", nargs="+", default=["vit_b"], help="SAM types (MODEL.REGIONSPOT.SAM.TYPE)")
    p.add_argument("--boxes", nargs="+", type=int, default=[12, 300], help="box prompts per image")
    p.add_argument("--image-size", default="640x480", help="WxH of the image the boxes are in")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each (best is reported)")
    p.add_argument("--slice", type=int, default=12, help="prompts per timed call (the two ways alternate)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    return p.parse_args(argv)


def random_embedding(enc, g: torch.Generator):
    """A random image embedding shaped as `enc.encode_images` gives it for one image."""
    side = enc.image_size // 16
    if hasattr(enc.sam, "sam_mask_decoder"):  # SAM 2: Sam2Features with the decoder's high-res skips
        from regionspot.modeling.encoders.sam2_encoder import Sam2Features

        d = enc.token_dim
        return Sam2Features(torch.randn(d, side, side, generator=g),
                            (torch.randn(d // 8, 4 * side, 4 * side, generator=g),
                             torch.randn(d // 4, 2 * side, 2 * side, generator=g)))
    return torch.randn(enc.token_dim, side, side, generator=g)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.image_size.split("x"))
    print(f"decoder only, random weights, {torch.get_num_threads()} threads, image {w}x{h}; best of {args.repeats}")
    print("| SAM | boxes | with masks s | tokens only s | saved |\n|---|---|---|---|---|")
    for sam_type in args.sam:
        cfg = get_regionspot_cfg()
        cfg.MODEL.REGIONSPOT.SAM.TYPE, cfg.MODEL.REGIONSPOT.SAM.CHECKPOINT = sam_type, "random"
        enc = build_sam_encoder(cfg)
        g = torch.Generator().manual_seed(0)
        emb = random_embedding(enc, g)
        with torch.no_grad():
            enc.decode_boxes(emb, torch.tensor([[10.0, 10.0, 50.0, 60.0]]), (h, w))  # warm-up
            for n in args.boxes:
                xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
                boxes = torch.cat([xy, xy + (torch.rand(n, 2, generator=g) * 0.3 + 0.05) * torch.tensor([w, h])], 1)
                best = {True: float("inf"), False: float("inf")}
                tokens = {True: [], False: []}
                for _ in range(args.repeats):
                    spent = {True: 0.0, False: 0.0}
                    for k, part in enumerate(boxes.split(args.slice)):
                        for masks in ((True, False) if k % 2 == 0 else (False, True)):
                            t0 = time.perf_counter()
                            tokens[masks].append(enc.decode_boxes(emb, part, (h, w), masks=masks)[0])
                            spent[masks] += time.perf_counter() - t0
                    best = {m: min(best[m], spent[m]) for m in best}
                same = "" if torch.equal(torch.cat(tokens[True]), torch.cat(tokens[False])) else " (TOKENS DIFFER)"
                print(f"| {sam_type} | {n} | {best[True]:.2f} | {best[False]:.2f} | "
                      f"{(1 - best[False] / max(best[True], 1e-9)) * 100:.0f}%{same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
