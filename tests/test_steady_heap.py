"""benchmarks.baselines.steady_heap: the heap kept between the ablation's timed passes."""

import ctypes.util
import json
import subprocess
import sys

import pytest

# Two "passes" of differently shaped blocks (as two speeds give), in a fresh process: the
# page faults of the second pass, and the resident memory before and after the stretch.
_PASSES = """
import json, resource, sys
import numpy as np
from benchmarks.baselines import steady_heap

rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def one_pass(sizes_mib):
    blocks = [np.ones(int(m * 2**20) // 8) for m in sizes_mib]  # touches every page
    del blocks

def run():
    one_pass([24, 6, 6, 1])
    before = faults()
    one_pass([20, 3, 3, 3, 2, 2])
    return faults() - before

if sys.argv[1] == "steady":
    with steady_heap():
        second = run()
        inside = rss()
    print(json.dumps({"second_pass_faults": second, "freed_on_exit": inside - rss()}))
else:
    print(json.dumps({"second_pass_faults": run()}))
"""


def passes(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PASSES, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(ctypes.util.find_library("c") is None or sys.platform != "linux", reason="glibc only")
def test_steady_heap_reuses_pages_across_shapes_and_gives_them_back_after():
    default, steady = passes("default"), passes("steady")
    # glibc's defaults: the first pass's big blocks were mapped and unmapped, so the second
    # pass faults much of its 33 MiB in anew (3,838 faults here)
    assert default["second_pass_faults"] > 2000
    assert steady["second_pass_faults"] < 200  # the heap kept the first pass's pages (1 fault here)
    assert steady["freed_on_exit"] > 20 * 2**20  # and hands them back when the stretch ends
