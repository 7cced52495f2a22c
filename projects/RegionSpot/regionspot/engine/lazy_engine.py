"""Train and evaluate from a LazyConfig `.py` file, as detectron2's `tools/lazyconfig_train_net.py`
does, with RegionSpot's checkpointer (head-only files, the original release's layout), the
trainer's DDP, AMP and vocabulary handling, and a best-checkpoint hook like the yacs route's.
`train_net.py` calls `main` for a `.py` config file.
"""
import difflib
import inspect
import logging
from typing import Any, List

from detectron2.config import LazyConfig, instantiate
from detectron2.utils.registry import locate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..checkpoint import RegionSpotCheckpointer
from .trainer import check_amp_device, create_ddp_model, encode_training_vocabularies

logger = logging.getLogger("detectron2")


def _accepts(target: Any, name: str) -> bool:
    """Whether the callable a LazyCall node builds takes an argument `name` (by name, or through
    **kwargs that its parent classes' constructors name)."""
    if isinstance(target, str):
        try:
            target = locate(target)
        except Exception:
            return False
    classes = inspect.getmro(target) if inspect.isclass(target) else (target,)
    for c in classes:
        try:
            params = inspect.signature(c.__init__ if inspect.isclass(c) else c).parameters
        except (TypeError, ValueError):
            return False
        if name in params:
            return True
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return False
    return False


def _type_problem(old: Any, new: Any) -> str:
    """Why `new` cannot replace `old` ("" if it can): numbers stay numbers, booleans booleans,
    lists lists and nodes nodes; strings, None and interpolations take anything."""
    if isinstance(old, bool):
        return "" if isinstance(new, bool) else "a boolean (True or False)"
    if isinstance(old, int):
        return "" if isinstance(new, int) and not isinstance(new, bool) else "an integer"
    if isinstance(old, float):
        return "" if isinstance(new, (int, float)) and not isinstance(new, bool) else "a number"
    if isinstance(old, (list, tuple, ListConfig)):
        return "" if isinstance(new, (list, tuple, ListConfig)) else "a list, e.g. [a,b]"
    if isinstance(old, (dict, DictConfig)):
        return "" if isinstance(new, (dict, DictConfig)) else "a config node"
    return ""


def check_overrides(cfg, overrides: List[str], config_file: str = "") -> None:
    """Refuse, before anything runs, overrides whose key the config does not have (detectron2 would
    add it silently: a misspelled key would be ignored) or whose value has the wrong type (it would
    fail much later, deep inside training). A key that is an argument of the object its node
    builds may be added; `+key=value` adds any key on purpose."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    problems = []
    for text, o in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        key, value = o.key_or_group, o.value()
        if o.is_add():
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if not OmegaConf.is_config(node) or leaf not in node:
            if OmegaConf.is_dict(node) and "_target_" in node and _accepts(node["_target_"], leaf):
                continue
            known = [str(k) for k in node.keys()] if OmegaConf.is_dict(node) else []
            close = difflib.get_close_matches(leaf, known, n=3)
            hint = f" Did you mean {', '.join(f'{parent}.{c}' if parent else c for c in close)}?" if close else (
                f" Keys of {parent or 'the config'}: {', '.join(known[:12])}." if known else "")
            problems.append(f"unknown key {key!r} (in {text!r}).{hint} To add a new key on purpose, write +{text}.")
            continue
        old = node._get_node(leaf)._value() if OmegaConf.is_dict(node) else None
        if isinstance(old, str) and old.startswith("${"):
            continue  # an interpolation: its type is the target's
        why = _type_problem(old, value)
        if why:
            problems.append(f"{key}={value!r} (in {text!r}): {key} is {old!r}, so the value must be {why}.")
    if problems:
        where = f" for {config_file}" if config_file else ""
        raise ValueError(f"Refused LazyConfig override{'s' if len(problems) > 1 else ''}{where}: " + " ".join(problems))


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
        model = instantiate(cfg.model)
        model = create_ddp_model(model)
        RegionSpotCheckpointer(model, save_dir=cfg.train.output_dir, key="train.init_checkpoint").resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume)
        return do_test(cfg, model)
    return do_train(args, cfg)
