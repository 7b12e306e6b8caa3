"""Fault injection for the tests, from outside: kill a real Ray actor's process (SIGKILL) while
a job runs, as a crash or an out-of-memory kill would. Nothing in the product knows about it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable


def alive_actor_pids(class_part: str) -> list[int]:
    """PIDs of the live actors whose class name contains ``class_part`` (Ray Data names a pool's
    actors after the operator, e.g. ``MapWorker(MapBatches(Replica))``; Ray Train's are
    ``RayTrainWorker``). Reads the GCS actor table: ``ray.util.state`` needs the dashboard,
    which the tests' Ray instances leave out."""
    from ray._private.state import actors

    return sorted(a["Pid"] for a in actors(actor_state_name="ALIVE").values()
                  if class_part in a["ActorClassName"] and a["Pid"])


class KillWhen(threading.Thread):
    """Once ``ready()`` is true, SIGKILL the process of one live actor whose class name holds
    ``actor`` (the lowest PID); records the PID and when (``time.time()``). Start it, run the
    job, then ``join``: ``killed`` is None when the moment never came."""

    def __init__(self, ready: Callable[[], bool], actor: str, timeout_s: float = 300.0, poll_s: float = 0.02):
        super().__init__(daemon=True)
        self.ready, self.actor, self.timeout_s, self.poll_s = ready, actor, timeout_s, poll_s
        self.killed: int | None = None
        self.at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.ready():
                pids = alive_actor_pids(self.actor)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    self.killed, self.at = pids[0], time.time()
                    return
            time.sleep(self.poll_s)

    def finish(self) -> None:
        self.stop.set()
        self.join()


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers signal 0 until its parent reaps it
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True
