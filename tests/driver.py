"""Run a job module (``python -m jobs.NAME``) as its own driver process on the test's Ray
cluster, so that a test can kill it like a crashed driver."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_driver(module: str, argv: list[str], log_path: Path, without: tuple[str, ...] = ()) -> subprocess.Popen:
    """``python -m module argv`` in a new session (``os.killpg`` kills it and its children),
    joined to the running Ray cluster through ``RAY_ADDRESS``; output goes to ``log_path``.
    ``without``: packages the driver cannot import (``import torch`` raises ImportError in it;
    the Ray workers it starts are other processes and have them)."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "w") as log:
        command = ["-m", module] if not without else [
            "-c", f"import runpy, sys; sys.modules.update(dict.fromkeys({list(without)!r})); "
                  f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"]
        return subprocess.Popen([sys.executable, *command, *argv], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
