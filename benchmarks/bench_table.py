"""The demo report's queries on a study-sized tracking table: ``Table.where`` (indexed) against a plain scan.

Builds a table shaped like the 5-seed demo's per-step tracking (41 runs x 300 steps x 28 matrices x 7 metrics,
2.4M rows) and asks it what the report asks per run: one tracked metric over the attention matrices. Both answers
are compared row for row; the indexed time includes building the index (the first query of its columns).

    python benchmarks/bench_table.py               # 20 queries
    python benchmarks/bench_table.py --queries 40
"""

from __future__ import annotations

import argparse
import time

from geometry.table import Row, Table

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METRICS = ("track_fro_norm", "track_s1", "track_sim_final_u", "track_sim_final_v", "track_sim_prev_u",
           "track_sim_prev_v", "track_stable_rank")
ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]


def study_table(runs: int = 41, steps: int = 300, layers: int = 4) -> Table:
    return Table(Row(f"run{r}/s{r % 5}", step, f"model.layers.{layer}.{m}.weight", layer, m, metric, 0.5)
                 for r in range(runs) for step in range(1, steps + 1) for layer in range(layers)
                 for m in MODULES for metric in METRICS)


def scan(table: Table, **equal) -> list[Row]:
    """The plain reference: every row tested against every condition."""
    def keep(row: Row) -> bool:
        return all(getattr(row, c) in (v if isinstance(v, (list, tuple, set)) else (v,)) for c, v in equal.items())
    return [r for r in table.rows if keep(r)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=20)
    args = ap.parse_args()
    t0 = time.perf_counter()
    table = study_table()
    print(f"table: {len(table):,} rows, built in {time.perf_counter() - t0:.1f} s")
    queries = [dict(run=f"run{i % 41}/s{i % 41 % 5}", metric=METRICS[i % len(METRICS)], module=ATTENTION)
               for i in range(args.queries)]
    t0 = time.perf_counter()
    plain = [scan(table, **q) for q in queries]
    t_scan = time.perf_counter() - t0
    t0 = time.perf_counter()
    indexed = [table.where(**q).rows for q in queries]
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = [table.where(**q).rows for q in queries]
    t_warm = time.perf_counter() - t0
    assert indexed == plain == again, "the indexed answers differ from the scan's"
    print(f"{args.queries} queries of {len(plain[0]):,} rows each: plain scan {t_scan:.2f} s, indexed "
          f"{t_index:.2f} s with the index built ({t_scan / t_index:.0f}x), {t_warm:.3f} s once built "
          f"({t_scan / t_warm:.0f}x; {1e3 * t_warm / args.queries:.2f} ms a query against "
          f"{1e3 * t_scan / args.queries:.0f} ms)")


if __name__ == "__main__":
    main()
