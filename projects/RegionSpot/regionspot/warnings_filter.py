"""The one place where known-harmless warnings of our dependencies are silenced, each with why.

Imported first by the package (``regionspot/__init__.py``), before detectron2, clip and fvcore
emit them at import time. Filters match one message each, never a whole category, so any new or
real warning still reaches the user.
"""
import logging
import warnings

# openai-clip 1.0.1 runs `from pkg_resources import packaging` at import; setuptools < 81 (which
# we pin for it) only announces pkg_resources' future removal. Nothing we call is affected.
warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)
# fvcore (focal loss) and detectron2 (box regression) decorate functions with torch.jit.script
# at import, and sam2's SAM2Transforms scripts its resize; torch 2.14 marks TorchScript
# deprecated, but those scripted functions still run.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

# OpenAI's CLIP releases are TorchScript archives; we torch.jit.load them only to read their state
# dict into the clip package's own modules (torch 2.14 marks TorchScript deprecated).
warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# detectron2's environment report (default_setup) imports torch.utils.cpp_extension, which warns
# on a CPU-only machine that it found no CUDA runtime: true and expected there, and only the
# compiled-op builder would need one.
logging.getLogger("torch.utils.cpp_extension").addFilter(_DropMessages("No CUDA runtime is found"))
# lvis warns on every evaluation that it was handed results in memory rather than a file: that
# is how detectron2's LVISEvaluator always calls it.
logging.getLogger("lvis.results").addFilter(_DropMessages("Assuming user provided the results in correct format"))
