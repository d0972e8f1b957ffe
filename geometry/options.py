"""Config fields that are also command-line options: one place for a setting's default and its help.

A config dataclass (AnalysisConfig, StudyConfig) declares each field with ``option(...)``; geometry.cli
builds ``--field-name`` from it (EleutherAI sparsify's RunConfig habit), so no default is restated.
"""

from __future__ import annotations

from dataclasses import field


def option(default, help: str, *, choices: tuple[str, ...] | None = None, aliases: tuple[str, ...] = ()):
    """A dataclass field whose metadata the CLI turns into an option (help text, choices, old flag names)."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})
