#!/usr/bin/env python
"""Cache frozen SAM's region tokens for the ground-truth boxes of registered datasets.

    python tools/extract_sam_tokens.py --config-file configs/train/... [--dataset NAME ...] \
        [--output DIR] [--shard i --num-shards n] [--num-gpus N --num-machines M ...] [KEY VALUE ...]

Writes one file per image under OUTPUT/<dataset>/<sam type>/. Restarting a killed run redoes
nothing already written; truncated or corrupt files are redone.
"""
import regionspot.warnings_filter  # noqa: F401  (first: known-harmless warnings of the libraries)
import os
import sys

import regionspot  # noqa: F401  (registers datasets)
import torch
from detectron2.engine import default_argument_parser
from detectron2.utils import comm
from regionspot.config import get_regionspot_cfg
from regionspot.engine.launch import launch
from regionspot.utils.console import setup_run_logging
from regionspot.utils.file_io import OutputPathError, check_output_dir
from regionspot.modeling.encoders import build_sam_encoder
from regionspot.modeling.text_embeddings import default_cache_dir
from regionspot.data.token_extraction import extract_tokens, gather_summaries


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--dataset", action="append", default=None,
                        help="dataset to extract (repeatable); default: DATASETS.TRAIN")
    parser.add_argument("--output", default=None, help="cache root; default MODEL.REGIONSPOT.TOKEN_CACHE_DIR")
    parser.add_argument("--shard", type=int, default=0, help="index of this job among --num-shards")
    parser.add_argument("--num-shards", type=int, default=1, help="independent jobs splitting the images")
    parser.add_argument("--verbose", action="store_true", help="also print detectron2's and RegionSpot's info logs")
    return parser.parse_args(argv)


def main(args):
    setup_run_logging(verbose=getattr(args, "verbose", False))
    cfg = get_regionspot_cfg(args.config_file, args.opts, freeze=True)  # a path or a model-zoo name
    output = args.output if args.output is not None else cfg.MODEL.REGIONSPOT.TOKEN_CACHE_DIR
    try:  # before SAM is built or any image is encoded
        check_output_dir(output or os.path.join(default_cache_dir(), "sam_tokens"),
                         "--output" if args.output is not None else "MODEL.REGIONSPOT.TOKEN_CACHE_DIR")
    except OutputPathError as e:
        print(f"extract_sam_tokens.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    device = torch.device(cfg.MODEL.DEVICE)
    sam = build_sam_encoder(cfg).to(device)
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
