"""The one error boundary: every problem a user can cause or fix is a ``SacpoError``.

Its message is a single line that names what is wrong and where (file, row, field,
tensor, stage). Each area has its own subclass beside its code (``ConfigError``,
``DataError``, ``CheckpointError`` ...); the command lines catch ``SacpoError`` once,
print the line and exit with ``exit_code``. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno


class SacpoError(Exception):
    """A problem the user can fix; ``str()`` is one line. Exit code 2 (bad input)."""

    exit_code = 2


class RunFailure(SacpoError):
    """A run that started correctly and cannot go on (e.g. a non-finite loss). Exit 1."""

    exit_code = 1


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def disk_error_line(error: BaseException) -> str | None:
    """One line for a full, read-only or forbidden disk anywhere in an exception's chain
    (Orbax and other libraries wrap the OSError), or None when there is none."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_ERRORS:
            where = seen.filename or "the run directory"
            return f"{where}: {seen.strerror} (the last complete checkpoint is kept)"
        seen = seen.__cause__ or seen.__context__
    return None
