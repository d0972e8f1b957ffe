"""Config fields that are also command-line options: one place for a setting's default and its help.

A config dataclass (AnalysisConfig, StudyConfig) declares each field with ``option(...)``; geometry.cli
builds ``--field-name`` from it (EleutherAI sparsify's RunConfig habit), so no default is restated.
"""

from __future__ import annotations

from dataclasses import field, fields


def option(default, help: str, *, choices: tuple[str, ...] | None = None, aliases: tuple[str, ...] = ()):
    """A dataclass field whose metadata the CLI turns into an option (help text, choices, old flag names)."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


def check_choices(config) -> None:
    """Refuse a field of a config dataclass set to a value outside its ``choices`` (the one list of them)."""
    from geometry.errors import GeometryError

    for f in fields(config):
        allowed = f.metadata.get("choices")
        if allowed and getattr(config, f.name) not in allowed:
            raise GeometryError(f"{f.name} must be {' or '.join(repr(c) for c in allowed)}, "
                                f"got {getattr(config, f.name)!r}")
