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


def test_count_holds_the_budget():
    assert threads.count(4, [100.0] * 10, budget_mb=1000) == 4
    assert threads.count(4, [100.0] * 10, budget_mb=250) == 2  # two of the largest group fit
    assert threads.count(4, [100.0] * 3, budget_mb=1000) == 3  # no more threads than groups
    assert threads.count(4, [5000.0], budget_mb=1000) == 1  # at least one, whatever the budget
    assert threads.count(0, [1.0] * 64, budget_mb=1e6) == threads.cores()


def test_kernels_are_single_threaded_and_restored():
    before = torch.get_num_threads()
    with threads.kernels():
        assert torch.get_num_threads() == 1
        assert all(lib["num_threads"] == 1 for lib in threadpool_info() if lib["user_api"] == "blas")
    assert torch.get_num_threads() == before


def test_a_negative_thread_count_is_refused():
    with pytest.raises(GeometryError, match="threads"):
        AnalysisConfig(threads=-1)
