"""How the jobs start Ray."""

from __future__ import annotations

import os


def init_ray() -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit`` and on cluster
    nodes), whose resources are its own; otherwise start a Ray instance of this process with
    twice as many logical CPUs as cores (at least 4). Without that slack, workers or replicas
    at 1 CPU each leave no CPU for the Ray Data tasks that feed them, and a 2-core machine
    hangs."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)))
