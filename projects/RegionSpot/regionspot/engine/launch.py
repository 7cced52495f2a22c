"""detectron2's `launch`, with each worker's process groups released when its function returns.

A gloo process that reaches interpreter shutdown with process groups alive can abort there
("terminate called without an active exception", SIGABRT): the groups' C++ objects are destroyed
while Python is torn down. The run's results are written by then, but the process fails, and so
does `launch`. detectron2's `comm` keeps its own references (the local group, the cached gloo
group), so those are dropped too, and the groups are destroyed while the interpreter is whole.
"""
import gc
from typing import Any, Callable, Tuple

import torch.distributed as dist
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm


class _ReleasingWorker:
    """`fn`, then its process groups released (a class, not a closure: spawn pickles it)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        try:
            return self.fn(*args)
        finally:
            release_process_groups()


def release_process_groups() -> None:
    """Destroys every process group of this process and drops detectron2's references to them."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    comm._LOCAL_PROCESS_GROUP = None
    for cached in ("_get_global_gloo_group", "create_local_process_group"):
        getattr(getattr(comm, cached, None), "cache_clear", lambda: None)()
    gc.collect()


def launch(main_func: Callable, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = None, args: Tuple = (), **kwargs: Any) -> None:
    """`detectron2.engine.launch` with the same arguments; see the module docstring."""
    d2_launch(_ReleasingWorker(main_func), num_gpus_per_machine, num_machines=num_machines,
              machine_rank=machine_rank, dist_url=dist_url, args=args, **kwargs)
