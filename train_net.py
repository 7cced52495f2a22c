#!/usr/bin/env python
"""Train or evaluate RegionSpot with detectron2's engine.

    python train_net.py --config-file configs/regionspot_sam-b_clip-b16_gt-boxes_lvis.yaml \
        --eval-only MODEL.WEIGHTS path/to/regionspot.pth
"""
import regionspot  # noqa: F401  (registers the meta-architecture and datasets)
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from regionspot.config import load_config
from regionspot import lazy_engine
from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.trainer import RegionSpotTrainer as Trainer


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    return cfg


def main(args):
    if str(args.config_file).endswith(".py"):  # a LazyConfig: detectron2's lazyconfig_train_net route
        return lazy_engine.main(args)
    cfg = setup(args)
    if args.eval_only:
        if cfg.TEST.AUG.ENABLED:
            raise NotImplementedError("TEST.AUG: test-time augmentation is not supported by RegionSpot.")
        model = Trainer.build_model(cfg)
        RegionSpotCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, allow_random_head=cfg.MODEL.REGIONSPOT.ALLOW_RANDOM_HEAD
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
