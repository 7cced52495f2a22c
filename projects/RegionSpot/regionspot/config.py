"""Config keys of RegionSpot. Every key lives under ``cfg.MODEL.REGIONSPOT``."""
from detectron2.config import CfgNode as CN


def add_regionspot_config(cfg: CN) -> None:
    """Add RegionSpot's keys (with their defaults) to a detectron2 config, in place."""
    # MODEL.META_ARCHITECTURE "RegionSpot" and INPUT.FORMAT "RGB" are set by
    # configs/Base-RegionSpot.yaml (a BGR loader works too: the model flips the channels).
    _C = cfg.MODEL.REGIONSPOT = CN()

    _C.SAM = CN()
    # SAM variant: vit_b | vit_l | vit_h, or "tiny" (a small SAM for tests and the quickstart:
    # random, or the quickstart's pretrained one with CHECKPOINT regionspot://pretrained/...).
    _C.SAM.TYPE = "vit_b"
    # Local path, http(s) URL (downloaded once, cached by iopath) or regionspot://<file> (shipped
    # in the package). "" = the official checkpoint of SAM.TYPE ("tiny": random), "random" =
    # random init (benchmarks, tests).
    _C.SAM.CHECKPOINT = ""
    # Boxes per mask-decoder call: bounds memory, which then grows linearly in the boxes.
    # 0 = by device: 4 on a CPU (each box's decoder works on 4096x256 image tokens, so small
    # chunks stay in cache: 64 boxes decode 2.2x faster in chunks of 4 than of 64), 64 elsewhere.
    _C.SAM.DECODE_CHUNK = 0
    # Run the image encoder's attention through torch's fused scaled_dot_product_attention with
    # SAM's relative positions as the additive mask (regionspot/sam_attention.py): same outputs,
    # 1.27x faster SAM ViT-B encoder on the CPU.
    _C.SAM.FUSED_ATTENTION = True

    _C.CLIP = CN()
    # A name known to the `clip` package (ViT-B/16, ViT-L/14, ViT-L/14@336px, ...) or "tiny".
    _C.CLIP.NAME = "ViT-B/16"
    # Local path, http(s) URL or regionspot://<file> of an OpenAI-format CLIP file (TorchScript
    # or plain state dict, optionally gzip-compressed). "" = download CLIP.NAME through the clip
    # package (cached in CLIP.DOWNLOAD_ROOT; "tiny": random), "random" = random init.
    _C.CLIP.CHECKPOINT = ""
    _C.CLIP.DOWNLOAD_ROOT = ""
    # Square input size of the image CLIP sees; positional embeddings are interpolated to it.
    _C.CLIP.INPUT_SIZE = 224
    # Seed of randomly initialised encoders (checkpoint "random", tiny models). Fixed, so every
    # build and every process gets the same "random" SAM and CLIP.
    _C.RANDOM_INIT_SEED = 0

    # Mixed precision for the frozen encoders: "" (fp32), "bf16" or "fp16". The head stays fp32.
    _C.AUTOCAST = ""
    # torch.compile the frozen SAM image encoder, SAM mask decoder and CLIP image tower: "" (off)
    # or a torch.compile mode ("default", "max-autotune", ...). The first batch pays the
    # compilation (1-2 min cold on a CPU); see README "Speed and memory" for what it buys.
    _C.COMPILE = ""

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
    # (DATASETS.PROPOSAL_FILES_TEST) or "sam_auto" (SAM's automatic mask generator).
    _C.PROMPT = "gt"
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
    # Paste kept masks at full size with one interpolation from SAM's low-res logits instead of
    # SAM's two (via a 1024x1024 buffer): same masks (IoU >= 0.99, tested), 1.5-7x faster on CPU.
    _C.FAST_MASK_PASTE = True

    # Training. Region tokens come from SAM run inside each step on the augmented image
    # ("online", exact under any augmentation) or from tools/extract_sam_tokens.py's cache
    # ("cached": no SAM in training; augmentations limited to resizes and box-dropping crops).
    _C.TOKEN_MODE = "online"
    # Root of the token cache ("" = $REGIONSPOT_CACHE/sam_tokens); files are under <dataset>/<SAM type>/.
    _C.TOKEN_CACHE_DIR = ""
    # Sampling ratio of each DATASETS.TRAIN entry; every batch comes from one dataset. [] = equal.
    _C.DATASET_RATIOS = []
    # Metric that picks the best checkpoint during training (EvalHook + BestCheckpointer).
    _C.BEST_METRIC = "bbox/AP"
    # The optimizer is AdamW with SOLVER.BASE_LR and SOLVER.WEIGHT_DECAY; gradient clipping comes
    # from SOLVER.CLIP_GRADIENTS, whose CLIP_TYPE may also be "full_model" (the paper's recipe:
    # one norm over all trainable parameters, at most CLIP_VALUE).

    _C.SAM_AUTO = CN()
    _C.SAM_AUTO.POINTS_PER_SIDE = 32
    _C.SAM_AUTO.PRED_IOU_THRESH = 0.88
    _C.SAM_AUTO.STABILITY_SCORE_THRESH = 0.95
    _C.SAM_AUTO.MIN_MASK_REGION_AREA = 0
