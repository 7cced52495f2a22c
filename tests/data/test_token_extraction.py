"""SAM token extraction: counts, layout, resumability, failures, sharding and the CLI."""
import json
import os
import socket

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import BoxMode
from detectron2.utils import comm

from regionspot.data import token_cache
from regionspot.modeling.encoders.sam_encoder import SamRegionEncoder, build_sam
from regionspot.data.synthetic import make_synthetic_lvis, register_synthetic_lvis
from regionspot.data.token_cache import load_tokens, token_cache_folder, token_file
from regionspot.data.token_extraction import ExtractionSummary, extract_tokens, shard_of
from regionspot.engine.launch import launch

from conftest import TINY_CONFIG, tiny_cfg, load_tool

NUM_IMAGES = 6


def _load_cli():
    module = load_tool("extract_sam_tokens")
    return module


@pytest.fixture
def dataset(tmp_path):
    """A fresh registered 6-image synthetic set (its own folder: tests may damage its images)."""
    name = f"extract_test_{os.path.basename(str(tmp_path))}"
    root = str(tmp_path / "data")
    json_path = make_synthetic_lvis(root, "train", num_images=NUM_IMAGES, seed=11)
    register_synthetic_lvis(name, json_path, root)
    yield name
    DatasetCatalog.remove(name)


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    return SamRegionEncoder(build_sam(cfg.MODEL.REGIONSPOT.SAM.TYPE, cfg.MODEL.REGIONSPOT.SAM.CHECKPOINT)).eval()


def _files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".pth"))


_OLD_NS = 1_000_000_000 * 10 ** 9  # 2001-09-09: any rewrite gets a later modification time


def _age(folder):
    """Date every cache file back, so a rewrite shows even within the file system's time granularity."""
    for f in _files(folder):
        os.utime(os.path.join(folder, f), ns=(_OLD_NS, _OLD_NS))


def _mtimes(folder):
    """{file: (inode, mtime)}: a rewrite (temp file + rename) changes both."""
    return {f: (os.stat(os.path.join(folder, f)).st_ino, os.stat(os.path.join(folder, f)).st_mtime_ns)
            for f in _files(folder)}


def test_extraction_writes_one_file_per_image(sam, dataset, tmp_path):
    cfg = tiny_cfg()
    out = str(tmp_path / "tokens")
    dicts = DatasetCatalog.get(dataset)
    assert len(dicts) == NUM_IMAGES
    num_boxes = sum(len(d["annotations"]) for d in dicts)

    summary = extract_tokens(sam, cfg, dataset, out)
    assert isinstance(summary, ExtractionSummary)
    assert summary.failed == {}
    assert (summary.images, summary.boxes, summary.skipped) == (NUM_IMAGES, num_boxes, 0)
    text = str(summary)
    assert f"images: {NUM_IMAGES}" in text and f"boxes: {num_boxes}" in text and "failed: 0" in text

    folder = os.path.join(out, dataset, "tiny")
    assert folder == token_cache_folder(out, dataset, cfg.MODEL.REGIONSPOT.SAM.TYPE)
    assert _files(folder) == sorted(os.path.basename(token_file(folder, d["image_id"])) for d in dicts)
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]
    for d in dicts:
        payload = load_tokens(token_file(folder, d["image_id"]), d["image_id"])
        n = len(d["annotations"])
        assert payload["tokens"].shape == (n, sam.token_dim)
        assert payload["tokens"].dtype == torch.float16
        # The boxes and classes stored with the tokens are the image's own annotations, in order.
        want = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]])
        torch.testing.assert_close(payload["boxes"], want.float(), atol=1e-4, rtol=0)
        assert payload["classes"].tolist() == [a["category_id"] for a in d["annotations"]]
        assert payload["file_name"] == d["file_name"]
        assert tuple(payload["image_size"]) == (d["height"], d["width"])
        # Different boxes give different tokens (not a constant placeholder).
        if n > 1:
            assert not torch.allclose(payload["tokens"][0], payload["tokens"][1])


def test_second_run_skips_everything_and_rewrites_nothing(sam, dataset, tmp_path):
    cfg = tiny_cfg()
    out = str(tmp_path / "tokens")
    extract_tokens(sam, cfg, dataset, out)
    folder = token_cache_folder(out, dataset, "tiny")
    _age(folder)
    before = _mtimes(folder)
    assert len(before) == NUM_IMAGES

    again = extract_tokens(sam, cfg, dataset, out)
    assert (again.images, again.boxes, again.skipped, again.failed) == (0, 0, NUM_IMAGES, {})
    assert _mtimes(folder) == before


def test_resume_after_interrupted_run_redoes_exactly_the_damaged_files(sam, dataset, tmp_path):
    cfg = tiny_cfg()
    out = str(tmp_path / "tokens")
    extract_tokens(sam, cfg, dataset, out)
    folder = token_cache_folder(out, dataset, "tiny")
    files = _files(folder)
    reference = {f: load_tokens(os.path.join(folder, f))["tokens"] for f in files}
    deleted, truncated = files[:2], files[2]
    for f in deleted:
        os.remove(os.path.join(folder, f))
    path = os.path.join(folder, truncated)
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    # A temp file left by a killed writer must not confuse the rerun.
    open(os.path.join(folder, "leftover.tmp"), "wb").write(data[:100])
    _age(folder)
    before = _mtimes(folder)

    redone = set(deleted) | {truncated}
    dicts = DatasetCatalog.get(dataset)
    redo_boxes = sum(len(d["annotations"]) for d in dicts
                     if os.path.basename(token_file(folder, d["image_id"])) in redone)
    summary = extract_tokens(sam, cfg, dataset, out)
    assert (summary.images, summary.boxes, summary.skipped, summary.failed) == (3, redo_boxes, NUM_IMAGES - 3, {})
    after = _mtimes(folder)
    assert set(after) == set(files)
    changed = {f for f in files if f not in before or after[f] != before[f]}
    assert changed == redone
    assert all(after[f][1] > _OLD_NS for f in redone)
    # The redone files are sound and hold the same tokens as the first run (SAM is deterministic).
    for f in redone:
        torch.testing.assert_close(load_tokens(os.path.join(folder, f))["tokens"], reference[f])


def test_bit_rotten_file_is_redone(sam, dataset, tmp_path):
    # 64 zeroed bytes inside the token data: torch.load reads finite tokens, the checksum does not match.
    cfg = tiny_cfg()
    out = str(tmp_path / "tokens")
    extract_tokens(sam, cfg, dataset, out)
    folder = token_cache_folder(out, dataset, "tiny")
    path = token_file(folder, DatasetCatalog.get(dataset)[0]["image_id"])
    good = load_tokens(path)["tokens"]
    data = bytearray(open(path, "rb").read())
    at = data.find(good.numpy().tobytes())
    assert at >= 0
    data[at + 64:at + 128] = bytes(64)
    open(path, "wb").write(bytes(data))
    assert torch.isfinite(torch.load(path, weights_only=True)["tokens"].float()).all()
    summary = extract_tokens(sam, cfg, dataset, out)
    assert (summary.images, summary.skipped) == (1, NUM_IMAGES - 1)
    assert torch.equal(load_tokens(path)["tokens"], good)


def test_stale_file_is_redone(sam, dataset, tmp_path):
    # A file made from other annotations (the dataset changed since) is redone, not trusted.
    cfg = tiny_cfg()
    out = str(tmp_path / "tokens")
    extract_tokens(sam, cfg, dataset, out)
    folder = token_cache_folder(out, dataset, "tiny")
    d = DatasetCatalog.get(dataset)[0]
    path = token_file(folder, d["image_id"])
    payload = torch.load(path, weights_only=True)
    payload["source"] = "0" * 40
    payload["sha256"] = token_cache._checksum(payload)  # a sound file, only made from other annotations
    torch.save(payload, path)
    summary = extract_tokens(sam, cfg, dataset, out)
    assert (summary.images, summary.skipped) == (1, NUM_IMAGES - 1)
    assert load_tokens(path)["source"] != "0" * 40


def test_unreadable_image_is_reported_and_the_others_finish(sam, dataset, tmp_path):
    cfg = tiny_cfg()
    out = str(tmp_path / "tokens")
    dicts = DatasetCatalog.get(dataset)
    bad = dicts[3]
    with open(bad["file_name"], "wb") as f:
        f.write(b"this is not a png" * 10)
    summary = extract_tokens(sam, cfg, dataset, out)
    assert summary.images == NUM_IMAGES - 1
    assert summary.boxes == sum(len(d["annotations"]) for d in dicts) - len(bad["annotations"])
    assert list(summary.failed) == [bad["file_name"]]
    reason = summary.failed[bad["file_name"]]
    assert reason and os.path.basename(bad["file_name"]) in reason
    assert f"failed {bad['file_name']}" in str(summary)
    folder = token_cache_folder(out, dataset, "tiny")
    assert not os.path.exists(token_file(folder, bad["image_id"]))
    assert len(_files(folder)) == NUM_IMAGES - 1
    # A rerun retries only the failed image (and fails again, since it is still broken).
    again = extract_tokens(sam, cfg, dataset, out)
    assert (again.images, again.skipped, list(again.failed)) == (0, NUM_IMAGES - 1, [bad["file_name"]])


def test_shard_of_splits_disjointly_and_covers_all():
    items = list(range(23))
    for n in (1, 2, 3, 5):
        shards = [shard_of(items, i, n) for i in range(n)]
        flat = [x for s in shards for x in s]
        assert sorted(flat) == items  # covers all, no duplicates
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
        # Within a shard, processes split it again the same way.
        for s, i in zip(shards, range(n)):
            parts = [shard_of(items, i, n, rank=r, world_size=2) for r in range(2)]
            assert sorted(parts[0] + parts[1]) == sorted(s) and not set(parts[0]) & set(parts[1])
    with pytest.raises(ValueError, match="shard"):
        shard_of(items, 2, 2)
    with pytest.raises(ValueError, match="shard"):
        shard_of(items, -1, 2)


def test_sharded_jobs_write_disjoint_files_that_cover_the_dataset(sam, dataset, tmp_path):
    cfg = tiny_cfg()
    folder = token_cache_folder(str(tmp_path / "tokens"), dataset, "tiny")
    got = []
    for i in range(2):
        seen = set(_files(folder)) if os.path.isdir(folder) else set()
        s = extract_tokens(sam, cfg, dataset, str(tmp_path / "tokens"), shard=i, num_shards=2)
        assert s.skipped == 0 and not s.failed  # disjoint: the second job finds nothing of its own done
        new = set(_files(folder)) - seen
        assert len(new) == s.images > 0
        got.append(new)
    assert not got[0] & got[1]
    dicts = DatasetCatalog.get(dataset)
    assert got[0] | got[1] == {os.path.basename(token_file(folder, d["image_id"])) for d in dicts}


def test_cli_main_extracts_and_counts_failures(dataset, tmp_path, monkeypatch):
    cli = _load_cli()
    lines = []
    # Record its summary lines (capsys would leave its log handler on a closed stream).
    monkeypatch.setattr(cli, "print", lambda *a, **k: lines.append(" ".join(map(str, a))), raising=False)

    out = str(tmp_path / "cli_tokens")
    argv = ["--config-file", TINY_CONFIG, "--dataset", dataset, "--output", out, "MODEL.DEVICE", "cpu"]
    args = cli.parse_args(argv)
    assert (args.shard, args.num_shards, args.dataset, args.output) == (0, 1, [dataset], out)
    assert cli.main(args) == 0
    folder = token_cache_folder(out, dataset, "tiny")
    assert len(_files(folder)) == NUM_IMAGES
    printed = "\n".join(lines)
    assert f"[{dataset}]" in printed and f"images: {NUM_IMAGES}" in printed

    # One broken image: main returns the number of failures, and the rest is skipped as done.
    d = DatasetCatalog.get(dataset)[0]
    os.remove(token_file(folder, d["image_id"]))
    with open(d["file_name"], "wb") as f:
        f.write(b"\0" * 64)
    lines.clear()
    assert cli.main(cli.parse_args(argv)) == 1
    printed = "\n".join(lines)
    assert f"skipped: {NUM_IMAGES - 1}" in printed and "failed: 1" in printed and d["file_name"] in printed

    # Sharded: job 1 of 2 (with the image repaired) writes only its own part.
    out2 = str(tmp_path / "cli_shard")
    json_path = make_synthetic_lvis(str(tmp_path / "data2"), "train", num_images=NUM_IMAGES, seed=11)
    register_synthetic_lvis(dataset, json_path, str(tmp_path / "data2"))
    args = cli.parse_args(["--config-file", TINY_CONFIG, "--dataset", dataset, "--output", out2,
                           "--shard", "1", "--num-shards", "2", "MODEL.DEVICE", "cpu"])
    assert cli.main(args) == 0
    want = {os.path.basename(token_file(folder, d["image_id"])) for d in shard_of(DatasetCatalog.get(dataset), 1, 2)}
    assert set(_files(token_cache_folder(out2, dataset, "tiny"))) == want


def _extract_in_process(args, name, json_path, image_root, log_dir):
    """One process of a `launch`ed extraction (module level: spawn pickles it by reference)."""
    register_synthetic_lvis(name, json_path, image_root)  # spawned processes know only built-in sets
    cli = _load_cli()
    lines = []
    cli.print = lambda *a, **k: lines.append(" ".join(map(str, a)))
    failed = cli.main(args)
    with open(os.path.join(log_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump({"failed": failed, "lines": lines, "world_size": comm.get_world_size()}, f)


def test_cli_over_two_processes_splits_the_images(tmp_path, monkeypatch):
    name = "extract_test_launch"
    root = str(tmp_path / "data")
    json_path = make_synthetic_lvis(root, "train", num_images=NUM_IMAGES, seed=12)
    register_synthetic_lvis(name, json_path, root)
    out, logs = str(tmp_path / "tokens"), str(tmp_path / "logs")
    os.makedirs(logs)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = _load_cli()
    args = cli.parse_args(["--config-file", TINY_CONFIG, "--dataset", name, "--output", out,
                           "--num-gpus", "2", "--dist-url", f"tcp://127.0.0.1:{port}", "MODEL.DEVICE", "cpu"])
    launch(_extract_in_process, args.num_gpus, num_machines=1, machine_rank=0, dist_url=args.dist_url,
           args=(args, name, json_path, root, logs))
    DatasetCatalog.remove(name)

    ranks = [json.load(open(os.path.join(logs, f"rank{r}.json"))) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["failed"] for r in ranks] == [0, 0]
    # Only the main process prints, and its summary adds up both processes' shares: every image
    # once, none twice (a duplicated share would count 12 images or skip some).
    assert ranks[1]["lines"] == []
    assert len(ranks[0]["lines"]) == 1
    assert f"images: {NUM_IMAGES}," in ranks[0]["lines"][0] and "skipped: 0," in ranks[0]["lines"][0]
    folder = token_cache_folder(out, name, "tiny")
    dicts = json.load(open(json_path))["images"]
    assert _files(folder) == sorted(os.path.basename(token_file(folder, d["id"])) for d in dicts)
    for d in dicts:
        load_tokens(token_file(folder, d["id"]), d["id"])
