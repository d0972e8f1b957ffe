"""The one exception users see: a clear, one-line message about bad input."""


class GeometryError(Exception):
    """Bad input or an unrecoverable condition, explained in one line.

    The CLI prints ``geometry: error: <message>`` and exits with status 2, no traceback.
    """
