"""What ``geometry demo`` runs: one dataclass, whose fields are also the command's options (geometry.cli).

Kept apart from the study (geometry.lab.study) so that building the command line imports no trainer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from geometry.errors import GeometryError
from geometry.options import option

DATA_ENV = "GEOMETRY_DATA"  # the environment variable naming the directory with student/ and teacher/


@dataclass
class StudyConfig:
    seeds: int = option(5, "training seeds per run of a verdict (paired t-tests over seeds need at least 2; 5 "
                        "by default)")
    steps: int | None = option(None, "optimizer steps of every run (default: RegimeConfig's 300, --quick 10)")
    quick: bool = option(False, "a smoke-test size: 10 steps, 2 seeds, small batches, no variants (under two "
                         "minutes)")
    jobs: int = option(min(2, os.cpu_count() or 1), "runs trained at once, one process and one thread each "
                       "(default: 2, or 1 on a one-core machine); results do not depend on it")
    reference: bool = option(False, "the reference study at the paper's proportions (docs/study/): SFT from a "
                             "less-trained base for 5375 steps, then OPD (299) and RLVR (1023) from each seed's SFT "
                             "checkpoint, 10 snapshots a run; about an hour on 2 cores")
    no_variants: bool = option(False, "skip the labelled variants (TRL full-vocabulary KL distillation, seed 0; OPD "
                               "at SFT's learning rate, every seed)")
    data: str | None = option(None, f"directory with student/ and teacher/ (default: ${DATA_ENV}, else the "
                              "repository's data/, else an installed wheel's share/geometry/data)")

    def __post_init__(self):
        if self.seeds < 1 or self.jobs < 1 or (self.steps is not None and self.steps < 1):
            raise GeometryError(f"demo: --seeds, --jobs and --steps must be >= 1, got {self.seeds}, {self.jobs}, "
                                f"{self.steps}")

        if self.reference and self.steps is not None:
            raise GeometryError("demo: --reference runs the paper's step counts; --steps does not apply to it")

    @property
    def n_seeds(self) -> int:
        """Seeds actually trained: --quick caps them at 2 (enough for an interval, not for a result)."""
        return min(self.seeds, 2) if self.quick else self.seeds
