#!/usr/bin/env python
"""Export a RegionSpot model to a folder of ONNX graphs that serves without torch (`regionspot_deploy`).

The folder holds SAM's image encoder, CLIP's image tower, the region graph (prompts + any
vocabulary's text embeddings -> class probabilities and masks), CLIP's text tower with its BPE
vocabulary, and a manifest with the pre-processing constants and every file's SHA256. Examples:

    python tools/export_onnx.py --config-file configs/RegionSpot-BL.yaml --weights model_final.pth \\
        --output export/RegionSpot-BL --vocabulary lvis
    python tools/export_onnx.py --config-file configs/RegionSpot-BB.yaml --weights model_final.pth \\
        --output export/RegionSpot-BB-int8 --quantize-int8

Then, on a machine with numpy, Pillow and onnxruntime only:

    from regionspot_deploy import OnnxRegionSpotPredictor
    predictor = OnnxRegionSpotPredictor("export/RegionSpot-BL")
    predictor.set_image("image.jpg")
    results = predictor.predict(boxes=[[10, 20, 200, 240]], vocabulary=["cat", "dog"])
"""
import regionspot.warnings_filter  # noqa: F401  (first: known-harmless warnings of the libraries)
import argparse
import logging
import sys
from typing import Optional, Sequence

logger = logging.getLogger("regionspot.export_onnx")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="a RegionSpot config (or a model-zoo name)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="the RegionSpot checkpoint (default: the config's MODEL.WEIGHTS)")
    p.add_argument("--output", required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--fp16", action="store_true",
                   help="store the weights in float16 (half the size; inputs, outputs and arithmetic stay float32)")
    p.add_argument("--quantize-int8", action="store_true",
                   help="also write int8 dynamically quantized image encoders (*.int8.onnx)")
    p.add_argument("--no-text", action="store_true", help="skip the text graph (serve exported vocabularies only)")
    p.add_argument("--vocabulary", default="",
                   help="also store this vocabulary's text embeddings (lvis | coco | <dataset> | custom | file)")
    p.add_argument("--custom-vocabulary", default="", help="with --vocabulary custom: 'a,b,c' or a file of names")
    p.add_argument("--synonyms", action="store_true", help="average each class's synonyms' embeddings")
    p.add_argument("--verbose", action="store_true", help="also print detectron2's and RegionSpot's info logs")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return p


def export(args: argparse.Namespace) -> dict:
    """Build the model as the predictor does (weights loaded) and write the folder; returns the manifest."""
    from regionspot.config import get_regionspot_cfg
    from regionspot.modeling.region_pipeline import find_pipeline
    from regionspot.modeling.vocabulary import vocabulary_from_options
    from regionspot.onnx_export import export_folder
    from regionspot.predictor import RegionSpotPredictor

    cfg = get_regionspot_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"])
    if args.weights is not None:
        cfg.MODEL.WEIGHTS = args.weights
    cfg.freeze()
    predictor = RegionSpotPredictor(cfg)
    vocabulary = None
    if args.vocabulary:
        spec, _ = vocabulary_from_options(args.vocabulary, args.custom_vocabulary, args.synonyms,
                                          cfg.MODEL.REGIONSPOT.CUSTOM_VOCABULARY)
        names, emb = predictor.vocabulary_embeddings(spec)
        vocabulary = (list(names), emb.float().cpu().numpy())
    return export_folder(find_pipeline(predictor.model), cfg, args.output, opset=args.opset, text=not args.no_text,
                         vocabulary=vocabulary, quantize_int8=args.quantize_int8, fp16=args.fp16,
                         vocabulary_spec=args.vocabulary)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    from regionspot.onnx_export import ExportError

    try:
        manifest = export(args)
    except ExportError as e:
        print(f"export_onnx.py: error: cannot export {e}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        print(f"export_onnx.py: error: {str(e).strip(chr(34))}", file=sys.stderr)
        return 2
    print(f"Wrote {args.output}: {', '.join(sorted(manifest['files']))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from regionspot.utils.console import setup_run_logging

    setup_run_logging(verbose=get_parser().parse_known_args()[0].verbose)
    sys.exit(main())
