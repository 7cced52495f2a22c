"""regionspot.engine.launch: a worker's process groups are released when its function ends."""
import socket

import pytest
import torch.distributed as dist
from detectron2.utils import comm

from regionspot.engine.launch import _ReleasingWorker


def _init_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)
    # What detectron2's launch and all_gather leave behind: the local group, the cached gloo group.
    comm._LOCAL_PROCESS_GROUP = dist.new_group([0])
    comm._get_global_gloo_group()


def _rank_plus(x):
    return dist.get_rank() + x


def _fails():
    raise RuntimeError("worker failed")


def _released() -> bool:
    return (not dist.is_initialized() and comm._LOCAL_PROCESS_GROUP is None
            and comm._get_global_gloo_group.cache_info().currsize == 0)


def test_groups_released_after_the_worker_returns_or_fails():
    _init_group()
    assert not _released()
    assert _ReleasingWorker(_rank_plus)(5) == 5  # ran inside the group, its result passed on
    assert _released()
    _init_group()
    with pytest.raises(RuntimeError, match="worker failed"):
        _ReleasingWorker(_fails)()
    assert _released()
    assert _ReleasingWorker(len)([1, 2]) == 2  # without a group (one process): only the function
