"""The manifest of an exported folder: what each graph is, the pre- and post-processing constants,
and the SHA256 of every file, checked before anything is loaded."""
import hashlib
import json
import os
from typing import Dict, Iterable

FORMAT = "regionspot-onnx-v1"
MANIFEST = "manifest.json"
REQUIRED_GRAPHS = ("sam_image", "clip_image", "region_decoder", "region_head")


class FolderError(ValueError):
    """An exported folder that cannot be served: a missing or altered file, or a bad manifest."""


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _listed(folder: str) -> Iterable[str]:
    """Every file of the folder but the manifest, relative, sorted."""
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST:
                yield rel.replace(os.sep, "/")


def write_manifest(folder: str, manifest: Dict) -> str:
    """Add the SHA256 of every file in `folder` to `manifest` ("files", in place) and write it
    atomically; returns its path."""
    manifest["files"] = {rel: sha256_of(os.path.join(folder, rel)) for rel in sorted(_listed(folder))}
    path = os.path.join(folder, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def load_manifest(folder: str, verify: bool = True) -> Dict:
    """Read `folder`/manifest.json; with `verify`, check that every graph it names is listed and
    present and that every listed file has its recorded SHA256. Errors name the file at fault."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise FolderError(f"{folder} is not an exported RegionSpot folder: it has no {MANIFEST} "
                          "(write one with tools/export_onnx.py).")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise FolderError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise FolderError(f"{path} has format {found!r}, not {FORMAT!r}: re-export the model.")
    for key in ("graphs", "files", "sam", "clip", "test_resize"):
        if key not in manifest:
            raise FolderError(f"{path} lacks the key {key!r}: re-export the model.")
    graphs, files = manifest["graphs"], manifest["files"]
    for key in REQUIRED_GRAPHS:
        if key not in graphs:
            raise FolderError(f"{path} names no {key!r} graph: the folder is incomplete.")
    for key, rel in {**graphs, **manifest.get("int8_graphs", {})}.items():
        if rel not in files:
            raise FolderError(f"{path}: the {key!r} graph {rel} has no recorded SHA256.")
    if verify:
        for rel, digest in files.items():
            full = os.path.join(folder, rel)
            if not os.path.isfile(full):
                raise FolderError(f"{full} is missing (the manifest lists it): the folder is incomplete.")
            if sha256_of(full) != digest:
                raise FolderError(f"{full} does not match the SHA256 in {path}: the file was altered or "
                                  "truncated; re-export or copy the folder again.")
    return manifest
