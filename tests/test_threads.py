"""The CPU thread governor: fewer torch threads while other processes hold cores, back when they leave."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from moas.train.threads import ThreadGovernor, thread_governor


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def poll_at(g: ThreadGovernor, clock: Clock, now: float) -> int | None:
    clock.now = now
    return g.poll()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_wanted_threads_are_the_cores_others_leave_free():
    g = ThreadGovernor(2, cores=2)
    assert g.wanted(machine=2.0, mine=2.0) == 2  # idle but for this run
    assert g.wanted(machine=2.0, mine=1.3) == 1  # another process holds ~0.7 of a core
    assert g.wanted(machine=2.0, mine=1.0) == 1  # ... a whole core
    assert g.wanted(machine=1.3, mine=1.0) == 2  # a little background work is not a busy core
    assert g.wanted(machine=2.0, mine=0.0) == 1  # never fewer than one
    big = ThreadGovernor(10, cores=16)
    assert big.wanted(machine=16.0, mine=10.0) == 10  # capped at the configured maximum
    assert big.wanted(machine=16.0, mine=4.0) == 4  # 12 cores busy elsewhere


def test_a_change_needs_two_agreeing_readings_and_sets_torch_threads(monkeypatch, restore_threads):
    torch.set_num_threads(2)
    clock = Clock()
    g = ThreadGovernor(2, interval_s=10.0, clock=clock, cores=2)
    readings = iter([(2.0, 1.3), (2.0, 2.0), (2.0, 1.2), (2.0, 1.1), (2.0, 1.0), (1.0, 1.0), (1.0, 1.0)])
    monkeypatch.setattr(g, "read_usage", lambda: next(readings))
    assert g.poll() is None  # before the interval: no reading taken
    clock.now = 10.0
    assert g.poll() is None and torch.get_num_threads() == 2  # one busy reading: wait
    clock.now = 20.0
    assert g.poll() is None  # the next reading is idle again: nothing changes
    assert [poll_at(g, clock, 30.0), poll_at(g, clock, 40.0)] == [None, 1]
    assert torch.get_num_threads() == 1 and g.threads == 1
    clock.now = 50.0
    assert g.poll() is None  # still busy: stays at 1
    assert [poll_at(g, clock, 60.0), poll_at(g, clock, 70.0)] == [None, 2]
    assert torch.get_num_threads() == 2 and g.changes == 2


def test_only_a_multi_threaded_cpu_run_with_adaptation_on_gets_a_governor():
    assert thread_governor(True, torch.device("cpu"), 2) is not None
    assert thread_governor(False, torch.device("cpu"), 2) is None
    assert thread_governor(True, torch.device("cpu"), 1) is None
    assert thread_governor(True, torch.device("cuda"), 8) is None


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_a_cpu_run_is_built_with_a_governor_unless_switched_off(restore_threads):
    from moas.config import load_config
    from moas.train.builders import build_runtime

    on = build_runtime(load_config("cpu_tiny", use_env=False, overrides={"resources": {"cpu_threads": 2}}))
    assert on.governor is not None and on.governor.max_threads == 2
    off = {"resources": {"cpu_threads": 2, "adapt_threads": False}}
    assert build_runtime(load_config("cpu_tiny", use_env=False, overrides=off)).governor is None


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_readings_see_a_competing_process_that_is_not_a_child():
    g = ThreadGovernor(2)
    # The busy loop is orphaned (its shell exits), as an unrelated process would be: children of this
    # process count as its own use (DataLoader workers).
    pid = int(
        subprocess.check_output(
            ["sh", "-c", f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"], text=True
        )
    )
    try:
        time.sleep(0.3)
        g.read_usage()
        end = time.perf_counter() + 1.5
        while time.perf_counter() < end:  # this process works on one thread meanwhile
            sum(i * i for i in range(10_000))
        machine, mine = g.read_usage()
    finally:
        os.kill(pid, 9)
    assert 0.3 < mine < 1.4  # one thread of this process (less when the machine is busier still)
    assert machine - mine > 0.5  # the other process's core


def test_readings_are_differences_of_its_own_counters_and_keep_ended_children(monkeypatch):
    """Machine and process CPU-seconds over the wall time between two readings; a DataLoader worker that
    ended keeps counting as this run's. (Not psutil.cpu_percent, whose one process-wide baseline every
    caller resets: the resource manager reads it each step.)"""
    import psutil

    from moas.train import threads as th

    class Times(tuple):
        def __new__(cls, user, idle):
            t = super().__new__(cls, (user, 0.0, 0.0, idle))
            t.user, t.system, t.idle = user, 0.0, idle
            return t

    class Child:
        def __init__(self, pid: int, used: list[float]) -> None:
            self.pid, self.used = pid, used

        def cpu_times(self):
            return Times(self.used[0], 0.0)

    state = {"wall": 0.0, "busy": 0.0, "mine": 0.0, "children": []}
    monkeypatch.setattr(th.time, "monotonic", lambda: state["wall"])
    monkeypatch.setattr(psutil, "cpu_times", lambda: Times(state["busy"], 1000.0 - state["busy"]))
    g = ThreadGovernor(2, cores=2)
    monkeypatch.setattr(g._process, "cpu_times", lambda: Times(state["mine"], 0.0))
    monkeypatch.setattr(g._process, "children", lambda recursive: state["children"])
    worker = [5.0]  # CPU-seconds it had used before it was first seen
    state["children"] = [Child(7, worker)]
    g.read_usage()  # sees the worker: its 5 s so far are the baseline
    state.update(wall=10.0, busy=19.0, mine=10.0)
    worker[0] = 9.0
    assert g.read_usage() == pytest.approx((1.9, 1.4))  # 19 s busy / 10 s; 10 + 4 s of its own
    state.update(wall=20.0, busy=38.0, mine=20.0, children=[])  # the worker ended after 9 s
    assert g.read_usage() == pytest.approx((1.9, 1.0))  # its time stays counted, not subtracted
