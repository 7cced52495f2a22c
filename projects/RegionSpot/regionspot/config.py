"""Config keys of RegionSpot. Every key lives under ``cfg.MODEL.REGIONSPOT``."""
import math
from numbers import Real
from typing import Optional, Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .utils.config_files import resolve_config_file


def add_regionspot_config(cfg: CN) -> None:
    """Add RegionSpot's keys (with their defaults) to a detectron2 config, in place."""
    # MODEL.META_ARCHITECTURE "RegionSpot" and INPUT.FORMAT "RGB" are set by
    # configs/Base-RegionSpot.yaml (a BGR loader works too: the model flips the channels).
    _C = cfg.MODEL.REGIONSPOT = CN()

    _C.SAM = CN()
    # SAM variant: vit_b | vit_l | vit_h (segment_anything), sam2.1_hiera_t | sam2.1_hiera_s |
    # sam2.1_hiera_b+ | sam2.1_hiera_l (SAM 2.1, extra `regionspot[sam2]`), or "tiny" /
    # "sam2_tiny" (small ones for tests and the quickstart: random, or the quickstart's
    # pretrained SAM with CHECKPOINT regionspot://pretrained/...).
    _C.SAM.TYPE = "vit_b"
    # Local path, http(s) URL (downloaded once, cached by iopath; every download gives up after
    # $REGIONSPOT_DOWNLOAD_TIMEOUT seconds without data, default 60) or regionspot://<file>
    # (shipped in the package). "" = the official checkpoint of SAM.TYPE ("tiny": random),
    # "random" = random init (benchmarks, tests).
    _C.SAM.CHECKPOINT = ""
    # Boxes per mask-decoder call: bounds memory, which then grows linearly in the boxes.
    # 0 = by device: 4 on a CPU (each box's decoder works on 4096x256 image tokens, so small
    # chunks stay in cache: 64 boxes decode 2.2x faster in chunks of 4 than of 64), 64 elsewhere.
    _C.SAM.DECODE_CHUNK = 0
    # Run the image encoder's attention through torch's fused scaled_dot_product_attention with
    # SAM's relative positions as the additive mask (regionspot/modeling/encoders/sam_attention.py): same outputs,
    # 1.27x faster SAM ViT-B encoder on the CPU. SAM (segment_anything) only: the SAM 2 types ignore
    # it (their Hiera encoder already calls the fused attention).
    _C.SAM.FUSED_ATTENTION = True

    _C.CLIP = CN()
    # Which package builds the vision-language model: "clip" (OpenAI's `clip` package, the
    # paper's) or "open_clip" (any open_clip model: DFN, MetaCLIP, EVA, SigLIP, ...; extra
    # `regionspot[open_clip]`).
    _C.CLIP.BACKEND = "clip"
    # BACKEND clip: a name known to the `clip` package (ViT-B/16, ViT-L/14, ViT-L/14@336px, ...)
    # or "tiny". BACKEND open_clip: an open_clip model name with a ViT image tower
    # (ViT-L-14-quickgelu, ViT-SO400M-14-SigLIP-384, EVA02-L-14, ...; open_clip.list_models()), or
    # "tiny" / "tiny-timm" (tiny random models for tests; tiny-timm on a timm trunk, as SigLIP).
    _C.CLIP.NAME = "ViT-B/16"
    # BACKEND open_clip: the pretrained tag open_clip downloads when CHECKPOINT is "" (dfn2b,
    # metaclip_fullcc, webli, ...; see open_clip.list_pretrained_tags_by_model). It also gives
    # the image mean / std of a CHECKPOINT file ("": those all of the model's tags share).
    _C.CLIP.PRETRAINED = ""
    # Local path, http(s) URL or regionspot://<file> of an OpenAI-format CLIP file (TorchScript
    # or plain state dict, optionally gzip-compressed). "" = download CLIP.NAME from the clip
    # package's URL (cached in CLIP.DOWNLOAD_ROOT, SHA256-checked; "tiny": random), "random" =
    # random init. BACKEND open_clip: a local path, URL or regionspot://<file> of a weights file
    # open_clip's `pretrained=` reads (optionally gzip-compressed); "" = the PRETRAINED tag
    # through open_clip's own download (no tag: random), "random" = random init.
    _C.CLIP.CHECKPOINT = ""
    # Cache folder of CLIP downloads by name ("" = ~/.cache/clip, the clip package's). BACKEND
    # open_clip: open_clip's cache_dir for PRETRAINED downloads ("" = its default).
    _C.CLIP.DOWNLOAD_ROOT = ""
    # Square input size of the image CLIP sees (a multiple of its patch size); positional
    # embeddings are interpolated to it. BACKEND open_clip: the model is built at this size
    # (open_clip's force_image_size), which resamples the checkpoint's positional embeddings.
    _C.CLIP.INPUT_SIZE = 224
    # How the whole image is squashed to CLIP's square. The original code uses torchvision's
    # default tensor resize: bilinear, antialiased since torchvision 0.17 (January 2024) and not
    # before. The released heads were trained and evaluated in 2023, so the default is bilinear
    # without antialiasing; ANTIALIAS True is what the original code does with a current
    # torchvision. Only an LVIS run with the released weights can tell which reproduces the
    # paper best. RESIZE_MODE: "bilinear" or "bicubic".
    _C.CLIP.RESIZE_MODE = "bilinear"
    _C.CLIP.ANTIALIAS = False
    # Seed of randomly initialised encoders (checkpoint "random", tiny models). Fixed, so every
    # build and every process gets the same "random" SAM and CLIP.
    _C.RANDOM_INIT_SEED = 0

    # Mixed precision for the frozen encoders: "" (fp32), "bf16" or "fp16". The head stays fp32.
    _C.AUTOCAST = ""
    # torch.compile the frozen SAM image encoder, SAM mask decoder and CLIP image tower: "" (off)
    # or a torch.compile mode ("default", "max-autotune", ...). The first batch pays the
    # compilation (1-2 min cold on a CPU); see docs/speed.md for what it buys.
    _C.COMPILE = ""

    # A checkpoint (MODEL.WEIGHTS) that leaves some head tensors at their random initialisation
    # (missing keys or other shapes) is an error naming them; True = only warn (e.g. fine-tuning
    # from a head of another shape on purpose). An empty MODEL.WEIGHTS always means a random head.
    _C.ALLOW_RANDOM_HEAD = False

    _C.HEAD = CN()
    _C.HEAD.NUM_LAYERS = 3
    _C.HEAD.NUM_HEADS = 8
    _C.HEAD.DIM_FEEDFORWARD = 2048
    _C.HEAD.DROPOUT = 0.1

    _C.TEXT = CN()
    # "ensemble" = the 80 CLIP ImageNet templates plus "{}."; "single" = "a photo of a {}."
    _C.TEXT.TEMPLATES = "ensemble"
    # Where text embeddings are cached. "" = $REGIONSPOT_CACHE or ~/.cache/regionspot.
    _C.TEXT.CACHE_DIR = ""
    # Prompts per text-encoder call: bounds memory for large vocabularies.
    _C.TEXT.CHUNK_SIZE = 256

    # Vocabulary when an input names none: "" = the evaluated/trained dataset's thing_classes,
    # "lvis", "coco", a registered dataset name, "custom" (CUSTOM_VOCABULARY), or the path of an
    # embedding file made by tools/dump_text_embeddings.py.
    _C.VOCABULARY = ""
    _C.CUSTOM_VOCABULARY = []

    # Where box prompts come from at inference: "gt" (the dataset's boxes), "proposals"
    # (DATASETS.PROPOSAL_FILES_TEST), "sam_auto" (SAM's automatic mask generator), "detector"
    # (any detectron2 model, DETECTOR below) or a class registered in PROMPT_SOURCE_REGISTRY.
    _C.PROMPT = "gt"
    _C.DETECTOR = CN()
    # The detector: a yacs .yaml, a LazyConfig .py, or a detectron2 model-zoo config name
    # (e.g. "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml").
    _C.DETECTOR.CONFIG_FILE = ""
    # Its weights: a path or URL ("" with a model-zoo name = that model's released weights).
    _C.DETECTOR.WEIGHTS = ""
    # Overrides of the detector's config ("KEY VALUE" pairs, or LazyConfig "key=value" strings).
    _C.DETECTOR.OPTS = []
    # Keep its boxes scored at least this, the TOPK best per image (0 = all), after optional
    # class-agnostic NMS at this IoU (0 = off).
    _C.DETECTOR.SCORE_THRESH = 0.05
    _C.DETECTOR.TOPK = 300
    _C.DETECTOR.NMS_THRESH = 0.0
    # Multiply class probabilities by the proposal's own score when it has one.
    _C.USE_PROPOSAL_SCORE = True
    # An image with no entry in the proposals file: "error" or "empty" (no prompts, no detections).
    _C.MISSING_PROPOSALS = "error"
    # Box layout of per-image {boxes, scores, labels} JSON files (GLIP style): XYXY or XYWH.
    _C.PROPOSAL_BOX_MODE = "XYXY"
    # Images per forward in evaluation (detectron2's test loader batch, per process). The frozen
    # encoders then run on the whole batch at once: worth it on a GPU, neutral on a CPU.
    _C.TEST_IMS_PER_BATCH = 1
    # Predict masks with SAM (needed for segm evaluation).
    _C.MASK_ON = True
    # Evaluation at scale (docs/EVALUATION_AT_SCALE.md). Each process streams its images' results
    # to OUTPUT_DIR/inference/<dataset>/results/ shards; the final evaluation reads them once.
    _C.EVAL = CN()
    # "auto" (faster-coco-eval where installed, extra `fasteval`), "faster_coco_eval", or
    # "reference" (the lvis package / pycocotools). All give the same figures.
    _C.EVAL.ENGINE = "auto"
    # Continue an interrupted evaluation: keep its complete shards and run only the other images
    # (train_net.py --eval-only --resume sets it).
    _C.EVAL.RESUME = False
    # Images per results shard: at most what a killed run loses per process.
    _C.EVAL.IMAGES_PER_SHARD = 100
    # Detections evaluated together at most (categories are evaluated in chunks): bounds memory.
    _C.EVAL.DETS_PER_CHUNK = 300000
    # Processes of the final evaluation (0 = one per CPU, at most 8). Each holds the ground truth and
    # one chunk (about 1.2 GB at LVIS val's size), so this bounds its memory.
    _C.EVAL.PROCESSES = 0
    # Paste kept masks at full size with one interpolation from SAM's low-res logits instead of
    # SAM's two (via a 1024x1024 buffer): same masks (IoU >= 0.99, tested), 1.5-7x faster on CPU.
    _C.FAST_MASK_PASTE = True

    # Training. Region tokens come from SAM run inside each step on the augmented image
    # ("online", exact under any augmentation) or from tools/extract_sam_tokens.py's cache
    # ("cached": no SAM in training; augmentations limited to resizes and box-dropping crops).
    _C.TOKEN_MODE = "online"
    # Root of the token cache ("" = $REGIONSPOT_CACHE/sam_tokens); files are under <dataset>/<SAM type>/.
    _C.TOKEN_CACHE_DIR = ""
    # Your own datasets, registered when a config is loaded so every entry point knows them:
    # a list of [name, json_file, image_root] (COCO format) or [name, json_file, image_root, "lvis"]
    # (LVIS format: category ids 1..C, images at image_root/<coco_url's last folder>/<file>).
    # Then name them in DATASETS.TRAIN / DATASETS.TEST / a vocabulary like any registered dataset.
    _C.REGISTER_DATASETS = []
    # Sampling ratio of each DATASETS.TRAIN entry; every batch comes from one dataset. [] = equal.
    _C.DATASET_RATIOS = []
    # Metric that picks the best checkpoint during training (EvalHook + BestCheckpointer).
    _C.BEST_METRIC = "bbox/AP"
    # The optimizer is AdamW with SOLVER.BASE_LR and SOLVER.WEIGHT_DECAY; gradient clipping comes
    # from SOLVER.CLIP_GRADIENTS, whose CLIP_TYPE may also be "full_model" (the paper's recipe:
    # one norm over all trainable parameters, at most CLIP_VALUE).

    # RegionSpotROIHeads (MODEL.ROI_HEADS.NAME in a GeneralizedRCNN config): the RegionSpot
    # checkpoint its fusion head loads at build time (path or URL; MODEL.WEIGHTS then holds the
    # detector's own weights), and the side of the box-local mask grid handed to detectron2's
    # detector_postprocess, which pastes it into the box at the original size (112: the pasted
    # masks match the meta-architecture's inside the box with IoU >= 0.99, tested; 56 gave 0.90).
    _C.HEAD_WEIGHTS = ""
    _C.ROI_MASK_SIZE = 112

    _C.SAM_AUTO = CN()
    _C.SAM_AUTO.POINTS_PER_SIDE = 32
    _C.SAM_AUTO.PRED_IOU_THRESH = 0.88
    _C.SAM_AUTO.STABILITY_SCORE_THRESH = 0.95
    _C.SAM_AUTO.MIN_MASK_REGION_AREA = 0


def get_regionspot_cfg(config_file: str = "", opts: Sequence[str] = (), freeze: bool = False) -> CN:
    """detectron2's `get_cfg` with RegionSpot's keys, a config file (a path or a model-zoo name,
    see `regionspot.model_zoo`) and "KEY VALUE" overrides merged; the datasets of
    MODEL.REGIONSPOT.REGISTER_DATASETS are registered; frozen if `freeze`. Every entry point loads its
    config through this, so they all read files, names and overrides the same way."""
    cfg = get_cfg()
    add_regionspot_config(cfg)
    if config_file:
        cfg.merge_from_file(resolve_config_file(config_file))
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(f"Bad config overrides {list(opts)}: {e}") from e
    from .data.datasets import register_datasets_from_cfg  # here: the modeling layer imports this module

    register_datasets_from_cfg(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def _check_number(key: str, value, *, integer: bool = False, low: Optional[float] = None,
                  high: Optional[float] = None, low_open: bool = False, high_open: bool = False) -> None:
    """Raise ValueError naming `key` unless `value` is a finite number (an int if `integer`) in range."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        want = " and ".join(x for x in (lo, hi) if x)
        raise ValueError(f"{key} must be {'an integer' if integer else 'a number'}"
                         f"{' ' + want if want else ''}, got {value!r}.")


def check_regionspot_config(cfg: CN) -> None:
    """Check every numeric RegionSpot setting in one place, before anything is built, so a bad
    value fails at once with its key instead of deep inside a run (e.g. ``range()`` with step 0).

    SAM.TYPE and CLIP.BACKEND name registered encoder families: the modeling layer checks them
    (`regionspot.modeling.encoders.build.check_encoder_config`), as this module knows no model.
    Constraints that need built modules (NUM_HEADS dividing CLIP's width, INPUT_SIZE a multiple
    of CLIP's patch) are checked where those modules are built and name their keys too.
    """
    c = cfg.MODEL.REGIONSPOT
    k = "MODEL.REGIONSPOT."
    _check_number(k + "SAM.DECODE_CHUNK", c.SAM.DECODE_CHUNK, integer=True, low=0)
    if c.CLIP.PRETRAINED and c.CLIP.BACKEND != "open_clip":
        raise ValueError(f"{k}CLIP.PRETRAINED {c.CLIP.PRETRAINED!r} is an open_clip tag, but {k}CLIP.BACKEND is "
                         f"{c.CLIP.BACKEND!r}: set CLIP.BACKEND open_clip, or leave PRETRAINED empty.")
    _check_number(k + "CLIP.INPUT_SIZE", c.CLIP.INPUT_SIZE, integer=True, low=1)
    _check_number(k + "RANDOM_INIT_SEED", c.RANDOM_INIT_SEED, integer=True)
    _check_number(k + "HEAD.NUM_LAYERS", c.HEAD.NUM_LAYERS, integer=True, low=1)
    _check_number(k + "HEAD.NUM_HEADS", c.HEAD.NUM_HEADS, integer=True, low=1)
    _check_number(k + "HEAD.DIM_FEEDFORWARD", c.HEAD.DIM_FEEDFORWARD, integer=True, low=1)
    _check_number(k + "HEAD.DROPOUT", c.HEAD.DROPOUT, low=0, high=1, high_open=True)
    _check_number(k + "TEXT.CHUNK_SIZE", c.TEXT.CHUNK_SIZE, integer=True, low=1)
    _check_number(k + "TEST_IMS_PER_BATCH", c.TEST_IMS_PER_BATCH, integer=True, low=1)
    _check_number("TEST.DETECTIONS_PER_IMAGE", cfg.TEST.DETECTIONS_PER_IMAGE, integer=True, low=1)
    from .fast_eval import ENGINES

    if c.EVAL.ENGINE not in ENGINES:
        raise ValueError(f"Unknown {k}EVAL.ENGINE {c.EVAL.ENGINE!r}; choose one of {ENGINES}.")
    _check_number(k + "EVAL.IMAGES_PER_SHARD", c.EVAL.IMAGES_PER_SHARD, integer=True, low=1)
    _check_number(k + "EVAL.DETS_PER_CHUNK", c.EVAL.DETS_PER_CHUNK, integer=True, low=1)
    _check_number(k + "EVAL.PROCESSES", c.EVAL.PROCESSES, integer=True, low=0)
    ratios = list(c.DATASET_RATIOS)
    for i, r in enumerate(ratios):
        _check_number(f"{k}DATASET_RATIOS[{i}]", r, low=0)
    if ratios and sum(ratios) <= 0:
        raise ValueError(f"{k}DATASET_RATIOS must have a positive sum, got {ratios}.")
    _check_number(k + "SAM_AUTO.POINTS_PER_SIDE", c.SAM_AUTO.POINTS_PER_SIDE, integer=True, low=1)
    _check_number(k + "SAM_AUTO.PRED_IOU_THRESH", c.SAM_AUTO.PRED_IOU_THRESH, low=0, high=1)
    _check_number(k + "SAM_AUTO.STABILITY_SCORE_THRESH", c.SAM_AUTO.STABILITY_SCORE_THRESH, low=0, high=1)
    _check_number(k + "SAM_AUTO.MIN_MASK_REGION_AREA", c.SAM_AUTO.MIN_MASK_REGION_AREA, integer=True, low=0)
