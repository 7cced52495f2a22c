# Shared parts of RegionSpot's LazyConfigs, for `train_net.py --config-file configs/lazy/<file>.py`.
# Model, test loader and evaluator equal configs/RegionSpot-BB.yaml (SAM ViT-B + CLIP ViT-B/16 at 224,
# LVIS v1 val, gt boxes as prompts); train loader, optimizer and schedule equal
# configs/train/RegionSpot-BB_stage1_o365.yaml (the paper's stage 1 on Objects365, cached SAM tokens).
# Model files change only the encoders. Override any value on the command line: key=value.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from omegaconf import OmegaConf

from regionspot.data.dataset_mapper import RegionSpotDatasetMapper
from regionspot.evaluation import regionspot_evaluator
from regionspot.modeling.prompt_sources import GTBoxes
from regionspot.engine.lazy import build_lr_multiplier, build_regionspot, build_train_loader
from regionspot.modeling.text_embeddings import get_templates
from regionspot.engine.trainer import build_eval_loader, build_regionspot_optimizer, eval_dataset_dicts

# The arguments of RegionSpot (meta_arch.py), plus the encoders' and the head's; the head's widths
# come from the built encoders. Each key is the yacs key of the same name under MODEL.REGIONSPOT.
model = L(build_regionspot)(
    sam=dict(type="vit_b", checkpoint="", decode_chunk=0, fused_attention=True),
    clip=dict(name="ViT-B/16", checkpoint="", download_root="", input_size=224,
              resize_mode="bilinear", antialias=False),
    head=dict(num_layers=3, num_heads=8, dim_feedforward=2048, dropout=0.1),
    random_init_seed=0,
    device="${train.device}",
    vocabulary="",                 # used by inputs that name none; the test mapper names its own
    custom_vocabulary=[],
    templates=L(get_templates)(name="ensemble"),
    text_cache_dir="",
    text_chunk_size=256,
    autocast="",
    compile_mode="",
    # Where box prompts come from (MODEL.REGIONSPOT.PROMPT): GTBoxes; ProposalBoxes(use_scores=True) with
    # dataloader.test.dataset.proposal_file; SamAutoBoxes(params=dict(points_per_side=32, ...)).
    prompt_source=L(GTBoxes)(),
    max_dets_per_image=300,        # TEST.DETECTIONS_PER_IMAGE
    mask_on=True,
    fast_mask_paste=True,
    input_format="RGB",            # INPUT.FORMAT
)

dataloader = OmegaConf.create()
dataloader.test = L(build_eval_loader)(  # detectron2's build_detection_test_loader
    dataset=L(eval_dataset_dicts)(
        name="lvis_v1_val",
        proposal_file="",          # DATASETS.PROPOSAL_FILES_TEST entry, for model.prompt="proposals"
        missing_proposals="error",
        proposal_box_mode="XYXY",
    ),
    mapper=L(RegionSpotDatasetMapper)(
        is_train=False,
        # INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, as detectron2's build_augmentation makes it
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333, sample_style="choice")],
        image_format="${model.input_format}",
        vocabulary="${..dataset.name}",  # MODEL.REGIONSPOT.VOCABULARY, or the dataset's own classes
        precomputed_proposal_topk=None,  # DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST for proposals
        use_instance_mask=False,
        recompute_boxes=False,
    ),
    batch_size=1,                  # MODEL.REGIONSPOT.TEST_IMS_PER_BATCH
    num_workers=2,
)
dataloader.evaluator = L(regionspot_evaluator)(
    dataset_name="${..test.dataset.name}",
    output_dir="${train.output_dir}/inference/${..test.dataset.name}",
    mask_on="${model.mask_on}",
    max_dets_per_image="${model.max_dets_per_image}",
)
dataloader.train = L(build_train_loader)(
    names=["objects365_v2_train"],  # several datasets: one per batch, mixed by `ratios`
    # INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN (detectron2's defaults); no flip (INPUT.RANDOM_FLIP "none"):
    # cached tokens cannot follow one
    augmentations=[L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333, sample_style="choice")],
    image_format="${model.input_format}",
    total_batch_size=16,           # SOLVER.IMS_PER_BATCH
    num_workers=4,
    filter_empty=True,
    token_mode="cached",           # tokens of tools/extract_sam_tokens.py; "online" runs SAM in each step
    token_cache_dir="",
    sam="${model.sam}",            # the cached tokens must come from the model's SAM
    random_init_seed="${model.random_init_seed}",
    ratios=[],
    seed="${train.seed}",
)

# AdamW over the head, full-model gradient-norm clipping at 1.0 (SOLVER.CLIP_GRADIENTS "full_model").
# train_net.py sets `model` to the built model.
optimizer = L(build_regionspot_optimizer)(model=None, lr=2.5e-5, weight_decay=1e-4, full_model_clip_norm=1.0)
# SOLVER.WARMUP_ITERS, STEPS (none: constant after warmup), WARMUP_FACTOR, in iterations of train.max_iter.
lr_multiplier = L(build_lr_multiplier)(max_iter="${train.max_iter}", warmup_iters=1000, steps=[], gamma=0.1,
                                       warmup_factor=0.001, warmup_method="linear")

train = dict(
    output_dir="output/RegionSpot-BB",
    init_checkpoint="",            # MODEL.WEIGHTS: a RegionSpot checkpoint (ours or the original release's)
    max_iter=450000,
    amp=dict(enabled=True),        # needs CUDA
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=10000),
    eval_period=50000,             # evaluates dataloader.test
    best_metric="bbox/AP",         # MODEL.REGIONSPOT.BEST_METRIC: the best checkpoint ("" = none)
    log_period=20,
    device="cuda",                 # MODEL.DEVICE
    seed=-1,                       # SEED
)
