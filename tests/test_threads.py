"""geometry.offline.threads: groups measured side by side give the table one thread gives, in the same order."""

import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from threadpoolctl import threadpool_info

from geometry.errors import GeometryError
from geometry.offline import threads
from geometry.offline.analyze import analyze
from geometry.offline.config import AnalysisConfig
from geometry.offline.engine import group_mb

SHAPES = {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (8, 32), "mlp.up_proj": (48, 32),
          "mlp.down_proj": (32, 48)}


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A base and two checkpoints of a 3-layer model with four shapes."""
    d = tmp_path_factory.mktemp("series")
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.{m}.weight": torch.randn(*s, generator=g) / 6 for i in range(3)
            for m, s in SHAPES.items()}
    drift = {n: torch.randn(w.shape, generator=g) * 1e-2 for n, w in base.items()}
    save_file(base, str(d / "base.safetensors"))
    for step in (1, 2):
        noise = {n: torch.randn(w.shape, generator=g) * 1e-3 for n, w in base.items()}
        ckpt = {n: (w + step * drift[n] + noise[n]).contiguous() for n, w in base.items()}
        (d / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file(ckpt, str(d / "run" / f"checkpoint-{step}" / "model.safetensors"))
    return d


def _table(series, **cfg):
    a = analyze(series / "base.safetensors", [series / "run"], config=AnalysisConfig(device="cpu", **cfg))
    return [(r.run, r.step, r.matrix, r.metric) for r in a], np.array([r.value for r in a])


def test_threads_give_one_threads_table(series):
    keys1, one = _table(series, threads=1)
    keys3, three = _table(series, threads=3)
    assert keys1 == keys3 and np.array_equal(three, one, equal_nan=True)  # the same rows, order and bits


def test_quick_suite_on_threads(series):
    keys1, one = _table(series, threads=1, quick=True)
    keys2, two = _table(series, threads=2, quick=True)
    assert keys1 == keys2 and np.array_equal(two, one, equal_nan=True)


def test_ordered_map_keeps_order_and_uses_the_threads():
    names = set()

    def f(x):
        names.add(threading.current_thread().name)
        time.sleep(0.01 * (x % 3))  # uneven items finish out of order
        return x * x

    assert threads.ordered_map(f, list(range(12)), 3, order=list(reversed(range(12)))) == [x * x for x in range(12)]
    assert len(names) > 1 and all(n.startswith(threads.NAME) for n in names)
    assert threads.ordered_map(f, [2, 3], 1) == [4, 9]  # one thread: a plain loop, here


def test_ordered_map_raises_the_earliest_failure_and_starts_nothing_after_it():
    started = []

    def f(x):
        started.append(x)
        if x in (1, 2):
            time.sleep(0.05 if x == 1 else 0.0)
            raise GeometryError(f"item {x}")
        return x

    with pytest.raises(GeometryError, match="item 1"):  # item 2 failed first, but a loop would have met 1 first
        threads.ordered_map(f, list(range(40)), 2)
    assert len(started) < 10  # the queue stopped at the first failure


def test_phases_hold_the_budget_and_give_the_idle_threads_to_the_kernels():
    costs = {0: 900.0, 1: 900.0, 2: 300.0, 3: 300.0, 4: 300.0, 5: 100.0}
    order = [0, 2, 1, 3, 5, 4]
    # two of the largest do not fit: one at a time, with both threads in its kernels; three of the middle do,
    # but only two threads are asked
    every = set(costs)
    assert threads.phases(2, costs, 1000, order, every) == [([0, 1], 1, 2), ([2, 3, 5, 4], 2, 1)]
    assert threads.phases(4, costs, 1000, order, every) == [([0, 1], 1, 4), ([2, 3, 4], 3, 1), ([5], 1, 1)]
    assert threads.phases(4, costs, 10_000, order, every) == [(order, 4, 1)]  # all fit: one thread a group
    assert threads.phases(1, costs, 10, order, every) == [(order, 1, 1)]  # at least one, whatever the budget
    # a group that could run beside others keeps one-threaded kernels even when it runs alone
    assert threads.phases(0, {0: 1.0}, 1e6, [0], every) == [([0], 1, 1)]
    # a group whose kernels do not gain from threads runs alone on one; the others of its size take the rest
    assert threads.phases(2, costs, 1000, order, {1, 2, 3, 4, 5}) == [([1], 1, 2), ([0], 1, 1),
                                                                       ([2, 3, 5, 4], 2, 1)]


def test_groups_measured_alone_with_threaded_kernels_agree_with_one_thread(tmp_path, monkeypatch):
    """A budget that holds one group at a time: two threads go to its kernels (BLAS, LAPACK, torch), whose
    sums are split differently; the table agrees with the one-thread one to rounding. (Threaded kernels are
    for large matrices: the rule is lowered here to keep the test small.)"""
    monkeypatch.setattr(threads, "THREADED_SIDE", 384)
    g = torch.Generator().manual_seed(1)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(768, 384, generator=g) / 20 for i in range(2)}
    save_file(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "run" / "checkpoint-1").mkdir(parents=True)
    save_file({n: w + torch.randn(w.shape, generator=g) * 1e-3 for n, w in base.items()},
              str(tmp_path / "run" / "checkpoint-1" / "model.safetensors"))
    one_keys, one = _table(tmp_path, threads=1)
    budget = group_mb((768, 384), k=48) * 1.5  # one group at a time
    assert threads.phases(2, {0: group_mb((768, 384), k=48)}, budget, [0], {0}) == [([0], 1, 2)]
    two_keys, two = _table(tmp_path, threads=2, memory_mb=budget)
    assert one_keys == two_keys
    np.testing.assert_allclose(two, one, rtol=1e-9, atol=1e-12)


def test_kernels_take_the_threads_given_and_are_restored():
    before = torch.get_num_threads()
    for n in (1, 2):
        with threads.kernels(n):
            assert torch.get_num_threads() == n
            assert all(lib["num_threads"] == n for lib in threadpool_info() if lib["user_api"] == "blas")
    assert torch.get_num_threads() == before


def test_a_negative_thread_count_is_refused():
    with pytest.raises(GeometryError, match="threads"):
        AnalysisConfig(threads=-1)
