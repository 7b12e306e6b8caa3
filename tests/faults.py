"""Fault injection for the tests, from outside: kill a real Ray actor's process (SIGKILL) while
a job runs, as a crash or an out-of-memory kill would. Nothing in the product knows about it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path


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

    def __init__(self, ready: Callable[[], bool], actor: str, timeout_s: float = 300.0, poll_s: float = 0.02,
                 spare: frozenset[int] = frozenset()):
        super().__init__(daemon=True)
        self.ready, self.actor, self.timeout_s, self.poll_s = ready, actor, timeout_s, poll_s
        self.spare = spare  # PIDs never to kill (e.g. an earlier run's actors not yet reaped)
        self.killed: int | None = None
        self.at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.ready():
                pids = [p for p in alive_actor_pids(self.actor) if p not in self.spare]
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


def calls_in_flight(output: Path) -> list[str]:
    """The scoring calls of ``output`` that began (``_pieces/call-FILE-GROUP-ROW-*``) and
    have no piece written yet (``part-FILE-GROUP-ROW.parquet``)."""
    pieces = {tuple(int(x) for x in p.name[len("part-"):-len(".parquet")].split("-")) for p in output.glob("part-*.parquet")}
    calls = [p.name for p in (output / "_pieces").glob("call-*")]
    return [c for c in calls if tuple(int(x) for x in c.split("-")[1:4]) not in pieces]


class KillMidCall(threading.Thread):
    """SIGKILL the only live replica of a scoring job into ``output`` while it is inside a call:
    freeze it (SIGSTOP), give the calls it finished ``settle_s`` to be written, and kill it if a
    call it began has no piece yet; otherwise let it go on (SIGCONT) and look again."""

    def __init__(self, output: Path, settle_s: float = 3.0, timeout_s: float = 300.0):
        super().__init__(daemon=True)
        self.output, self.settle_s, self.timeout_s = output, settle_s, timeout_s
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            pids = alive_actor_pids("Replica")
            if len(pids) == 1 and any(self.output.glob("part-*.parquet")):
                os.kill(pids[0], signal.SIGSTOP)
                time.sleep(self.settle_s)
                if calls_in_flight(self.output):
                    os.kill(pids[0], signal.SIGKILL)
                    self.killed = pids[0]
                    return
                os.kill(pids[0], signal.SIGCONT)
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        self.join()


def alive_actor_nodes(class_part: str) -> list[str]:
    """Node IDs (hex) of the live actors whose class name contains ``class_part``, one per actor."""
    from ray._private.state import actors

    return sorted(a["Address"]["NodeID"] for a in actors(actor_state_name="ALIVE").values()
                  if class_part in a["ActorClassName"] and a["Pid"])


class RemoveNodeWhen(threading.Thread):
    """Once ``ready()`` is true, remove from ``cluster`` (a ``ray.cluster_utils.Cluster``) a
    worker node that hosts a live actor whose class name holds ``actor``: all its processes
    are killed, as when a machine leaves a cluster. Records the node's ID (``removed``) and the
    nodes that hosted such actors at that moment (``hosts``)."""

    def __init__(self, cluster, ready: Callable[[], bool], actor: str, timeout_s: float = 300.0):
        super().__init__(daemon=True)
        self.cluster, self.ready, self.actor, self.timeout_s = cluster, ready, actor, timeout_s
        self.removed: str | None = None
        self.hosts: list[str] = []
        self.at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.ready():
                hosts = alive_actor_nodes(self.actor)
                nodes = [n for n in self.cluster.worker_nodes if n.node_id in hosts]
                if nodes:
                    self.hosts = hosts
                    self.cluster.remove_node(nodes[0], allow_graceful=False)
                    self.removed, self.at = nodes[0].node_id, time.time()
                    return
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        self.join()


def row_groups_done(output: Path, rows: int) -> int:
    """How many row groups of ``rows`` rows the scoring markers in ``output/_pieces`` count whole."""
    import json

    done: dict[tuple[int, int], int] = {}
    for path in (output / "_pieces").glob("part-*.json"):
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError):  # being written
            continue
        key = (marker["file"], marker["row_group"])
        done[key] = done.get(key, 0) + marker["rows"]
    return sum(1 for n in done.values() if n == rows)
