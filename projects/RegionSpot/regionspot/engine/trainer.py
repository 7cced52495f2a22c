"""`DefaultTrainer` for RegionSpot (only what differs from detectron2's defaults is overridden), and the
building blocks it shares with the LazyConfig engine (`lazy_engine.py`): datasets, loader mixing,
optimizer, DDP, vocabulary warm-up."""
import contextlib
import logging
import os
import weakref
from typing import Dict, List, Optional, Sequence

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
from ..evaluation import build_regionspot_evaluator, default_output_folder
from ..evaluation_results import completed_image_ids, results_folder
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


def mix_loaders(loaders: Sequence, ratios: Sequence[float] = (), seed: int = 0):
    """One loader as it is; several mixed batch by batch by `ratios` ([] = equal): `MultiDatasetLoader`."""
    if len(loaders) == 1:
        return loaders[0]
    return MultiDatasetLoader(loaders, list(ratios) or [1.0] * len(loaders), seed=seed)


def train_dataset_dicts(name: str, *, filter_empty: bool = True, token_folder: Optional[str] = None) -> List[Dict]:
    """The dataset dicts of one training set; with a token folder (cached tokens), only the images
    that have a token file, saying how many lack one."""
    dicts = get_detection_dataset_dicts([name], filter_empty=filter_empty)
    warn_degenerate_annotations(dicts, name)
    if token_folder is None:
        return dicts
    kept = [d for d in dicts if os.path.isfile(token_file(token_folder, d["image_id"]))]
    if not kept:
        raise FileNotFoundError(
            f"No cached SAM tokens for dataset {name!r} in {token_folder}: run tools/extract_sam_tokens.py "
            "first, or set MODEL.REGIONSPOT.TOKEN_MODE online."
        )
    if len(kept) < len(dicts):
        logger.warning(f"{len(dicts) - len(kept)} of {len(dicts)} images of {name!r} have no cached "
                       f"SAM tokens in {token_folder} and are left out of training.")
    return kept


def eval_dataset_dicts(name: str, *, proposal_file: str = "", missing_proposals: str = "error",
                       proposal_box_mode: str = "XYXY", skip_completed_in: str = "") -> List[Dict]:
    """The dataset dicts of one evaluation set (empty images kept), with the proposals of
    `proposal_file` attached when one is given (see `proposals.attach_proposals`). With
    `skip_completed_in` (an evaluation's output folder, when resuming), the images whose results
    are already in its complete shards are left out, so the model never runs on them again."""
    dicts = get_detection_dataset_dicts([name], filter_empty=False)
    if skip_completed_in:
        done = completed_image_ids(results_folder(skip_completed_in))
        if done:
            before = len(dicts)
            dicts = [d for d in dicts if d["image_id"] not in done]
            logger.info(f"Resuming the evaluation of {name!r}: {before - len(dicts)} of {before} images are "
                        f"complete in {results_folder(skip_completed_in)}; {len(dicts)} to go.")
    warn_degenerate_annotations(dicts, name, evaluation=True)
    if proposal_file:
        attach_proposals(dicts, proposal_file, missing_proposals, proposal_box_mode)
    return dicts


def build_eval_loader(dataset: List[Dict], *, mapper, batch_size: int = 1, num_workers: int = 0, **kwargs):
    """detectron2's test loader over `dataset`; an empty list (a resumed evaluation whose images are
    all done) gives an empty loader, which detectron2's refuses to build."""
    if len(dataset) == 0:
        return []
    return build_detection_test_loader(dataset, mapper=mapper, batch_size=batch_size, num_workers=num_workers,
                                       **kwargs)


def build_regionspot_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                               full_model_clip_norm: Optional[float] = None,
                               optimizer_cls=torch.optim.AdamW) -> torch.optim.Optimizer:
    """AdamW (or `optimizer_cls`) over the trainable parameters of the fusion head(s). With
    `full_model_clip_norm`, the gradient norm of all of them together is clipped to it before each
    step (the paper's recipe)."""
    if full_model_clip_norm:
        optimizer_cls = _with_full_model_clipping(optimizer_cls, full_model_clip_norm)
    # Only the fusion head learns (in a GeneralizedRCNN too: its backbone and RPN stay put).
    params = [p for m in model.modules() if isinstance(m, RegionSpotHead) for p in m.parameters()
              if p.requires_grad]
    return optimizer_cls(params, lr=lr, weight_decay=weight_decay)


def check_amp_device(amp: bool, device: str, amp_key: str = "SOLVER.AMP.ENABLED",
                     device_key: str = "MODEL.DEVICE") -> None:
    """detectron2's AMPTrainer needs CUDA: refuse AMP elsewhere, naming the keys."""
    if amp and not str(device).startswith("cuda"):
        raise ValueError(
            f"{amp_key}=True needs CUDA (detectron2's AMPTrainer), but {device_key} is "
            f"{device!r}: set {amp_key} False to train on this device."
        )


def encode_training_vocabularies(model: torch.nn.Module, names: Sequence[str]) -> None:
    """Encode every training vocabulary once, on the main process, into the on-disk cache; the
    other processes then read it instead of each encoding ~1M prompts themselves."""
    pipeline = find_pipeline(model)
    if comm.is_main_process():
        for name in names:
            pipeline.text_embeddings(name)
    comm.synchronize()


def _with_full_model_clipping(optimizer_cls, max_norm: float):
    """The optimizer class, clipping the gradient norm of all its parameters together before each step."""

    class FullModelClipped(optimizer_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure)

    FullModelClipped.__name__ = optimizer_cls.__name__ + "FullModelClipped"
    return FullModelClipped


_d2_create_ddp_model = d2_defaults.create_ddp_model


def create_ddp_model(model: torch.nn.Module, **kwargs):
    """detectron2's `create_ddp_model`, for a model on the CPU too: detectron2 always passes
    device_ids=[local_rank], which DDP refuses for a CPU model; such a model gets device_ids=None,
    so multi-process training works with the gloo backend too."""
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def _ddp_for_cpu_models():
    """While the trainer is built, DefaultTrainer calls our `create_ddp_model`."""
    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = _d2_create_ddp_model


def check_eval_resume_weights(weights: str, output_dir: str, key: str) -> None:
    """With --eval-only, --resume continues an interrupted evaluation of `weights`; it does not pick
    OUTPUT_DIR's last checkpoint as detectron2's --resume does. An empty `weights` beside such a
    checkpoint would evaluate a random head: refused, naming both ways."""
    last = os.path.join(output_dir or "", "last_checkpoint")
    if not weights and output_dir and os.path.isfile(last):
        raise ValueError(
            f"--eval-only --resume continues an interrupted evaluation of {key}, which is empty (a random head), "
            f"while {output_dir} holds a trained checkpoint ({last}). Set {key} to the checkpoint to evaluate "
            "(e.g. OUTPUT_DIR's model_final.pth), or run without --resume.")


class RegionSpotTrainer(DefaultTrainer):
    def __init__(self, cfg):
        if cfg.MODEL.REGIONSPOT.EVAL.RESUME:
            raise ValueError("MODEL.REGIONSPOT.EVAL.RESUME continues an interrupted --eval-only run (train_net.py "
                             "--eval-only --resume sets it); in training, every evaluation starts afresh: set it False.")
        check_amp_device(cfg.SOLVER.AMP.ENABLED, cfg.MODEL.DEVICE)
        with _ddp_for_cpu_models():
            super().__init__(cfg)
        encode_training_vocabularies(self._trainer.model, cfg.DATASETS.TRAIN)

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
        clip = cfg.SOLVER.CLIP_GRADIENTS
        kwargs = dict(lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        if clip.ENABLED and clip.CLIP_TYPE == "full_model":
            return build_regionspot_optimizer(model, full_model_clip_norm=clip.CLIP_VALUE, **kwargs)
        return build_regionspot_optimizer(
            model, optimizer_cls=maybe_add_gradient_clipping(cfg, torch.optim.AdamW), **kwargs)

    @classmethod
    def build_train_loader(cls, cfg):
        """One loader per DATASETS.TRAIN entry (its own mapper, vocabulary and sampler), mixed by ratio."""
        register_datasets_from_cfg(cfg)  # a cfg built by hand may name its own datasets
        names = list(cfg.DATASETS.TRAIN)
        if not names:
            raise ValueError("DATASETS.TRAIN is empty: nothing to train on.")
        c = cfg.MODEL.REGIONSPOT
        loaders = []
        for name in names:
            folder = token_cache_folder(c.TOKEN_CACHE_DIR, name, c.SAM.TYPE) if c.TOKEN_MODE == "cached" else None
            dicts = train_dataset_dicts(name, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS, token_folder=folder)
            mapper = RegionSpotDatasetMapper(cfg, is_train=True, dataset_name=name)
            loaders.append(build_detection_train_loader(cfg, mapper=mapper, dataset=dicts))
        return mix_loaders(loaders, c.DATASET_RATIOS, seed=max(cfg.SEED, 0))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        register_datasets_from_cfg(cfg)
        c = cfg.MODEL.REGIONSPOT
        proposal_file = ""
        if c.PROMPT == "proposals" or cfg.MODEL.LOAD_PROPOSALS:
            names = list(cfg.DATASETS.TEST)
            files = list(cfg.DATASETS.PROPOSAL_FILES_TEST)
            if dataset_name not in names or len(files) != len(names):
                raise ValueError(
                    "MODEL.REGIONSPOT.PROMPT='proposals' needs one DATASETS.PROPOSAL_FILES_TEST entry "
                    f"per DATASETS.TEST entry; got {files} for {names}."
                )
            proposal_file = files[names.index(dataset_name)]
        dicts = eval_dataset_dicts(dataset_name, proposal_file=proposal_file, missing_proposals=c.MISSING_PROPOSALS,
                                   proposal_box_mode=c.PROPOSAL_BOX_MODE,
                                   skip_completed_in=default_output_folder(cfg, dataset_name) if c.EVAL.RESUME else "")
        mapper = RegionSpotDatasetMapper(cfg, is_train=False, dataset_name=dataset_name)
        batch = cfg.MODEL.REGIONSPOT.TEST_IMS_PER_BATCH
        if batch < 1:
            raise ValueError(f"MODEL.REGIONSPOT.TEST_IMS_PER_BATCH must be >= 1, got {batch}.")
        return build_eval_loader(dicts, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS, batch_size=batch)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder=None):
        return build_regionspot_evaluator(cfg, dataset_name, output_folder)
