"""The console gets warnings and our own lines; log.txt gets everything; importing is silent."""
import os
import subprocess
import sys

from conftest import HANG_TIMEOUT_S, ROOT

SNIPPET = """
import logging, sys
from regionspot.utils.console import setup_run_logging
setup_run_logging(sys.argv[1], verbose=sys.argv[2] == "1")
logging.getLogger("detectron2.engine").info("INFO-LINE")
logging.getLogger("regionspot.engine.trainer").warning("WARN-LINE")
"""


def _run(args, code):
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "projects", "RegionSpot"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)


def test_console_warnings_only_unless_verbose(tmp_path):
    quiet = _run([str(tmp_path / "quiet"), "0"], SNIPPET)
    assert quiet.returncode == 0, quiet.stderr
    assert "WARN-LINE" in quiet.stdout and "INFO-LINE" not in quiet.stdout + quiet.stderr
    with open(tmp_path / "quiet" / "log.txt") as f:
        log = f.read()
    assert "INFO-LINE" in log and "WARN-LINE" in log
    loud = _run([str(tmp_path / "loud"), "1"], SNIPPET)
    assert "INFO-LINE" in loud.stdout and "WARN-LINE" in loud.stdout


def test_importing_the_stack_prints_no_warning():
    # The known-harmless warnings of detectron2, fvcore, clip and lvis are filtered in one place
    # (regionspot/warnings_filter.py); anything else would show here.
    code = ("import regionspot, regionspot.modeling.meta_arch, regionspot.evaluation, regionspot.engine.trainer, "
            "regionspot.predictor, lvis, clip, fvcore.nn\n"
            "from detectron2.utils.collect_env import collect_env_info\ncollect_env_info()")
    proc = _run([], code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "" and proc.stdout.strip() == "", proc.stderr + proc.stdout
