"""Train and evaluate from a LazyConfig `.py` file, as detectron2's `tools/lazyconfig_train_net.py`
does, with RegionSpot's checkpointer (head-only files, the original release's layout), the
trainer's DDP, AMP and vocabulary handling, and a best-checkpoint hook like the yacs route's.
`train_net.py` calls `main` for a `.py` config file.
"""
import logging

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..checkpoint import RegionSpotCheckpointer
from ..utils.lazy_overrides import check_overrides
from .trainer import check_amp_device, check_eval_resume_weights, create_ddp_model, encode_training_vocabularies

logger = logging.getLogger("detectron2")


def setup(args):
    """The LazyConfig of `args.config_file` with `args.opts` (key=value) applied, after default_setup.
    Unknown keys and values of the wrong type are refused first (`check_overrides`)."""
    cfg = LazyConfig.load(args.config_file)
    check_overrides(cfg, args.opts, args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    return cfg


def do_test(cfg, model):
    """Evaluate `model` on `dataloader.test` with `dataloader.evaluator`; {} without an evaluator."""
    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(ret)
    return ret


def lazy_config_fingerprint(cfg) -> str:
    """What produced an evaluation's detections, as a digest: the model, its weights and the test
    data (not how the run goes: device, workers, the evaluation engine), so a resumed LazyConfig
    evaluation with another model, checkpoint or dataset is refused (`evaluation_results.prepare_folder`)."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    def name(obj) -> str:  # a `_target_` (class or function) by its import path, stable across runs
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"

    def without_device(node):  # the same detections on any device
        if isinstance(node, dict):
            return {k: without_device(v) for k, v in node.items() if k != "device"}
        return [without_device(v) for v in node] if isinstance(node, list) else node

    parts = [cfg.model, cfg.dataloader.test.dataset, cfg.dataloader.test.mapper]
    blob = json.dumps([without_device(OmegaConf.to_container(p, resolve=True)) for p in parts]
                      + [cfg.train.init_checkpoint, cfg.dataloader.evaluator.get("max_dets_per_image")],
                      sort_keys=True, default=name)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def do_train(args, cfg):
    if cfg.dataloader.get("evaluator") is not None and cfg.dataloader.evaluator.get("resume", False):
        raise ValueError("dataloader.evaluator.resume continues an interrupted --eval-only run (--eval-only --resume "
                         "sets it); in training, every evaluation starts afresh: leave it False.")
    check_amp_device(cfg.train.amp.enabled, cfg.train.device, "train.amp.enabled", "train.device")
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    encode_training_vocabularies(model, cfg.dataloader.train.names)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = RegionSpotCheckpointer(model, cfg.train.output_dir, trainer=trainer, key="train.init_checkpoint")
    eval_period = cfg.train.eval_period
    best_metric = cfg.train.get("best_metric", "")
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(eval_period, lambda: do_test(cfg, model)),
        hooks.BestCheckpointer(eval_period, checkpointer, best_metric, "max")
        if (eval_period > 0 and best_metric and comm.is_main_process()) else None,
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if (args.resume and checkpointer.has_checkpoint()) else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        if "evaluator" in cfg.dataloader:
            # Recorded with the results shards: a resumed run of another model or data is refused.
            cfg.dataloader.evaluator.fingerprint = lazy_config_fingerprint(cfg)
            if args.resume:  # continue an interrupted evaluation
                check_eval_resume_weights(cfg.train.init_checkpoint, cfg.train.output_dir, "train.init_checkpoint")
                cfg.dataloader.evaluator.resume = True
                cfg.dataloader.test.dataset.skip_completed_in = cfg.dataloader.evaluator.output_dir
        model = instantiate(cfg.model)
        model = create_ddp_model(model)
        # The weights are train.init_checkpoint, also with --resume (which resumes the evaluation).
        RegionSpotCheckpointer(model, save_dir=cfg.train.output_dir, key="train.init_checkpoint").resume_or_load(
            cfg.train.init_checkpoint, resume=False)
        return do_test(cfg, model)
    return do_train(args, cfg)
