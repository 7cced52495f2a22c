#!/usr/bin/env python
"""Import the SAM ViT-B token files released with the original RegionSpot into our token cache.

    python tools/import_sam_tokens.py --config-file configs/train/RegionSpot-BL_stage1_o365.yaml \
        --released-root datasets/datasets_mask_tokens_vit_b [--dataset NAME ...] \
        [--source-folder objects365] [--class-ids auto] [--output DIR] [KEY VALUE ...]

Each `<released-root>/<folder>/<image_id>.pth` is matched to its image's annotations by count and
class; files that do not match are listed by name (exit code 1) and never imported. A re-run skips
what is already imported. Cached training (MODEL.REGIONSPOT.TOKEN_MODE cached) then reads them.
"""
import regionspot.warnings_filter  # noqa: F401  (first: known-harmless warnings of the libraries)
import argparse
import sys

import regionspot  # noqa: F401  (registers datasets)
from detectron2.utils.logger import setup_logger
from regionspot.config import get_regionspot_cfg
from regionspot.token_import import CLASS_ID_CONVENTIONS, import_released_tokens


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--released-root", required=True, metavar="DIR",
                   help="the folder holding objects365/, v3det/, openimages/ of the released tokens")
    p.add_argument("--dataset", action="append", default=None, help="dataset to import (repeatable); default: DATASETS.TRAIN")
    p.add_argument("--source-folder", default="", help="folder under --released-root (default: by dataset name)")
    p.add_argument("--class-ids", default="auto", choices=("auto",) + CLASS_ID_CONVENTIONS,
                   help="how the files' classes relate to the dataset's categories (auto: the one that matches)")
    p.add_argument("--output", default=None, help="cache root; default MODEL.REGIONSPOT.TOKEN_CACHE_DIR")
    p.add_argument("--allow-other-sam", action="store_true",
                   help="label the files as tokens of the config's SAM even if it is not the official ViT-B")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="regionspot")
    cfg = get_regionspot_cfg(args.config_file, args.opts, freeze=True)
    output = args.output if args.output is not None else cfg.MODEL.REGIONSPOT.TOKEN_CACHE_DIR
    datasets = args.dataset or list(cfg.DATASETS.TRAIN)
    if not datasets:
        print("import_sam_tokens.py: error: no dataset: give --dataset or set DATASETS.TRAIN.", file=sys.stderr)
        return 2
    failed = 0
    for name in datasets:
        summary = import_released_tokens(cfg, name, args.released_root, output, source_folder=args.source_folder,
                                         class_ids=args.class_ids, allow_other_sam=args.allow_other_sam)
        print(f"[{name}] {summary}", flush=True)
        failed += len(summary.failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
