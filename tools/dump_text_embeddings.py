#!/usr/bin/env python
"""Precompute the text embeddings of a vocabulary into a file, once, for a given CLIP model.

The file records a fingerprint of the CLIP it was made with; a model with another CLIP refuses
it. Use it as a vocabulary anywhere one is named: ``MODEL.REGIONSPOT.VOCABULARY path.pth``,
``predictor.predict(..., vocabulary="path.pth")``, ``tools/demo.py --vocabulary path.pth``.
Plain vocabularies also land in the text-embedding cache, so naming them ("lvis") later is instant.
Only CLIP is built: SAM is not needed for this. Examples:

    python tools/dump_text_embeddings.py --config-file configs/RegionSpot-BL.yaml \\
        --vocabulary lvis --synonyms --output vocab/lvis_synonyms_BL.pth
    python tools/dump_text_embeddings.py --config-file configs/RegionSpot-BB.yaml \\
        --vocabulary custom --custom-vocabulary my_classes.txt --output vocab/mine.pth
"""
import argparse
import contextlib
import logging
import os
import sys
from typing import List, Optional, Sequence

import torch
from detectron2.config import CfgNode, get_cfg

from regionspot import add_regionspot_config
from regionspot.clip_encoder import build_clip_encoder
from regionspot.meta_arch import AUTOCAST_DTYPES
from regionspot.text_embeddings import (
    cached_class_embeddings,
    clip_fingerprint,
    get_templates,
    read_custom_vocabulary,
    save_embedding_file,
    vocabulary_names,
    vocabulary_synonyms,
)

logger = logging.getLogger("regionspot.dump_text_embeddings")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE",
                   help="a RegionSpot config: its CLIP, templates and cache folder are used")
    p.add_argument("--vocabulary", required=True,
                   help="lvis | coco | <registered dataset> | custom")
    p.add_argument("--custom-vocabulary", default="",
                   help="with --vocabulary custom: 'a,b,c', or a file of names (one per line, "
                        "'name | synonym | ...'; or JSON)")
    p.add_argument("--synonyms", action="store_true",
                   help="average the embeddings of each class's synonyms (LVIS, LVIS-format "
                        "datasets, or a custom file that lists them)")
    p.add_argument("--output", required=True, metavar="FILE", help="the embedding file to write (.pth)")
    p.add_argument("--chunk-size", type=int, default=0,
                   help="prompts per text-encoder call (default: MODEL.REGIONSPOT.TEXT.CHUNK_SIZE)")
    p.add_argument("--verbose", action="store_true", help="also print detectron2's and RegionSpot's info logs")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return p


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    if not os.path.isfile(args.config_file):
        raise ValueError(f"Config file not found: {args.config_file}")
    cfg = get_cfg()
    add_regionspot_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts))
    cfg.freeze()
    return cfg


def vocabulary_groups(args: argparse.Namespace, cfg: CfgNode):
    """(class names, synonym groups or None) that the arguments ask for."""
    if args.vocabulary != "custom":
        if args.custom_vocabulary:
            raise ValueError("--custom-vocabulary needs --vocabulary custom.")
        if args.synonyms:
            groups = vocabulary_synonyms(args.vocabulary)
            return [g[0] for g in groups], groups
        return vocabulary_names(args.vocabulary), None
    names, groups = read_custom_vocabulary(args.custom_vocabulary, cfg.MODEL.REGIONSPOT.CUSTOM_VOCABULARY)
    if args.synonyms and groups is None:
        raise ValueError("--synonyms: the custom vocabulary lists no synonyms ('name | synonym' lines).")
    return names, (groups if args.synonyms else None)


def dump(args: argparse.Namespace) -> str:
    """Encode the vocabulary and write the file; returns its path."""
    cfg = setup_cfg(args)
    names, groups = vocabulary_groups(args, cfg)
    c = cfg.MODEL.REGIONSPOT
    device = torch.device(cfg.MODEL.DEVICE)
    encoder = build_clip_encoder(cfg).to(device)
    if c.AUTOCAST not in AUTOCAST_DTYPES:
        raise ValueError(f"Unknown MODEL.REGIONSPOT.AUTOCAST {c.AUTOCAST!r}; choose '', 'bf16' or 'fp16'.")
    dtype = AUTOCAST_DTYPES[c.AUTOCAST]

    def encode_text(prompts: List[str]) -> torch.Tensor:
        # As the model encodes text (same autocast), so the file equals what it computes itself.
        ctx = torch.autocast(device_type=device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return encoder.encode_text(prompts)

    templates = get_templates(c.TEXT.TEMPLATES)
    fingerprint = clip_fingerprint(encoder.clip_model)
    chunk = args.chunk_size or c.TEXT.CHUNK_SIZE
    if chunk < 1:
        raise ValueError(f"--chunk-size must be at least 1, got {chunk}.")
    n_prompts = sum(len(g) for g in groups) * len(templates) if groups else len(names) * len(templates)
    logger.info(f"Encoding {len(names)} classes ({n_prompts} prompts, {chunk} per call) with CLIP "
                f"{c.CLIP.NAME} (fingerprint {fingerprint}).")
    emb = cached_class_embeddings(encode_text, fingerprint, names, templates, c.TEXT.CACHE_DIR, chunk,
                                  synonyms=groups)
    save_embedding_file(args.output, names, emb, fingerprint, templates, groups)
    return args.output


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        path = dump(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"dump_text_embeddings.py: error: {str(e).strip(chr(34))}", file=sys.stderr)
        return 2
    print(f"Wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from regionspot.console import setup_run_logging

    setup_run_logging(verbose=get_parser().parse_known_args()[0].verbose)
    sys.exit(main())
