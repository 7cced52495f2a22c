"""An evaluation's detections on disk, written by each process as it goes, read back by the final
evaluation: no process ever holds them all.

Layout, under `<output folder>/results/`:

- ``rank<k>-part<j>.jsonl``: shards of process k, one line per image,
  ``{"image_id": <id>, "instances": [<COCO result records, dataset category ids>]}``
  (an image without detections has an empty list). A shard is written under a temporary name
  (``.rank<k>-part<j>.jsonl.tmp``) and renamed into place when it holds `images_per_shard`
  images, `seconds_per_shard` have passed, or the evaluation ends.
- ``run.json``: what produced the shards (a digest of the config), so that a resumed run does
  not mix another model's detections in.

An image is complete when it is in a shard that was renamed into place; only such shards are
read. A killed run loses at most its processes' open shards, and `--resume` skips the rest.
"""
import json
import logging
import os
import re
import time
from typing import Dict, Iterator, List, Optional, Set, Tuple

from .utils.file_io import atomic_write

logger = logging.getLogger(__name__)

SHARD = re.compile(r"^rank(\d+)-part(\d+)\.jsonl$")
RUN_FILE = "run.json"
_PREFIX = '{"image_id":'
_dumps = json.JSONEncoder(separators=(",", ":")).encode
try:  # orjson (extra fasteval; gradio brings it too) parses shards ~3x faster; json gives the same values
    from orjson import loads as _loads
except ImportError:
    _loads = json.loads


def results_folder(output_folder: str) -> str:
    """Where the shards of an evaluation writing to `output_folder` go."""
    return os.path.join(output_folder, "results")


def shard_files(folder: str) -> List[str]:
    """The complete shards in `folder`, by process and part."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = SHARD.match(name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), os.path.join(folder, name)))
    return [path for _, _, path in sorted(found)]


def _image_id(line: str, path: str) -> int:
    if not line.startswith(_PREFIX):
        raise ValueError(f"Results shard {path} has a line that is not an image's results: {line[:80]!r}")
    return int(line[len(_PREFIX): line.index(",", len(_PREFIX))])


def completed_image_ids(folder: str) -> Set[int]:
    """Ids of the images whose detections are in a complete shard (read without parsing them)."""
    done = set()
    for path in shard_files(folder):
        with open(path) as f:
            for line in f:
                done.add(_image_id(line, path))
    return done


def iter_lines(folder: str) -> Iterator[Tuple[int, str]]:
    """(image id, line) of every image in the complete shards, each image once (a later copy of
    an image, which only a hand-made folder can hold, is skipped with a warning)."""
    seen = set()
    for path in shard_files(folder):
        with open(path) as f:
            for line in f:
                image_id = _image_id(line, path)
                if image_id in seen:
                    logger.warning(f"Image {image_id} is in more than one results shard; {path}'s copy is skipped.")
                    continue
                seen.add(image_id)
                yield image_id, line


def instances_text(line: str) -> str:
    """The records of a shard line as JSON text, without their brackets (no parsing)."""
    start = line.index('"instances":[') + len('"instances":[')
    return line[start: line.rstrip().rindex("]")]


def prepare_folder(folder: str, *, resume: bool, fingerprint: str = "") -> None:
    """Before an evaluation (main process): remove unfinished shards, and the complete ones too
    unless resuming; on resume, refuse shards another configuration wrote."""
    os.makedirs(folder, exist_ok=True)
    run_file = os.path.join(folder, RUN_FILE)
    for name in os.listdir(folder):
        if name.endswith(".tmp") or (not resume and (SHARD.match(name) or name == RUN_FILE)):
            os.remove(os.path.join(folder, name))
    if resume and os.path.isfile(run_file) and fingerprint:
        with open(run_file) as f:
            before = json.load(f).get("fingerprint", "")
        if before and before != fingerprint:
            raise ValueError(
                f"Cannot resume the evaluation in {folder}: its detections came from another configuration "
                f"(config digest {before}, now {fingerprint}; {run_file}). Run without --resume to start over, "
                "or with the configuration and weights of the interrupted run.")
    if not os.path.isfile(run_file):
        atomic_write(run_file, lambda f: f.write(json.dumps({"fingerprint": fingerprint}).encode()))


class ShardWriter:
    """One process's shards: `add` an image's records as soon as they are made."""

    def __init__(self, folder: str, rank: int, images_per_shard: int = 100, seconds_per_shard: float = 120.0):
        if images_per_shard < 1:
            raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}.")
        self.folder, self.rank = folder, rank
        self.images_per_shard, self.seconds_per_shard = images_per_shard, seconds_per_shard
        parts = [int(m.group(2)) for m in (SHARD.match(n) for n in os.listdir(folder))
                 if m and int(m.group(1)) == rank] if os.path.isdir(folder) else []
        self._part = max(parts, default=-1) + 1
        self._file = None
        self._count = 0
        self._opened = 0.0
        self.images_written = 0
        self._open_ids: List[int] = []
        self.image_ids: List[int] = []  # the images of this run's complete shards

    def _name(self) -> str:
        return f"rank{self.rank}-part{self._part:05d}.jsonl"

    def add(self, image_id: int, records: List[Dict]) -> None:
        if self._file is None:
            os.makedirs(self.folder, exist_ok=True)
            self._file = open(os.path.join(self.folder, f".{self._name()}.tmp"), "w")
            self._count, self._opened = 0, time.monotonic()
        self._file.write(f'{_PREFIX}{int(image_id)},"instances":[{",".join(map(_dumps, records))}]}}\n')
        self._count += 1
        self._open_ids.append(int(image_id))
        if self._count >= self.images_per_shard or time.monotonic() - self._opened >= self.seconds_per_shard:
            self.flush()

    def flush(self) -> None:
        """Rename the open shard into place: its images are complete from now on."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp = os.path.join(self.folder, f".{self._name()}.tmp")
        os.replace(tmp, os.path.join(self.folder, self._name()))
        self.images_written += self._count
        self.image_ids.extend(self._open_ids)
        self._file, self._part, self._open_ids = None, self._part + 1, []

    close = flush


def write_results_json(lines: Iterator[Tuple[int, str]], path: str) -> Iterator[Tuple[int, str]]:
    """Pass `lines` through while writing all their records as one JSON list to `path`
    (detectron2's results file), renamed into place when the stream is done."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write("[")
            first = True
            for image_id, line in lines:
                text = instances_text(line)
                if text:
                    f.write(text if first else "," + text)
                    first = False
                yield image_id, line
            f.write("]")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def parse_lines(lines: Iterator[Tuple[int, str]]) -> Iterator[List[Dict]]:
    """Each image's records."""
    for _, line in lines:
        yield _loads(line)["instances"]


def first_records(folder: str) -> Optional[List[Dict]]:
    """The records of the first image that has any (to tell which tasks the results allow)."""
    for _, line in iter_lines(folder):
        if instances_text(line):
            return json.loads(line)["instances"]
    return None
