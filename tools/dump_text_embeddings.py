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
import regionspot.warnings_filter  # noqa: F401  (first: known-harmless warnings of the libraries)
import argparse
import logging
import sys
from typing import Optional, Sequence

import torch

from regionspot.modeling.encoders import build_clip_encoder
from regionspot.config import get_regionspot_cfg
from regionspot.utils.file_io import check_output_file
from regionspot.modeling.region_pipeline import frozen_precision
from regionspot.modeling.vocabulary import Vocabulary, vocabulary_from_options

logger = logging.getLogger("regionspot.dump_text_embeddings")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE",
                   help="a RegionSpot config (or a model-zoo name): its CLIP, templates and cache folder are used")
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


def dump(args: argparse.Namespace) -> str:
    """Encode the vocabulary and write the file; returns its path."""
    args.output = check_output_file(args.output, "--output")  # before any encoding (exit 2)
    cfg = get_regionspot_cfg(args.config_file, args.opts, freeze=True)
    c = cfg.MODEL.REGIONSPOT
    vocab, _ = vocabulary_from_options(args.vocabulary, args.custom_vocabulary, args.synonyms, c.CUSTOM_VOCABULARY)
    chunk = args.chunk_size or c.TEXT.CHUNK_SIZE
    if chunk < 1:
        raise ValueError(f"--chunk-size must be at least 1, got {chunk}.")
    device = torch.device(cfg.MODEL.DEVICE)
    encoder = build_clip_encoder(cfg).to(device)
    # The model's own text side (same templates, cache and precision), so the file equals what
    # the model computes itself.
    vocabulary = Vocabulary.from_config(cfg, encoder, chunk_size=chunk,
                                        precision=lambda: frozen_precision(device, c.AUTOCAST))
    logger.info(f"Encoding vocabulary {args.vocabulary!r} ({len(vocabulary.templates)} templates, {chunk} prompts "
                f"per call) with CLIP {c.CLIP.NAME} (fingerprint {vocabulary.fingerprint}).")
    vocabulary.write_file(args.output, vocab, [list(g) for g in vocab] if args.synonyms else None)
    return args.output


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        path = dump(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"dump_text_embeddings.py: error: {str(e).strip(chr(34))}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up while writing; the embeddings stay in the cache
        print(f"dump_text_embeddings.py: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from regionspot.utils.console import setup_run_logging

    setup_run_logging(verbose=get_parser().parse_known_args()[0].verbose)
    sys.exit(main())
