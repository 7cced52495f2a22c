"""`DefaultTrainer` for RegionSpot: only what differs from detectron2's defaults is overridden."""
import weakref

from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer

from .checkpoint import RegionSpotCheckpointer
from .dataset_mapper import RegionSpotDatasetMapper
from .evaluation import build_regionspot_evaluator
from .proposals import attach_proposals


class RegionSpotTrainer(DefaultTrainer):
    def build_hooks(self):
        # Hooks capture self.checkpointer, so swap in ours (head-only, original-layout aware) first.
        self.checkpointer = RegionSpotCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
        if cfg.MODEL.REGIONSPOT.PROMPT == "proposals":
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
        return build_detection_test_loader(dicts, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder=None):
        return build_regionspot_evaluator(cfg, dataset_name, output_folder)
