"""The one exception users see: a clear, one-line message about bad input."""


class GeometryError(Exception):
    """Bad input or an unrecoverable condition, explained in one line.

    The CLI prints ``geometry: error: <message>`` and exits with status 2, no traceback.
    """


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters (its type's name when it has none):
    what a GeometryError quotes of a library's error."""
    return (" ".join(str(err).split()) or type(err).__name__)[:limit]
