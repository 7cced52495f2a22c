#!/usr/bin/env python
"""Train or evaluate RegionSpot with detectron2's engine.

    python train_net.py --config-file configs/lvis_eval/RegionSpot-BL_lvis-val_glip-t-boxes.yaml \
        --eval-only MODEL.WEIGHTS path/to/regionspot_bl.pth
    python train_net.py --config-file configs/train/RegionSpot-BL_stage1_o365.yaml --num-gpus 8

--config-file takes a path, or the name of a shipped config (regionspot.model_zoo), e.g.
"lvis_eval/RegionSpot-BL_lvis-val_glip-t-boxes.yaml", from any directory. Your own COCO/LVIS-format
data: MODEL.REGIONSPOT.REGISTER_DATASETS (see regionspot/config.py).
"""
import regionspot  # noqa: F401  (registers the meta-architecture and datasets)
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.config import get_regionspot_cfg
from regionspot.model_zoo import resolve_config_file
from regionspot.trainer import RegionSpotTrainer as Trainer


def setup(args):
    # default_setup reads args.config_file again to log it, so keep the resolved path there.
    args.config_file = resolve_config_file(args.config_file)
    cfg = get_regionspot_cfg(args.config_file, args.opts, freeze=True)
    default_setup(cfg, args)
    # As detectron2's projects do: our own logger gets the same console and log.txt as detectron2's.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="regionspot", abbrev_name="regionspot")
    return cfg


def main(args):
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
