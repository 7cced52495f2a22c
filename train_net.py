#!/usr/bin/env python
"""Train or evaluate RegionSpot with detectron2's engine.

    python train_net.py --config-file configs/lvis_eval/RegionSpot-BL_lvis-val_glip-t-boxes.yaml \
        --eval-only MODEL.WEIGHTS path/to/regionspot_bl.pth
    python train_net.py --config-file configs/train/RegionSpot-BL_stage1_o365.yaml --num-gpus 8

--config-file takes a path, or the name of a shipped config (regionspot.model_zoo), e.g.
"lvis_eval/RegionSpot-BL_lvis-val_glip-t-boxes.yaml", from any directory. Your own COCO/LVIS-format
data: MODEL.REGIONSPOT.REGISTER_DATASETS (see regionspot/config.py).

With --eval-only, --resume continues an interrupted evaluation in the same OUTPUT_DIR: the images
whose results are already on disk are skipped (docs/EVALUATION_AT_SCALE.md). The weights are
MODEL.WEIGHTS either way.

The console shows warnings, a training progress bar and the evaluation results; detectron2's full
log (config, model, metrics, tables) goes to OUTPUT_DIR/log.txt. --verbose prints it all.
"""
import os

import regionspot  # noqa: F401  (registers the meta-architecture and datasets)
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from regionspot.engine import lazy_engine
from regionspot.engine.launch import launch
from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.config import get_regionspot_cfg
from regionspot.utils.console import ProgressBar, setup_run_logging
from regionspot.model_zoo import resolve_config_file
from regionspot.engine.trainer import RegionSpotTrainer as Trainer, check_eval_resume_weights


def setup(args):
    # default_setup reads args.config_file again to log it, so keep the resolved path there.
    args.config_file = resolve_config_file(args.config_file)
    # --eval-only --resume continues an interrupted evaluation (docs/EVALUATION_AT_SCALE.md).
    # (Callers with parsers of their own, e.g. tools/quickstart.py, may have neither option.)
    resume_eval = getattr(args, "eval_only", False) and getattr(args, "resume", False)
    opts = list(args.opts) + (["MODEL.REGIONSPOT.EVAL.RESUME", "True"] if resume_eval else [])
    cfg = get_regionspot_cfg(args.config_file, opts, freeze=True)
    setup_run_logging(cfg.OUTPUT_DIR, getattr(args, "verbose", False))
    default_setup(cfg, args)  # setup_run_logging already gave our logger the console and log.txt
    return cfg


def main(args):
    if str(args.config_file).endswith(".py"):  # a LazyConfig: detectron2's lazyconfig_train_net route
        return lazy_engine.main(args)
    cfg = setup(args)
    if args.eval_only:
        if cfg.TEST.AUG.ENABLED:
            raise NotImplementedError("TEST.AUG: test-time augmentation is not supported by RegionSpot.")
        # The weights are MODEL.WEIGHTS, also with --resume (which here resumes the evaluation).
        if args.resume:
            check_eval_resume_weights(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR, "MODEL.WEIGHTS")
        model = Trainer.build_model(cfg)
        RegionSpotCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, allow_random_head=cfg.MODEL.REGIONSPOT.ALLOW_RANDOM_HEAD
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        print_results(res, cfg.OUTPUT_DIR)
        return res
    trainer = Trainer(cfg)
    if not getattr(args, "verbose", False):
        trainer.register_hooks([ProgressBar()])
    trainer.resume_or_load(resume=args.resume)
    res = trainer.train()
    last = getattr(trainer, "_last_eval_results", None)  # DefaultTrainer keeps its EvalHook's last results
    if last:
        print_results(last, cfg.OUTPUT_DIR)
    if comm.is_main_process():
        print(f"Trained weights: {os.path.join(cfg.OUTPUT_DIR, 'model_final.pth')}; full log: "
              f"{os.path.join(cfg.OUTPUT_DIR, 'log.txt')}", flush=True)
    return res


def print_results(res, output_dir: str) -> None:
    """The headline figures of each evaluated dataset and task, on the console."""
    if not comm.is_main_process():
        return
    flat = res if not res or "AP" in next(iter(res.values()), {}) else {}
    per_dataset = {"": flat} if flat else res
    for dataset, tasks in per_dataset.items():
        for task, metrics in tasks.items():
            shown = ", ".join(f"{k} {v:.1f}" for k, v in metrics.items() if k in ("AP", "AP50", "APr", "APc", "APf"))
            print(f"{dataset + ' ' if dataset else ''}{task}: {shown}", flush=True)
    print(f"Full evaluation tables and log: {os.path.join(output_dir, 'log.txt')}", flush=True)


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument("--verbose", action="store_true", help="print detectron2's full log on the console too")
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
