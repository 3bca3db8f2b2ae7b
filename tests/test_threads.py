"""The engine's two fixes for torch in a worker thread, each checked in a fresh process."""

import subprocess
import sys
import textwrap

import pytest

from invviz.engine._threads import _pause_functions


def run(code: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120, check=True
    )
    return completed.stdout


@pytest.mark.skipif(not _pause_functions(), reason="no OpenMP runtime with omp_pause_resource_all loaded")
def test_release_idle_pool_ends_the_calling_threads_openmp_threads() -> None:
    out = run(
        """
        import os, time, torch
        from invviz.engine import release_idle_pool
        torch.set_num_threads(2)
        x = torch.rand(1, 16, 128, 128)
        torch.nn.functional.conv2d(x, torch.rand(16, 16, 3, 3)).sum()  # a parallel op: the pool starts
        before = len(os.listdir("/proc/self/task"))
        release_idle_pool()
        # An ended thread leaves /proc a moment after the runtime lets it go (seen on a busy machine).
        deadline = time.monotonic() + 5
        while (after := len(os.listdir("/proc/self/task"))) >= before and time.monotonic() < deadline:
            time.sleep(0.01)
        torch.nn.functional.conv2d(x, torch.rand(16, 16, 3, 3)).sum()  # and comes back when needed
        again = len(os.listdir("/proc/self/task"))
        print(before, after, again)
        """
    )
    before, after, again = map(int, out.split())
    assert after < before
    assert again == before


CHURN = """
import resource, sys, threading

if sys.argv[1] == "keep":  # importing invviz.engine keeps freed memory already
    from invviz.engine._threads import keep_freed_memory
    took = keep_freed_memory()
else:
    took = None
import torch

torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(32, 32, 3, padding=1),
)

def step() -> None:
    x = torch.rand(1, 3, 160, 160, requires_grad=True)
    net(x).square().sum().backward()

def steps(result: list[float]) -> None:
    for _ in range(3):
        step()
    began = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    result.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - began) / 20)

result: list[float] = []
worker = threading.Thread(target=steps, args=(result,))
worker.start()
worker.join()
print(result[0], took)
"""


def test_keep_freed_memory_stops_page_faults_in_a_worker_thread() -> None:
    default, _ = run(CHURN, "default").split()
    kept, took = run(CHURN, "keep").split()
    if took != "True":
        pytest.skip("not glibc: mallopt unavailable")
    # Page faults per forward+backward of a small conv net in a worker thread: 262 or 1,345 by
    # default (glibc's thresholds adapt to the first blocks freed), 20 kept.
    assert float(default) > 100  # the activations are mapped afresh and their pages fault in again
    assert float(kept) < float(default) / 5

