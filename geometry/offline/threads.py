"""Groups of matrices measured side by side on the CPU's cores, the results in group order.

LAPACK runs one matrix at a time on the CPU, and a multithreaded BLAS spends a small matrix's work waiting
between calls. So each group is measured by one thread with single-threaded kernels, and the cores take
groups in turn: the heavy kernels release the GIL (geometry.lapack; numpy's and torch's products). Groups too
large for the memory budget to hold one per core are measured fewer at a time, and the cores left over go to
their kernels (``phases``) where a multithreaded BLAS pays: on matrices whose smaller side is at least
``THREADED_SIDE`` (below it the BLAS threads spin between small calls; benchmarks/bench_analyze.py measures
both settings, benchmarks/README.md gives the figures).
A group measured with single-threaded kernels gives the same bits whatever the number of threads, whichever
measured it and whenever (tested); one measured with threaded kernels agrees with it to rounding.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

NAME = "geometry-measure"  # the measuring threads' name prefix
THREADED_SIDE = 2048  # the smaller side from which a matrix's kernels gain from more threads (above)

T = TypeVar("T")
R = TypeVar("R")


def cores() -> int:
    """The cores this process may run on (its affinity, e.g. a container's cpuset), shared among the ranks
    torchrun started on this node."""
    try:
        mine = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        mine = os.cpu_count() or 1
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, mine // ranks)


def phases(asked: int, costs_mb: Mapping[int, float], budget_mb: float, order: Sequence[int],
           threaded: Container[int]) -> list[tuple[list[int], int, int]]:
    """The groups of ``order`` (their memory in ``costs_mb``) in phases of (groups in that order, measuring
    threads, kernel threads). ``asked`` threads in all (0: one per core); a group runs beside as many others
    as the memory budget holds of its kind, at least alone, and the threads that leaves idle go to its
    kernels if it is among the ``threaded`` (else they stay idle). The largest groups come first; a group's
    kernel threads depend on its own cost and kind alone, not on the groups around it."""
    total = asked or cores()
    fit = {i: max(1, min(total, int(budget_mb // max(costs_mb[i], 1e-9)))) for i in order}
    kernel = {i: total // fit[i] if i in threaded else 1 for i in order}
    out = []
    for n, t in sorted({(fit[i], kernel[i]) for i in order}, key=lambda nt: (nt[0], -nt[1])):
        items = [i for i in order if (fit[i], kernel[i]) == (n, t)]
        out.append((items, min(n, len(items)), t))
    return out


@contextmanager
def kernels(n: int = 1) -> Iterator[None]:
    """BLAS, OpenMP and torch kernels on ``n`` threads (restored on leaving); one where the measuring threads
    are the parallelism. Also with one measuring thread: a BLAS thread per core spins between a small matrix's
    calls (benchmarks/bench_analyze.py measures both)."""
    import torch  # here: the CLI imports this module before it knows it will measure anything
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def ordered_map(fn: Callable[[T], R], items: Sequence[T], threads: int, order: Sequence[int] | None = None
                ) -> list[R]:
    """[fn(x) for x in items] on ``threads`` threads, started in ``order`` (indices; e.g. costliest first).

    The first failure stops new items from starting and is raised once the running ones end (of the items
    that ran, the earliest one's, as a loop would meet it). The threads are daemons: an interrupt of the
    caller (Ctrl-C while it waits) stops new items and is raised at once, not held up by a matrix still
    being measured (``leave_if_busy``)."""
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    results: list = [None] * len(items)
    queue = iter(order if order is not None else range(len(items)))
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = None if errors else next(queue, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # handed to the caller's thread below
                with lock:
                    errors.append((i, e))

    pool = [threading.Thread(target=work, daemon=True, name=f"{NAME}-{j}") for j in range(threads)]
    for t in pool:
        t.start()
    try:
        for t in pool:
            t.join()
    except BaseException as e:  # an interrupt while waiting: no new item starts
        with lock:
            errors.append((-1, e))
        raise
    if errors:
        raise min(errors, key=lambda e: e[0])[1]
    return results


def leave_if_busy(code: int) -> None:
    """End the process now with ``code`` when measuring threads are still in a kernel (after an interrupt).

    Python's exit would stop them mid-call, and a thread stopped inside torch's C++ aborts the process
    ("terminate called without an active exception", exit -6) instead of exiting with ``code``. Called by
    the CLI once its message is out and its staged files are gone: nothing is left to clean up."""
    if any(t.name.startswith(NAME) and t.is_alive() for t in threading.enumerate()):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
