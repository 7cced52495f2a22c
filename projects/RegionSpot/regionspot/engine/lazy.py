"""Builders for detectron2 LazyConfig files (`configs/lazy/*.py`): targets of `LazyCall`.

They build what the yacs route builds from a `CfgNode`, from keyword arguments, and reuse the same
pieces (encoder builders, mapper, evaluator, trainer building blocks). The head's widths come from
the built encoders, never from a table, which is why the model has a factory and is not a plain
`L(RegionSpot)(...)`. The defaults equal those of `config.add_regionspot_config` (a test checks).
"""
from typing import Any, Mapping, Optional, Sequence

from detectron2.data import build_detection_train_loader
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler, ParamScheduler

from detectron2.config import CfgNode, get_cfg

from ..config import add_regionspot_config
from ..data.dataset_mapper import RegionSpotDatasetMapper
from ..modeling.head import RegionSpotHead
from ..modeling.meta_arch import RegionSpot
from ..modeling.encoders import build_clip_encoder, build_sam_encoder
from ..data.token_cache import sam_weights_key, token_cache_folder
from .trainer import mix_loaders, train_dataset_dicts

# The arguments of `build_regionspot`'s `sam`, `clip` and `head` dicts, with their defaults:
# the keys of MODEL.REGIONSPOT.SAM, .CLIP and .HEAD in lower case, with the same values.
SAM_DEFAULTS = dict(type="vit_b", checkpoint="", decode_chunk=0, fused_attention=True)
CLIP_DEFAULTS = dict(backend="clip", name="ViT-B/16", pretrained="", checkpoint="", download_root="",
                     input_size=224, resize_mode="bilinear", antialias=False)
HEAD_DEFAULTS = dict(num_layers=3, num_heads=8, dim_feedforward=2048, dropout=0.1)


def _merged(defaults: Mapping, given: Optional[Mapping], what: str) -> dict:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise KeyError(f"Unknown keys {unknown} in model.{what}; known: {sorted(defaults)}.")
    return {**defaults, **given}


def encoder_cfg(sam: Mapping[str, Any], clip: Mapping[str, Any], random_init_seed: int = 0) -> CfgNode:
    """The yacs config of these encoder arguments, so both routes build every backbone (SAM,
    SAM 2, OpenAI CLIP, open_clip) through the same `build_sam_encoder` / `build_clip_encoder`."""
    cfg = get_cfg()
    add_regionspot_config(cfg)
    c = cfg.MODEL.REGIONSPOT
    for node, values in ((c.SAM, sam), (c.CLIP, clip)):
        for k, v in values.items():
            node[k.upper()] = v
    c.RANDOM_INIT_SEED = random_init_seed
    return cfg


def build_regionspot(
    *,
    sam: Optional[Mapping[str, Any]] = None,
    clip: Optional[Mapping[str, Any]] = None,
    head: Optional[Mapping[str, Any]] = None,
    random_init_seed: int = 0,
    device: str = "cpu",
    **model_kwargs,
) -> RegionSpot:
    """RegionSpot built from keyword arguments, on `device`.

    Args:
        sam: `SAM_DEFAULTS` keys: those of MODEL.REGIONSPOT.SAM (type, checkpoint, decoder
            chunk, fused attention), in lower case.
        clip: `CLIP_DEFAULTS` keys: those of MODEL.REGIONSPOT.CLIP (backend, name, pretrained tag,
            checkpoint, ...), in lower case.
        head: `HEAD_DEFAULTS` keys: the decoder's shape; its widths come from the encoders.
        random_init_seed: seed of randomly initialised encoders (MODEL.REGIONSPOT.RANDOM_INIT_SEED).
        device: where the model goes (MODEL.DEVICE).
        model_kwargs: the other arguments of `RegionSpot` (vocabulary, templates, prompt, ...).
    """
    enc_cfg = encoder_cfg(_merged(SAM_DEFAULTS, sam, "sam"), _merged(CLIP_DEFAULTS, clip, "clip"), random_init_seed)
    sam_encoder, clip_encoder = build_sam_encoder(enc_cfg), build_clip_encoder(enc_cfg)
    fusion = RegionSpotHead(token_dim=sam_encoder.token_dim, clip_width=clip_encoder.width,
                            text_dim=clip_encoder.text_dim, **_merged(HEAD_DEFAULTS, head, "head"))
    model = RegionSpot(sam_encoder=sam_encoder, clip_encoder=clip_encoder, head=fusion, **model_kwargs)
    return model.to(device)


def build_train_loader(
    names: Sequence[str],
    *,
    augmentations: Sequence,
    image_format: str = "RGB",
    total_batch_size: int,
    num_workers: int = 0,
    filter_empty: bool = True,
    token_mode: str = "online",
    token_cache_dir: str = "",
    sam: Optional[Mapping[str, Any]] = None,
    random_init_seed: int = 0,
    ratios: Sequence[float] = (),
    seed: int = 0,
):
    """The training loader of `RegionSpotTrainer.build_train_loader`, from keyword arguments: one
    loader per dataset (its own vocabulary, and token folder in cached mode), mixed by `ratios`.

    Args:
        names: training datasets (DATASETS.TRAIN).
        augmentations: detectron2 augmentations of the training images.
        image_format: INPUT.FORMAT.
        total_batch_size: images per step over all processes (SOLVER.IMS_PER_BATCH).
        num_workers, filter_empty: DATALOADER.NUM_WORKERS and FILTER_EMPTY_ANNOTATIONS.
        token_mode, token_cache_dir: MODEL.REGIONSPOT.TOKEN_MODE and TOKEN_CACHE_DIR.
        sam, random_init_seed: the model's (`build_regionspot`): which SAM the cached tokens must
            come from.
        ratios, seed: MODEL.REGIONSPOT.DATASET_RATIOS, and the seed of the dataset choice (SEED).
    """
    if token_mode not in ("online", "cached"):
        raise ValueError(f"dataloader.train.token_mode must be 'online' or 'cached', not {token_mode!r}.")
    if not names:
        raise ValueError("dataloader.train.names is empty: nothing to train on.")
    s = _merged(SAM_DEFAULTS, sam, "sam")
    loaders = []
    for name in names:
        folder = token_cache_folder(token_cache_dir, name, s["type"]) if token_mode == "cached" else None
        dicts = train_dataset_dicts(name, filter_empty=filter_empty, token_folder=folder)
        mapper = RegionSpotDatasetMapper(
            is_train=True, augmentations=list(augmentations), image_format=image_format, vocabulary=name,
            token_folder=folder, sam_weights=sam_weights_key(s["type"], s["checkpoint"], random_init_seed),
            use_instance_mask=False, recompute_boxes=False,
        )
        loaders.append(build_detection_train_loader(dataset=dicts, mapper=mapper, total_batch_size=total_batch_size,
                                                    num_workers=num_workers))
    return mix_loaders(loaders, ratios, seed=max(seed, 0))


def build_lr_multiplier(*, max_iter: int, warmup_iters: int = 1000, steps: Sequence[int] = (),
                        gamma: float = 0.1, warmup_factor: float = 0.001,
                        warmup_method: str = "linear") -> ParamScheduler:
    """The multiplier detectron2's `build_lr_scheduler` makes for WarmupMultiStepLR (SOLVER.MAX_ITER,
    WARMUP_ITERS, STEPS, GAMMA, WARMUP_FACTOR, WARMUP_METHOD), from keyword arguments, so that an
    override of `train.max_iter` keeps the warmup and the steps in iterations."""
    steps = [x for x in steps if x <= max_iter]
    sched = MultiStepParamScheduler(values=[gamma ** k for k in range(len(steps) + 1)], milestones=steps,
                                    num_updates=max_iter)
    return WarmupParamScheduler(sched, warmup_factor, min(warmup_iters / max_iter, 1.0), warmup_method)
