"""Progress bars: drawn with an ETA on a terminal, nothing in a pipe or log, nothing with --no-progress."""

import io
import sys

import torch
from safetensors.torch import save_file

from geometry.cli import main
from geometry.progress import around_bars, bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _bar_text(monkeypatch, stream, enabled=True) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    b = bar(4, "work", "item", enabled)
    b.update(1)
    b.refresh()
    b.close()
    return stream.getvalue()


def test_a_terminal_sees_a_bar_with_an_eta(monkeypatch):
    text = _bar_text(monkeypatch, Terminal())
    assert "work:" in text and "1/4 [" in text and "<" in text  # [elapsed<remaining, rate]


def test_a_pipe_or_no_progress_sees_nothing(monkeypatch):
    assert _bar_text(monkeypatch, io.StringIO()) == ""
    assert _bar_text(monkeypatch, Terminal(), enabled=False) == ""


def test_a_log_line_lifts_the_bar_and_the_bar_comes_back_below_it(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    b = bar(2, "work", "item")
    around_bars(lambda msg: term.write(msg + "\n"))("a line")
    b.close()
    before, after = term.getvalue().split("a line\n")
    assert before.startswith("\rwork:") and before.endswith("\r") and before.strip() and "work:" in after


def test_analyze_draws_its_bar_on_a_terminal_only(tmp_path, monkeypatch, one_thread):
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(12, 8, generator=g) for i in range(2)}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    for step in (1, 2):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        save_file({n: w + 0.01 * step for n, w in base.items()},
                  str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
    seen = {}
    for name, stream, extra in (("terminal", Terminal(), []), ("pipe", io.StringIO(), []),
                                ("silenced", Terminal(), ["--no-progress"])):
        monkeypatch.setattr(sys, "stderr", stream)
        assert main(["analyze", str(tmp_path / "base"), str(tmp_path / "run"), "-o", str(tmp_path / name),
                     "--no-figures", "--quick", *extra]) == 0
        seen[name] = stream.getvalue()
    assert "analyze run:" in seen["terminal"] and "ckpt-group" in seen["terminal"]
    assert "analyze run" not in seen["pipe"] and "analyze run" not in seen["silenced"]
