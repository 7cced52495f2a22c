#!/usr/bin/env python
"""RegionSpot demo: recognize the regions of your own images with any vocabulary.

Region prompts come from exactly one of: a boxes file (--boxes), another detector's results
(--proposals), or SAM's automatic mask generator (--sam-auto). Pictures are drawn with
detectron2's Visualizer; --json-output writes COCO-format results. Examples:

    python tools/demo.py --config-file configs/RegionSpot-BB.yaml --input images/ \\
        --proposals glip_boxes.json --vocabulary lvis --output vis/ --json-output results.json \\
        --opts MODEL.WEIGHTS regionspot_bb.pth
    python tools/demo.py --config-file ... --input 'photos/*.jpg' --sam-auto \\
        --vocabulary custom --custom-vocabulary "cat,dog,sofa" --output vis/

Exit code: 0 when every image was processed, 1 when some image failed (each is reported by
name; the others still finish and the JSON is still written), 2 for bad options or files given on
the command line, output paths that cannot be written included (checked before any image is read).
"""
import regionspot.warnings_filter  # noqa: F401  (first: known-harmless warnings of the libraries)
import argparse
import glob
import json
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
from detectron2.config import CfgNode
from PIL import Image
from tqdm import tqdm

from regionspot.config import get_regionspot_cfg
from regionspot.demo.results import result_records
from regionspot.evaluation import category_ids
from regionspot.utils.file_io import OutputPathError, atomic_write_bytes, check_output_dir, check_output_file
from regionspot.data.images import read_image
from regionspot.data.prompt_files import image_id_of, lookup_prompts, read_box_file, read_image_ids
from regionspot.predictor import RegionSpotPredictor
from regionspot.data.proposals import read_json_proposals
from regionspot.modeling.encoders.region_encoder import SAM_AUTO_EMPTY_HINT
from regionspot.modeling.vocabulary import VocabularyLike, vocabulary_from_options
from regionspot.visualization import draw_regions

logger = logging.getLogger("regionspot.demo")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


class UsageError(Exception):
    """A bad option or command-line file: reported, exit code 2."""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="RegionSpot demo: classify region prompts of your images with any vocabulary.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config-file", required=True, metavar="FILE",
                   help="a RegionSpot config file, or a model-zoo name (e.g. RegionSpot-BB.yaml)")
    p.add_argument("--input", nargs="+", required=True,
                   help="image files, glob patterns (quote them) or folders of images")
    p.add_argument("--output", help="a folder for the drawn pictures (PNG); a file path for a single image")
    p.add_argument("--json-output", metavar="FILE", help="write the detections as COCO-format results")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--boxes", metavar="FILE",
                         help="box prompts per image: JSON {image: [[x0,y0,x1,y1], ...]} or "
                              "{image: {'boxes': [...], 'scores': [...]}}, a JSON list of boxes for "
                              "every image, or a text file of lines '[image] x0 y0 x1 y1'")
    prompts.add_argument("--proposals", metavar="FILE",
                         help="another detector's results: COCO results JSON, or per-image "
                              "{boxes, scores, labels} JSON; their scores multiply the class scores")
    prompts.add_argument("--sam-auto", action="store_true",
                         help="prompt with the boxes of SAM's automatic mask generator "
                              "(settings: MODEL.REGIONSPOT.SAM_AUTO.*)")
    p.add_argument("--box-mode", choices=("XYXY", "XYWH"), default="XYXY",
                   help="box layout of --boxes and of per-image proposal files (COCO results are XYWH)")
    p.add_argument("--proposal-topk", type=int, default=0,
                   help="keep each image's N best-scoring proposals (0 = all)")
    p.add_argument("--image-ids", metavar="JSON",
                   help="a COCO/LVIS-format json whose 'images' give each file name its image id "
                        "(default: a numeric file name is the id, e.g. 000000397133.jpg -> 397133)")
    p.add_argument("--vocabulary", default="",
                   help="lvis | coco | <registered dataset> | custom | <text-embedding file>; default: "
                        "MODEL.REGIONSPOT.VOCABULARY, else the config's first test dataset, else lvis")
    p.add_argument("--custom-vocabulary", default="",
                   help="with --vocabulary custom: 'a,b,c', or a file of names (one per line, "
                        "'name | synonym | ...'; or JSON), or a text-embedding file")
    p.add_argument("--synonyms", action="store_true",
                   help="average each class's synonyms' embeddings (LVIS and LVIS-format datasets, "
                        "or synonyms in a --custom-vocabulary file)")
    p.add_argument("--confidence-threshold", type=float, default=0.0,
                   help="keep detections scoring at least this (class probability x prompt score)")
    p.add_argument("--classes-per-region", type=int, default=1,
                   help="(box, class) pairs per region in the JSON output: each region's K best classes")
    p.add_argument("--detections-per-image", type=int, default=0, metavar="N",
                   help="instead, the image's N best (box, class) pairs over all regions, as --eval-only "
                        "keeps them (TEST.DETECTIONS_PER_IMAGE)")
    p.add_argument("--verbose", action="store_true", help="also print detectron2's and RegionSpot's info logs")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                   help="config overrides as KEY VALUE pairs, e.g. MODEL.DEVICE cpu MODEL.WEIGHTS x.pth")
    return p


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    try:
        return get_regionspot_cfg(args.config_file, args.opts, freeze=True)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e


def find_images(inputs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(image files, inputs that matched nothing): folders give their image files, globs expand."""
    found, unmatched = [], []
    for item in inputs:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            files = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, f)))
        elif os.path.isfile(item):
            files = [item]
        else:
            files = sorted(f for f in glob.glob(item) if os.path.isfile(f))
        (found.extend(files) if files else unmatched.append(item))
    seen = set()
    return [f for f in found if not (f in seen or seen.add(f))], unmatched


def resolve_vocabulary(args: argparse.Namespace, cfg: CfgNode) -> Tuple[VocabularyLike, Optional[str]]:
    """(the vocabulary for the predictor, the dataset spec its category ids come from, if any)."""
    spec = args.vocabulary or cfg.MODEL.REGIONSPOT.VOCABULARY or (
        cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "lvis")
    try:
        return vocabulary_from_options(spec, args.custom_vocabulary, args.synonyms,
                                       cfg.MODEL.REGIONSPOT.CUSTOM_VOCABULARY)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise UsageError(str(e).strip('"')) from e


def picture_is_a_file(output: str, single: bool) -> bool:
    """--output is the picture's own file name (one input image, an image extension), not a folder."""
    return single and os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS and not os.path.isdir(output)


def check_outputs(args: argparse.Namespace, single: bool) -> None:
    """Refuse unwritable --output / --json-output before any image is processed (exit 2)."""
    try:
        if args.json_output:
            args.json_output = check_output_file(args.json_output, "--json-output")
        if args.output:
            check = check_output_file if picture_is_a_file(args.output, single) else check_output_dir
            args.output = check(args.output, "--output")
    except OutputPathError as e:
        raise UsageError(str(e)) from e


def output_path(output: str, image: str, single: bool, used: set) -> str:
    if picture_is_a_file(output, single):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        return output
    os.makedirs(output, exist_ok=True)
    stem = os.path.splitext(os.path.basename(image))[0]
    name, n = stem, 1
    while name in used:  # two inputs with one name from different folders
        name, n = f"{stem}_{n}", n + 1
    used.add(name)
    return os.path.join(output, name + ".png")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.classes_per_region < 1:
        raise UsageError(f"--classes-per-region must be at least 1, got {args.classes_per_region}.")
    if args.detections_per_image < 0:
        raise UsageError(f"--detections-per-image must be positive, got {args.detections_per_image}.")
    cfg = setup_cfg(args)
    images, unmatched = find_images(args.input)
    for item in unmatched:
        logger.error(f"--input {item} matches no image file.")
    if not images:
        raise UsageError(f"No images found in --input {args.input}.")
    check_outputs(args, single=len(images) == 1)
    table = None
    if args.boxes:
        try:
            table = read_box_file(args.boxes, args.box_mode)
        except ValueError as e:
            raise UsageError(str(e)) from e
    elif args.proposals:
        try:
            table = read_json_proposals(args.proposals, args.box_mode)
        except (OSError, ValueError) as e:
            raise UsageError(f"Cannot read --proposals {args.proposals}: {e}") from e
    try:
        ids = read_image_ids(args.image_ids)
    except ValueError as e:
        raise UsageError(f"--image-ids: {e}") from e
    vocabulary, id_spec = resolve_vocabulary(args, cfg)

    predictor = RegionSpotPredictor(cfg)
    try:
        names, _ = predictor.vocabulary_embeddings(vocabulary)
    except (KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"Bad vocabulary: {str(e).strip(chr(34))}") from e
    metadata = predictor.metadata(vocabulary)
    cat_ids = category_ids(id_spec, len(names))
    use_scores = args.proposals is not None and cfg.MODEL.REGIONSPOT.USE_PROPOSAL_SCORE
    top_k = max(args.classes_per_region, predictor.top_k)

    failures: List[Tuple[str, str]] = [(item, "matches no image file") for item in unmatched]
    results, used_names = [], set()
    no_auto_boxes = 0  # images where SAM's automatic mask generator found nothing
    for path in tqdm(images, desc="RegionSpot demo", unit="image"):
        try:
            rgb = read_image(path, format="RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            failures.append((path, f"unreadable image ({e})"))
            logger.error(f"Skipping {path}: unreadable image ({e}).")
            continue
        image_id = image_id_of(path, ids)
        scores = None
        if not args.sam_auto:
            entry = lookup_prompts(table, path, image_id)
            if entry is None:
                source = args.boxes or args.proposals
                if cfg.MODEL.REGIONSPOT.MISSING_PROPOSALS == "error":
                    failures.append((path, f"no prompts in {source}"))
                    logger.error(f"Skipping {path}: {source} has no entry for it (image id {image_id!r}); set "
                                 "--opts MODEL.REGIONSPOT.MISSING_PROPOSALS empty to give it no detections.")
                    continue
                entry = (np.zeros((0, 4), np.float32), None)
            boxes, scores = entry
            if args.proposal_topk > 0 and scores is not None and len(scores) > args.proposal_topk:
                top = np.argsort(-scores, kind="stable")[: args.proposal_topk]
                boxes, scores = boxes[top], scores[top]
            if not use_scores:
                scores = None
        try:  # everything about one image fails for that image alone
            predictor.set_image(rgb, format="RGB")
            if args.sam_auto:
                boxes = predictor.sam_auto_boxes()
                no_auto_boxes += len(boxes) == 0
            res = predictor.predict(boxes=boxes, prompt_scores=scores, vocabulary=vocabulary, top_k=top_k)
        except (ValueError, RuntimeError) as e:
            failures.append((path, str(e)))
            logger.error(f"Skipping {path}: {e}")
            continue
        res = res.cpu()
        if args.json_output:
            pairs = (res.to_detections(args.detections_per_image) if args.detections_per_image
                     else res.to_instances(args.classes_per_region))
            pairs = pairs[pairs.scores >= args.confidence_threshold]
            results.extend(result_records(pairs, image_id, names, ids=cat_ids))
        if args.output:
            instances = res.to_instances()
            instances = instances[instances.scores >= args.confidence_threshold]
            drawn = draw_regions(rgb, instances, metadata)
            picture = output_path(args.output, path, len(images) == 1, used_names)
            try:
                drawn.save(picture)
            except OSError as e:
                failures.append((path, f"cannot write {picture} ({e})"))
                logger.error(f"Cannot write the picture of {path} to {picture}: {e}")

    if args.json_output:
        try:
            atomic_write_bytes(json.dumps(results).encode(), args.json_output)
        except OSError as e:
            failures.append((args.json_output, str(e)))
            logger.error(str(e))
    done = len(images) - sum(1 for f, _ in failures if f in images)
    summary = f"RegionSpot demo: {done} of {len(images)} images done"
    if args.json_output:
        summary += f", {len(results)} detections in {args.json_output}"
    if args.output:
        summary += f", pictures in {args.output}"
    print(summary + ".", file=sys.stderr)
    if no_auto_boxes:
        print(f"{no_auto_boxes} of {len(images)} images got no --sam-auto region, hence no detections. "
              f"{SAM_AUTO_EMPTY_HINT}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} failed:", file=sys.stderr)
        for item, why in failures:
            print(f"  {item}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from regionspot.utils.console import setup_run_logging

    setup_run_logging(verbose=get_parser().parse_known_args()[0].verbose)
    sys.exit(main())
