"""The on-disk SAM token cache: round trip, and every kind of damaged file is detected, never used."""
import os

import pytest
import torch

from regionspot import token_cache
from regionspot.token_cache import (
    FORMAT,
    CorruptTokenFile,
    is_valid,
    load_tokens,
    save_tokens,
    source_key,
    token_cache_folder,
    token_file,
)


def _payload(n=5, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, dim, generator=g) * 3.0
    xy = torch.rand(n, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * 50], dim=1)
    classes = torch.randint(0, 7, (n,), generator=g)
    return tokens, boxes, classes


def _save(path, image_id=42, n=5, source="abc"):
    tokens, boxes, classes = _payload(n)
    save_tokens(path, image_id=image_id, file_name="/data/img_42.png", image_size=(192, 256),
                tokens=tokens, boxes=boxes, classes=classes, sam_type="tiny", source=source)
    return tokens, boxes, classes


def test_round_trip(tmp_path):
    folder = token_cache_folder(str(tmp_path), "my_set", "tiny")
    assert folder == os.path.join(str(tmp_path), "my_set", "tiny")
    path = token_file(folder, 42)
    tokens, boxes, classes = _save(path)
    assert os.path.isfile(path)
    # Atomic write: no temp file is left next to it.
    assert os.listdir(folder) == [os.path.basename(path)]

    out = load_tokens(path, 42)
    assert out["format"] == FORMAT
    assert out["image_id"] == 42
    assert out["file_name"] == "/data/img_42.png"
    assert tuple(out["image_size"]) == (192, 256)
    assert out["sam_type"] == "tiny"
    assert out["tokens"].dtype == torch.float16
    assert out["tokens"].shape == tokens.shape
    # fp16 keeps ~11 bits of mantissa: relative rounding error <= 2^-11.
    torch.testing.assert_close(out["tokens"].float(), tokens, rtol=2 ** -10, atol=1e-6)
    assert not torch.equal(out["tokens"].float(), tokens)  # really stored in half precision
    assert out["boxes"].dtype == torch.float32
    torch.testing.assert_close(out["boxes"], boxes, rtol=0, atol=0)
    assert out["classes"].dtype == torch.int64
    assert torch.equal(out["classes"], classes)
    # The image id may be given as a string too (image ids from json are ints or strings).
    assert load_tokens(path, "42")["image_id"] == 42
    assert is_valid(path, 42, "abc")
    assert is_valid(path, 42)


def test_image_id_is_made_safe_for_file_names(tmp_path):
    path = token_file(str(tmp_path), "a/b:c d")
    assert os.path.dirname(path) == str(tmp_path)
    assert "/" not in os.path.basename(path) and " " not in os.path.basename(path)


def test_save_refuses_misaligned_tokens(tmp_path):
    tokens, boxes, classes = _payload(4)
    with pytest.raises(ValueError):
        save_tokens(str(tmp_path / "x.pth"), image_id=1, file_name="x", image_size=(10, 10),
                    tokens=tokens[:3], boxes=boxes, classes=classes, sam_type="tiny")
    assert not os.path.exists(tmp_path / "x.pth")


def test_zero_boxes_round_trip(tmp_path):
    path = str(tmp_path / "empty.pth")
    save_tokens(path, image_id=3, file_name="e.png", image_size=(8, 8), tokens=torch.zeros(0, 32),
                boxes=torch.zeros(0, 4), classes=torch.zeros(0, dtype=torch.long), sam_type="tiny")
    out = load_tokens(path, 3)
    assert out["tokens"].shape == (0, 32) and out["boxes"].shape == (0, 4) and out["classes"].shape == (0,)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_tokens(path, 1)
    assert not is_valid(path, 1)


def test_truncated_file_is_detected(tmp_path):
    path = str(tmp_path / "t.pth")
    _save(path)
    data = open(path, "rb").read()
    assert len(data) > 100
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CorruptTokenFile, match="t.pth"):
        load_tokens(path, 42)
    assert not is_valid(path, 42)
    assert not is_valid(path)


def test_garbage_file_is_detected(tmp_path):
    path = str(tmp_path / "g.pth")
    with open(path, "wb") as f:
        f.write(os.urandom(4096))
    with pytest.raises(CorruptTokenFile, match="g.pth"):
        load_tokens(path, 42)
    assert not is_valid(path, 42)


def test_empty_file_is_detected(tmp_path):
    path = str(tmp_path / "z.pth")
    open(path, "wb").close()
    with pytest.raises(CorruptTokenFile):
        load_tokens(path)
    assert not is_valid(path)


def test_foreign_torch_file_is_detected(tmp_path):
    # A sound torch file that is not a token file (e.g. a checkpoint saved at the wrong path).
    path = str(tmp_path / "other.pth")
    torch.save({"model": {"w": torch.zeros(3)}}, path)
    with pytest.raises(CorruptTokenFile):
        load_tokens(path)
    assert not is_valid(path)


@pytest.mark.parametrize("field,bad", [
    ("tokens", lambda t, b, c: t[:3]),             # fewer tokens than boxes
    ("boxes", lambda t, b, c: b[:, :3]),           # boxes that are not (N, 4)
    ("classes", lambda t, b, c: c[:4]),            # one class missing
    ("tokens", lambda t, b, c: t.flatten()),       # tokens not (N, C)
    ("tokens", lambda t, b, c: t.half().index_fill(0, torch.tensor([1]), float("nan"))),  # non-finite
    ("boxes", lambda t, b, c: b.tolist()),         # not a tensor
])
def test_inconsistent_contents_are_detected(tmp_path, field, bad):
    path = str(tmp_path / "s.pth")
    _save(path)
    payload = torch.load(path, weights_only=True)
    payload[field] = bad(payload["tokens"], payload["boxes"], payload["classes"])
    payload["sha256"] = token_cache._checksum(payload)  # a consistent checksum: the content checks must catch it
    torch.save(payload, path)
    with pytest.raises(CorruptTokenFile, match="s.pth"):
        load_tokens(path, 42)
    assert not is_valid(path, 42)


def test_file_of_another_image_is_detected(tmp_path):
    # E.g. a file copied or renamed by hand: its tokens belong to other boxes.
    path = token_file(str(tmp_path), 7)
    _save(path, image_id=8)
    with pytest.raises(CorruptTokenFile, match="8"):
        load_tokens(path, 7)
    assert not is_valid(path, 7)
    assert is_valid(path, 8)


def test_stale_source_digest_is_invalid(tmp_path):
    path = str(tmp_path / "s.pth")
    d = {"file_name": "/x/img.png", "annotations": [
        {"bbox": [1.0, 2.0, 10.0, 20.0], "bbox_mode": 1, "category_id": 0},
        {"bbox": [30.0, 5.0, 12.0, 8.0], "bbox_mode": 1, "category_id": 2},
    ]}
    src = source_key(d)
    _save(path, image_id=42, source=src)
    assert is_valid(path, 42, src)
    # Any change to the annotations (a moved box, a relabelled box, a removed box) makes it stale.
    moved = {**d, "annotations": [dict(d["annotations"][0], bbox=[1.0, 2.0, 11.0, 20.0]), d["annotations"][1]]}
    relabelled = {**d, "annotations": [d["annotations"][0], dict(d["annotations"][1], category_id=3)]}
    removed = {**d, "annotations": d["annotations"][:1]}
    for other in (moved, relabelled, removed):
        assert source_key(other) != src
        assert not is_valid(path, 42, source_key(other))
    # The folder the image lives in does not matter (datasets move), its annotations do.
    assert source_key({**d, "file_name": "/elsewhere/img.png"}) == src
    assert not is_valid(path, 42, "0" * 40)
