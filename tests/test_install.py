"""setup.py: its metadata (requirements, python_requires) as pip reads it, and a built wheel that
carries the configs, so `regionspot.model_zoo` works from any directory once installed."""
import ast
import email.parser
import glob
import importlib.metadata
import os
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import HANG_TIMEOUT_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "projects", "RegionSpot", "regionspot")
# Not on PyPI in a usable form: the user installs it (from source, or tools/setup_env.sh).
NOT_DECLARED = {"detectron2"}


def _run(cmd, cwd, env=None):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """The core metadata of the project, from setuptools' PEP 517 hook (what pip calls)."""
    out = tmp_path_factory.mktemp("meta")
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    name = _run([sys.executable, "-c", code, str(out)], cwd=ROOT).strip().splitlines()[-1]
    with open(out / name / "METADATA", encoding="utf-8") as f:
        return email.parser.Parser().parse(f)


def _requirements(metadata):
    return [Requirement(r) for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]


def test_python_requires_is_311(metadata):
    spec = Requirement("x" + metadata["Requires-Python"]).specifier
    assert not spec.contains("3.10.14") and spec.contains("3.11.0") and spec.contains("3.12.1")
    assert spec.contains(".".join(map(str, sys.version_info[:3])))


def test_setuptools_keeps_pkg_resources(metadata):
    """openai-clip imports pkg_resources (gone in setuptools 82); torch 2.14 needs >= 77.0.3."""
    (req,) = [r for r in _requirements(metadata) if r.name == "setuptools"]
    assert [req.specifier.contains(v) for v in ("77.0.2", "77.0.3", "81.0.0", "81.9", "82.0.0")] == [
        False, True, True, True, False]


def test_every_imported_distribution_is_declared(metadata):
    """Each third-party module the package imports belongs to a declared requirement; a module
    imported inside a function (on demand) may belong to an extra instead."""
    declared = {canonicalize_name(r.name) for r in _requirements(metadata)}
    in_extras = {canonicalize_name(Requirement(r).name) for r in metadata.get_all("Requires-Dist") if "extra ==" in r}
    owners = importlib.metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = {}
    for path in glob.glob(os.path.join(PACKAGE, "*.py")):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        on_demand = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                     for n in ast.walk(f)}
        # An import tried with a fallback (`try: import x` / `except ImportError:`) is optional too.
        on_demand |= {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                      and any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                              for h in t.handlers)
                      for b in t.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in stdlib or top in NOT_DECLARED or top in ("regionspot", "regionspot_deploy"):
                    continue
                dists = {canonicalize_name(d) for d in owners.get(top, [top])}
                if not dists & (declared | (in_extras if id(node) in on_demand else set())):
                    missing[top] = os.path.basename(path)
    assert not missing, f"imported but not in install_requires: {missing}"


def test_this_environment_satisfies_the_requirements(metadata):
    """What `pip install -e .` would check in a detectron2 environment: ours must pass it."""
    unmet = []
    for req in _requirements(metadata):
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(Version(version), prereleases=True):
            unmet.append(f"{req} (installed {version})")
    assert not unmet, unmet


def test_wheel_ships_configs_and_model_zoo_works_elsewhere(tmp_path):
    """A normal (non-editable) install: build the wheel, install it into a folder, and use the
    model zoo from an unrelated directory, _BASE_ chains included."""
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", str(wheels), ROOT], cwd=ROOT)
    (wheel,) = glob.glob(str(wheels / "regionspot-*.whl"))
    shipped = sorted(n[len("regionspot/configs/"):] for n in zipfile.ZipFile(wheel).namelist()
                     if n.startswith("regionspot/configs/"))
    source = sorted(os.path.relpath(p, os.path.join(ROOT, "configs")).replace(os.sep, "/")
                    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
    assert shipped == source and len(source) > 10
    names = zipfile.ZipFile(wheel).namelist()
    # The open_clip configs of the tiny test models (CLIP.BACKEND open_clip, CLIP.NAME tiny).
    configs = glob.glob(os.path.join(PACKAGE, "modeling", "encoders", "open_clip_configs", "*.json"))
    assert configs and all(f"regionspot/modeling/encoders/open_clip_configs/{os.path.basename(p)}" in names for p in configs)
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
          wheel], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import regionspot, regionspot.model_zoo as mz\n"
        "cfg = mz.get_config('lvis_eval/RegionSpot-BL336_lvis-val_glip-t-boxes.yaml')\n"
        "print(regionspot.__file__)\n"
        "print(cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.REGIONSPOT.CLIP.NAME, cfg.MODEL.REGIONSPOT.PROMPT)\n"
        "print(len(mz.list_configs()))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONWARNINGS="ignore")
    lines = _run([sys.executable, "-c", code], cwd=elsewhere, env=env).strip().splitlines()[-3:]
    assert lines[0].startswith(str(target))  # the installed copy, not the clone
    # META_ARCHITECTURE comes from Base-RegionSpot.yaml, CLIP from RegionSpot-BL336.yaml: two _BASE_ hops.
    assert lines[1] == "RegionSpot ViT-L/14@336px proposals"
    assert int(lines[2]) == len(source)
    # A serving machine's install (docs/DEPLOY.md): the same wheel with --no-deps; its torch-free
    # predictor package imports where torch and detectron2 cannot.
    code = ("import sys\nsys.modules['torch'] = sys.modules['detectron2'] = None\n"
            "import regionspot_deploy\nprint(regionspot_deploy.__file__)\n")
    assert _run([sys.executable, "-c", code], cwd=elsewhere, env=env).strip().startswith(str(target))
