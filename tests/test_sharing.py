"""The demo's question on runs against each other: do seeds of one regime share more changed entries?"""

import math

from geometry.lab.sharing import sharing, sharing_lines
from geometry.offline.pairs import Pairs, PairSummary


def _pair(a: str, b: str, ratio: float, jaccard: float) -> PairSummary:
    return PairSummary(a, b, [10], (10, 10), {"pair_mask_overlap_ratio": [ratio], "pair_mask_jaccard": [jaccard]})


def test_seeds_against_regimes_with_different_seeds_only():
    runs = ["sft/s0", "sft/s1", "rlvr/s0", "rlvr/s1", "opd_fullkl/s0"]
    values = {("sft/s0", "sft/s1"): 3.0, ("rlvr/s0", "rlvr/s1"): 1.5, ("sft/s0", "rlvr/s1"): 2.0,
              ("sft/s1", "rlvr/s0"): 1.0, ("sft/s0", "rlvr/s0"): 9.0}  # one seed: left out
    pairs = Pairs([], [_pair(a, b, values.get((a, b), math.nan), 0.1) for i, a in enumerate(runs)
                       for b in runs[i + 1:]])
    got = sharing(pairs, ["sft", "rlvr"])
    assert [(s.a, s.b, s.pairs, s.ratio) for s in got] == [("sft", "sft", 1, 3.0), ("rlvr", "rlvr", 1, 1.5),
                                                          ("sft", "rlvr", 2, 1.5)]
    lines = "\n".join(sharing_lines(pairs, ["sft", "rlvr"]))
    assert "- **sft**: yes" in lines and "- **rlvr**: no" in lines  # 1.5 is not above 1.5
    assert sharing_lines(Pairs(), ["sft"]) == []
