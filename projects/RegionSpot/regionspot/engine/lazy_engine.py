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
from .trainer import check_amp_device, create_ddp_model, encode_training_vocabularies

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


def do_train(args, cfg):
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
        if args.resume and "evaluator" in cfg.dataloader:  # continue an interrupted evaluation
            cfg.dataloader.evaluator.resume = True
            cfg.dataloader.test.dataset.skip_completed_in = cfg.dataloader.evaluator.output_dir
        model = instantiate(cfg.model)
        model = create_ddp_model(model)
        # The weights are train.init_checkpoint, also with --resume (which resumes the evaluation).
        RegionSpotCheckpointer(model, save_dir=cfg.train.output_dir, key="train.init_checkpoint").resume_or_load(
            cfg.train.init_checkpoint, resume=False)
        return do_test(cfg, model)
    return do_train(args, cfg)
