"""`DefaultTrainer` for RegionSpot: only what differs from detectron2's defaults is overridden."""
import contextlib
import logging
import os
import weakref
from typing import List, Sequence

import numpy as np
import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm

from ..checkpoint import RegionSpotCheckpointer
from ..data.dataset_mapper import RegionSpotDatasetMapper, warn_degenerate_annotations
from ..data.datasets import register_datasets_from_cfg
from ..evaluation import build_regionspot_evaluator
from ..modeling.head import RegionSpotHead
from ..data.proposals import attach_proposals
from ..modeling.region_pipeline import find_pipeline
from ..data.token_cache import token_cache_folder, token_file

logger = logging.getLogger(__name__)


class MultiDatasetLoader:
    """Yields whole batches, each from one dataset chosen with probability proportional to its ratio.

    The choice sequence comes from a fixed seed, so every process of a distributed run trains on
    the same dataset (hence the same vocabulary) at each step.
    """

    def __init__(self, loaders: Sequence, ratios: Sequence[float], seed: int = 0):
        if len(loaders) != len(ratios):
            raise ValueError(f"MODEL.REGIONSPOT.DATASET_RATIOS has {len(ratios)} entries for {len(loaders)} datasets.")
        if any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise ValueError(f"MODEL.REGIONSPOT.DATASET_RATIOS must be non-negative with a positive sum, got {list(ratios)}.")
        self.loaders = list(loaders)
        self.probs = np.asarray(ratios, dtype=np.float64) / float(sum(ratios))
        self.seed = seed

    def __iter__(self):
        rng = np.random.RandomState(self.seed)
        iters = [iter(loader) for loader in self.loaders]
        while True:
            yield next(iters[rng.choice(len(iters), p=self.probs)])


def _with_full_model_clipping(optimizer_cls, max_norm: float):
    """The optimizer class, clipping the gradient norm of all its parameters together before each step."""

    class FullModelClipped(optimizer_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure)

    FullModelClipped.__name__ = optimizer_cls.__name__ + "FullModelClipped"
    return FullModelClipped


@contextlib.contextmanager
def _ddp_for_cpu_models():
    """detectron2's `create_ddp_model` always passes device_ids=[local_rank], which DDP refuses for
    a model on the CPU. While the trainer is built, give CPU models device_ids=None instead, so
    multi-process training works with the gloo backend too."""
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class RegionSpotTrainer(DefaultTrainer):
    def __init__(self, cfg):
        if cfg.SOLVER.AMP.ENABLED and not str(cfg.MODEL.DEVICE).startswith("cuda"):
            raise ValueError(
                f"SOLVER.AMP.ENABLED=True needs CUDA (detectron2's AMPTrainer), but MODEL.DEVICE is "
                f"{cfg.MODEL.DEVICE!r}: set SOLVER.AMP.ENABLED False to train on this device."
            )
        with _ddp_for_cpu_models():
            super().__init__(cfg)
        # Encode every training vocabulary once, on the main process, into the on-disk cache;
        # the other processes then read it instead of each encoding ~1M prompts themselves.
        pipeline = find_pipeline(self._trainer.model)
        if comm.is_main_process():
            for name in cfg.DATASETS.TRAIN:
                pipeline.text_embeddings(name)
        comm.synchronize()

    def train(self):
        """Train, then log where the trained head is (the last line of a training run)."""
        results = super().train()
        if comm.is_main_process() and self.cfg.OUTPUT_DIR:
            files = [os.path.join(self.cfg.OUTPUT_DIR, f) for f in ("model_final.pth", "model_best.pth")]
            files = [f for f in files if os.path.isfile(f)]
            if files:
                best = (f" (best by {self.cfg.MODEL.REGIONSPOT.BEST_METRIC}: {files[1]})"
                        if len(files) > 1 and self.cfg.TEST.EVAL_PERIOD > 0 else "")
                logger.info(f"Training done. The trained head is {files[0]}{best}; evaluate it with "
                            f"--eval-only MODEL.WEIGHTS {files[0]}.")
        return results

    def build_hooks(self) -> List:
        # Hooks capture self.checkpointer, so swap in ours (head-only, original-layout aware) first.
        self.checkpointer = RegionSpotCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
            allow_random_head=self.cfg.MODEL.REGIONSPOT.ALLOW_RANDOM_HEAD,
        )
        ret = super().build_hooks()
        if self.cfg.TEST.EVAL_PERIOD > 0 and comm.is_main_process():
            at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
            ret.insert(at + 1, hooks.BestCheckpointer(
                self.cfg.TEST.EVAL_PERIOD, self.checkpointer, self.cfg.MODEL.REGIONSPOT.BEST_METRIC, "max"
            ))
        return ret

    @classmethod
    def build_optimizer(cls, cfg, model):
        """AdamW over the trainable (head) parameters, clipped as SOLVER.CLIP_GRADIENTS says:
        CLIP_TYPE "full_model" clips the norm of all of them together (the paper's recipe);
        "value"/"norm" are detectron2's per-parameter clippers."""
        # Only the fusion head learns (in a GeneralizedRCNN too: its backbone and RPN stay put).
        params = [p for m in model.modules() if isinstance(m, RegionSpotHead) for p in m.parameters()
                  if p.requires_grad]
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if clip.ENABLED and clip.CLIP_TYPE == "full_model":
            optimizer_cls = _with_full_model_clipping(torch.optim.AdamW, clip.CLIP_VALUE)
        else:
            optimizer_cls = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
        return optimizer_cls(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    @classmethod
    def build_train_loader(cls, cfg):
        """One loader per DATASETS.TRAIN entry (its own mapper, vocabulary and sampler), mixed by ratio."""
        register_datasets_from_cfg(cfg)  # a cfg built by hand may name its own datasets
        names = list(cfg.DATASETS.TRAIN)
        if not names:
            raise ValueError("DATASETS.TRAIN is empty: nothing to train on.")
        loaders = []
        for name in names:
            dicts = get_detection_dataset_dicts([name], filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
            warn_degenerate_annotations(dicts, name)
            if cfg.MODEL.REGIONSPOT.TOKEN_MODE == "cached":
                dicts = cls._with_cached_tokens(cfg, name, dicts)
            mapper = RegionSpotDatasetMapper(cfg, is_train=True, dataset_name=name)
            loaders.append(build_detection_train_loader(cfg, mapper=mapper, dataset=dicts))
        if len(loaders) == 1:
            return loaders[0]
        ratios = list(cfg.MODEL.REGIONSPOT.DATASET_RATIOS) or [1.0] * len(loaders)
        return MultiDatasetLoader(loaders, ratios, seed=max(cfg.SEED, 0))

    @staticmethod
    def _with_cached_tokens(cfg, name: str, dicts: List) -> List:
        """Keep the images that have a token file; say how many lack one."""
        c = cfg.MODEL.REGIONSPOT
        folder = token_cache_folder(c.TOKEN_CACHE_DIR, name, c.SAM.TYPE)
        kept = [d for d in dicts if os.path.isfile(token_file(folder, d["image_id"]))]
        if not kept:
            raise FileNotFoundError(
                f"No cached SAM tokens for dataset {name!r} in {folder}: run tools/extract_sam_tokens.py "
                "first, or set MODEL.REGIONSPOT.TOKEN_MODE online."
            )
        if len(kept) < len(dicts):
            logger.warning(f"{len(dicts) - len(kept)} of {len(dicts)} images of {name!r} have no cached "
                           f"SAM tokens in {folder} and are left out of training.")
        return kept

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        register_datasets_from_cfg(cfg)
        dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
        warn_degenerate_annotations(dicts, dataset_name, evaluation=True)
        if cfg.MODEL.REGIONSPOT.PROMPT == "proposals" or cfg.MODEL.LOAD_PROPOSALS:
            names = list(cfg.DATASETS.TEST)
            files = list(cfg.DATASETS.PROPOSAL_FILES_TEST)
            if dataset_name not in names or len(files) != len(names):
                raise ValueError(
                    "MODEL.REGIONSPOT.PROMPT='proposals' needs one DATASETS.PROPOSAL_FILES_TEST entry "
                    f"per DATASETS.TEST entry; got {files} for {names}."
                )
            attach_proposals(dicts, files[names.index(dataset_name)],
                             cfg.MODEL.REGIONSPOT.MISSING_PROPOSALS, cfg.MODEL.REGIONSPOT.PROPOSAL_BOX_MODE)
        mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=dataset_name)
        batch = cfg.MODEL.REGIONSPOT.TEST_IMS_PER_BATCH
        if batch < 1:
            raise ValueError(f"MODEL.REGIONSPOT.TEST_IMS_PER_BATCH must be >= 1, got {batch}.")
        return build_detection_test_loader(dicts, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS,
                                           batch_size=batch)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder=None):
        return build_regionspot_evaluator(cfg, dataset_name, output_folder)
