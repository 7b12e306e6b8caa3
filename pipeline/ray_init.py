"""How the jobs start Ray."""

from __future__ import annotations

import os


def init_ray(dashboard: bool = True):
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit`` and on cluster
    nodes), whose resources and dashboard are its own; otherwise start a Ray instance of this
    process and return its context.

    The job's own instance has twice as many logical CPUs as cores (at least 4): without that
    slack, workers or replicas at 1 CPU each leave no CPU for the Ray Data tasks that feed them,
    and a 2-core machine hangs. ``dashboard=False`` leaves the dashboard out, for the scoring
    job: its head and module processes took about 6 CPU-seconds per 100 s of scoring, and the
    job ran at 192 against 200 rows/s without them on 2 cores. Training keeps it: Ray Train's
    placement-group cleaner asks the dashboard's state API every second and logs a warning
    each time it gets no answer."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return ray.init()
    return ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=dashboard)
