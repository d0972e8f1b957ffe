"""The tables of a markdown text as markdown-it-py, the renderer of report.html, reads them."""

from markdown_it import MarkdownIt
from markdown_it.rules_block.table import escapedSplit  # the parser's own split of a row into cells


def tables(md: str) -> list[list[list[str]]]:
    """Each table the parser finds: its rows (header first, no delimiter row), each row its cells as split."""
    lines, found = md.splitlines(), []
    for token in MarkdownIt("commonmark").enable("table").parse(md):
        if token.type == "table_open":
            start, end = token.map
            found.append([_cells(lines[i]) for i in range(start, end) if i != start + 1])
    return found


def _cells(line: str) -> list[str]:
    cells = [c.strip() for c in escapedSplit(line.strip())]  # an escaped '\|' comes back as '|'
    return cells[1:-1] if len(cells) > 1 and cells[0] == "" and cells[-1] == "" else cells


def assert_tables_keep_columns(md: str) -> int:
    """Every block of '|' lines is a table, and each of its rows has as many cells as its header (the parser
    pads or cuts a row that does not, silently). Returns the number of tables."""
    blocks = sum(1 for i, line in enumerate(md.splitlines())
                 if line.startswith("|") and (i == 0 or not md.splitlines()[i - 1].startswith("|")))
    found = tables(md)
    assert len(found) == blocks, f"{blocks - len(found)} of {blocks} '|' blocks are not tables"
    for rows in found:
        bad = [row for row in rows[1:] if len(row) != len(rows[0])]
        assert not bad, f"rows of another width than the header {rows[0]}: {bad}"
    return len(found)
