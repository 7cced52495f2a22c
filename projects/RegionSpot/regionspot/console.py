"""What a run prints: the tools' own progress lines on the console, detectron2's full logs in
the run's log.txt (config dumps, model prints, evaluation tables), warnings on both."""
import logging
import sys

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

# Loggers whose records we route: detectron2's, fvcore's (checkpointer) and ours.
LOGGER_NAMES = ("detectron2", "fvcore", "regionspot")


def setup_run_logging(output_dir: str = "", verbose: bool = False) -> None:
    """Log to `output_dir`/log.txt in full; on the console only warnings, or everything if `verbose`.

    Call it before detectron2's `default_setup`. It makes the same `setup_logger` calls
    (setup_logger is cached per arguments, so default_setup's later calls add no second handler)
    and then sets the console handlers' level, so even default_setup's config dumps obey it.
    """
    rank = comm.get_rank()
    output = output_dir or None
    setup_logger(output, distributed_rank=rank, name="fvcore")
    setup_logger(output, distributed_rank=rank)
    setup_logger(output, distributed_rank=rank, name="regionspot", abbrev_name="regionspot")
    set_console_level(logging.DEBUG if verbose else logging.WARNING)


def set_console_level(level: int) -> None:
    """Set the level of the console (stdout/stderr) handlers of our loggers; log files keep all."""
    for name in LOGGER_NAMES:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
                handler.setLevel(level)


class ProgressBar(HookBase):
    """A tqdm bar over the training iterations, with the latest total loss: the console's view of
    training while detectron2's metric lines go to log.txt."""

    def __init__(self, desc: str = "training"):
        self.desc = desc
        self._bar = None

    def before_train(self):
        if comm.is_main_process():
            self._bar = tqdm(total=self.trainer.max_iter, initial=self.trainer.start_iter,
                             desc=self.desc, unit="it", dynamic_ncols=True)

    def after_step(self):
        if self._bar is None:
            return
        self._bar.update(1)
        history = self.trainer.storage.histories().get("total_loss")
        if history is not None and len(history.values()):
            self._bar.set_postfix(loss=f"{history.latest():.3f}", refresh=False)

    def after_train(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
