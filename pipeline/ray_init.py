"""How the jobs start Ray: after every check of their arguments and inputs, once, quietly."""

from __future__ import annotations

import logging
import os
import socket

from pipeline.outputs import UserError


def init_ray(dashboard: bool = True, verbose: bool = False, worker_output: bool = True):
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit`` and on cluster
    nodes), whose resources and dashboard are its own; otherwise start a Ray instance of this
    process. Nothing happens when Ray is already initialised (a library user's own
    ``ray.init``). An unreachable ``RAY_ADDRESS`` is a ``UserError``.

    The job's own instance has twice as many logical CPUs as cores (at least 4): without that
    slack, workers or replicas at 1 CPU each leave no CPU for the Ray Data tasks that feed them,
    and a 2-core machine hangs. ``dashboard=False`` leaves the dashboard out, for the scoring
    job: its head and module processes took about 6 CPU-seconds per 100 s of scoring, and the
    job ran at 192 against 200 rows/s without them on 2 cores. Training keeps it: Ray Train's
    placement-group cleaner asks the dashboard's state API every second and logs a warning
    each time it gets no answer.

    Quiet unless ``verbose``: Ray's own INFO and WARNING lines on the console (its start, the
    token it generated, Ray Data's plan and logged progress) are left out (Ray Data still
    writes them to its log files), progress bars are drawn only on a terminal, and the
    workers' output reaches the driver only with ``worker_output`` (training's progress
    lines); errors are still raised and shown."""
    import ray

    if ray.is_initialized():
        return None

    options = {} if verbose else {
        "logging_level": logging.ERROR, "log_to_driver": worker_output,
        # the workers' own Ray loggers (Ray Train's controller and workers, Ray Data's coordinators)
        "logging_config": ray.LoggingConfig(log_level="ERROR"),
        "runtime_env": {"env_vars": {"RAY_DATA_LOG_LEVEL": "ERROR"}}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address()
        try:
            context = ray.init(**options)
        except ConnectionError as e:
            raise UserError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({e}); start one (ray start "
                            "--head) or unset RAY_ADDRESS to run on a local instance") from None
    else:
        context = ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)),
                           include_dashboard=dashboard, **options)
    if not verbose:
        import ray.data  # configures its loggers on import: quieten them after

        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)  # the console; its log files keep everything
        ray.data.DataContext.get_current().enable_progress_bars = _is_terminal()
    return context


def _is_terminal() -> bool:
    """Progress bars only where a person watches: in a log file Ray Data writes them as lines."""
    import sys

    return sys.stderr.isatty()


def check_ray_address(timeout_s: float = 5.0) -> None:
    """A ``RAY_ADDRESS`` of the form ``host:port`` (``ray://`` and ``http://`` included) must
    accept a connection, a ``UserError`` otherwise; the jobs check it first, with their other
    arguments. ``auto`` and ``local`` are left to ``ray.init``."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise UserError(f"RAY_ADDRESS={address}: cannot reach it ({e.strerror or e}); check that the cluster is up "
                        "and the address is right, or unset RAY_ADDRESS to run on a local instance") from None
