"""The README and docs/metrics.md against the code: every option they name exists, every metric is defined."""

import re
from pathlib import Path

import pytest
import torch

from geometry.capture.trajectory import TRACK_METRICS
from geometry.cli import build_parser, config_from_args
from geometry.offline.config import AnalysisConfig
from geometry.offline.engine import decompose_base, measure_step

ROOT = Path(__file__).resolve().parents[1]


def _analyze_help(capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--help"])
    return capsys.readouterr().out


def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_every_analyze_option_in_the_readme_exists(capsys):
    readme = _section((ROOT / "README.md").read_text(), "## Analyze checkpoints")
    named = set(re.findall(r"`(--[a-z][a-z-]*)", readme))
    assert named, "the README's analyze section names no option"
    help_text = _analyze_help(capsys)
    missing = sorted(o for o in named if not re.search(rf"(^|[\s,\[]){re.escape(o)}\b", help_text))
    assert not missing, f"README names options that `geometry analyze --help` lacks: {missing}"


def test_cli_defaults_are_the_config_defaults():
    args = build_parser().parse_args(["analyze", "base", "ckpt"])
    assert config_from_args(AnalysisConfig, args) == AnalysisConfig()
    args = build_parser().parse_args(["analyze", "b", "c", "--principal-k", "7", "--lock-k", "5", "--include", "a",
                                      "--include", "b",
                                      "--skip-mismatch"])
    cfg = config_from_args(AnalysisConfig, args)
    assert (cfg.principal_k, cfg.lock_k, cfg.include, cfg.on_mismatch) == (7, 5, ("a", "b"), "skip")


def test_every_emitted_metric_is_defined_in_docs():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    defined = set(re.findall(r"`([a-z0-9_.-]+)`", doc))  # names hold tolerances and shares: sparsity_abs_1e-8
    cfg = AnalysisConfig(principal_k=2, lock_k=2, device="cpu")
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(1, 12, 10, generator=gen)
    res = measure_step(decompose_base(W0, cfg), W0 + 0.1 * torch.randn(1, 12, 10, generator=gen), W0, cfg)
    emitted = set(res.values) | {"sim_final_u", "sim_final_v", "sim_prev_u", "sim_prev_v", "locking_onset_step",
                                 "locking_onset_frac"}
    emitted |= set(TRACK_METRICS)
    assert not sorted(emitted - defined), f"metrics emitted but not defined in docs/metrics.md: {emitted - defined}"


def test_every_test_docs_design_names_exists():
    """docs/design.md names the test that holds each decision: `file.py::test_name`, or a bare `test_name` in a
    cell or sentence that has named its file before."""
    tests = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    missing = []
    for line in (ROOT / "docs" / "design.md").read_text().splitlines():
        current = None
        for file, name in re.findall(r"`(?:(test_\w+\.py)(?:::)?)?(test_\w+)?`", line):
            current = file or current
            if not name:
                continue
            where = [current] if current else list(tests)
            if not any(re.search(rf"^def {name}\(", tests.get(f, ""), re.M) for f in where):
                missing.append(f"{current or 'tests/'}::{name}")
    assert not missing, f"docs/design.md names tests that do not exist: {missing}"


def test_the_committed_reference_study_is_linked_and_whole():
    """README links docs/study/report.md; every figure and file the report links is committed beside it, and it is
    the reference study's report with a verdict per claim."""
    assert "(docs/study/report.md)" in (ROOT / "README.md").read_text()
    study = ROOT / "docs" / "study"
    text = (study / "report.md").read_text()
    assert text.startswith("# geometry reference study")
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (study / link).is_file(), f"docs/study/report.md links {link}, not committed"
    assert len(re.findall(r"^- \*\*(?:reproduced|contradicted|partly|inconclusive)\*\* \(claim \d+\)", text,
                          flags=re.M)) == 9
