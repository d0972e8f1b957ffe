"""Progress bars for long work (an analysis, the demo's training runs): tqdm on stderr with an ETA when
stderr is a terminal; nothing in logs, pipes or CI, and nothing with ``enabled=False`` (``--no-progress``)."""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm


def bar(total: int, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A bar of ``total`` units that clears its line when closed; a silent one unless ``enabled`` and stderr
    is a terminal (tqdm's ``disable=None``)."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=None if enabled else True)


def around_bars(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` that lifts the live bars off the terminal while it writes, then draws them again."""
    def write(msg: str) -> None:
        with tqdm.external_write_mode():
            log(msg)
    return write
