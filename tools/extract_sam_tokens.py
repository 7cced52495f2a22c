#!/usr/bin/env python
"""Cache frozen SAM's region tokens for the ground-truth boxes of registered datasets.

    python tools/extract_sam_tokens.py --config-file configs/train/... [--dataset NAME ...] \
        [--output DIR] [--shard i --num-shards n] [--num-gpus N --num-machines M ...] [KEY VALUE ...]

Writes one file per image under OUTPUT/<dataset>/<sam type>/. Restarting a killed run redoes
nothing already written; truncated or corrupt files are redone.
"""
import sys

import regionspot  # noqa: F401  (registers datasets)
import torch
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from regionspot.config import load_config
from regionspot.sam_encoder import build_sam_encoder
from regionspot.token_extraction import extract_tokens, gather_summaries


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--dataset", action="append", default=None,
                        help="dataset to extract (repeatable); default: DATASETS.TRAIN")
    parser.add_argument("--output", default=None, help="cache root; default MODEL.REGIONSPOT.TOKEN_CACHE_DIR")
    parser.add_argument("--shard", type=int, default=0, help="index of this job among --num-shards")
    parser.add_argument("--num-shards", type=int, default=1, help="independent jobs splitting the images")
    return parser.parse_args(argv)


def main(args):
    setup_logger(name="regionspot", distributed_rank=comm.get_rank())
    cfg = load_config(args.config_file, args.opts)
    device = torch.device(cfg.MODEL.DEVICE)
    sam = build_sam_encoder(cfg).to(device)
    output = args.output if args.output is not None else cfg.MODEL.REGIONSPOT.TOKEN_CACHE_DIR
    datasets = args.dataset or list(cfg.DATASETS.TRAIN)
    if not datasets:
        raise ValueError("No dataset to extract: give --dataset or set DATASETS.TRAIN.")
    failed = 0
    for name in datasets:
        summary = extract_tokens(sam, cfg, name, output, shard=args.shard, num_shards=args.num_shards,
                                 autocast=cfg.MODEL.REGIONSPOT.AUTOCAST)
        summary = gather_summaries(summary)
        if comm.is_main_process():
            print(f"[{name}] {summary}", flush=True)
        failed += len(summary.failed)
    return failed


def _entry(args):
    failed = main(args)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    args = parse_args()
    launch(_entry, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
