"""The engine on a plain Python job: every item once, dynamic hand-out, a killed worker's items retried.

One pool serves the tests (actors take seconds to start on two cores); each
item's payload says what the worker does with it (sleep, die, raise).
"""

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray.cloudpickle

from workbench.distributed.pool import WorkerPool
from workbench.errors import DistributedError, InputError

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test module


@dataclass
class Square:
    """Squares ``payload["x"]``; sleeps ``payload["sleep"]``; ``die`` (a marker path): SIGKILL itself the first
    time (marker absent), ``poison``: every time; ``fail``: raise an InputError."""

    def setup(self):
        return os.getpid()

    def run(self, pid, items):
        out = []
        for key, payload in items:
            marker = payload.get("die")
            if payload.get("poison") or (marker and not Path(marker).exists()):
                if marker:
                    Path(marker).write_text(str(pid))
                os.kill(pid, signal.SIGKILL)
            if payload.get("fail"):
                raise InputError(f"bad item {key}")
            time.sleep(payload.get("sleep", 0.0))
            out.append((key, {"square": payload["x"] ** 2, "pid": pid}))
        return out


@dataclass
class Broken(Square):
    def setup(self):
        raise InputError("cannot load")


def items(n, **special):
    """``special``: key -> extra payload fields."""
    return [(f"k{i}", {"x": i, **special.get(f"k{i}", {})}) for i in range(n)]


# first: the module's pool below holds both CPUs of the cluster once it starts
def test_a_setup_error_is_raised_as_itself(ray_cluster):
    with pytest.raises(InputError, match="cannot load"):
        WorkerPool(Broken(), workers=1)


def test_more_workers_than_the_cluster_holds_is_refused(ray_cluster):
    with pytest.raises(DistributedError, match="3 workers"):
        WorkerPool(Square(), workers=3)


@pytest.fixture(scope="module")
def pool(ray_cluster):
    with WorkerPool(Square(), workers=2, max_replacements=4) as pool:
        yield pool


def run(pool, todo, chunk_size=1):
    got = []
    stats = pool.run(todo, lambda k, r: got.append((k, r)), chunk_size=chunk_size, progress=False)
    return got, stats


def test_every_item_once_and_a_slow_item_does_not_hold_back_a_fixed_half(pool):
    todo = items(12, k0={"sleep": 1.5})
    got, stats = run(pool, todo)
    assert sorted(k for k, _ in got) == sorted(k for k, _ in todo)
    assert all(r["square"] == int(k[1:]) ** 2 for k, r in got)
    assert stats.written == 12 and stats.retried == 0
    assert sorted(stats.per_worker.values())[0] <= 3  # a fixed split would give each worker 6


def test_a_worker_killed_mid_run_has_its_items_retried_and_each_is_written_once(pool, tmp_path):
    before = pool.pids()
    todo = items(10, k3={"die": str(tmp_path / "died")})
    got, stats = run(pool, todo, chunk_size=2)
    dead = int((tmp_path / "died").read_text())
    assert dead in before.values() and dead not in pool.pids().values()
    assert sorted(k for k, _ in got) == sorted(k for k, _ in todo)  # every record exactly once
    assert stats.workers_lost == 1 and stats.retried >= 1
    assert dict(got)["k3"]["pid"] != dead
    assert len(pool.workers) == 2  # a replacement took the dead worker's place


def test_an_error_of_the_work_is_raised_as_itself_not_retried(pool):
    with pytest.raises(InputError, match="bad item k2"):
        run(pool, items(4, k2={"fail": True}))


def test_an_item_that_kills_every_worker_stops_the_run_naming_it(pool):
    pool.max_attempts = 2
    with pytest.raises(DistributedError, match="k1"):
        run(pool, items(3, k1={"poison": True}))

