"""Errors a user can act on, in shapes the CLI prints as one line (no heavy imports here).

``RunStopped``: a run stopped for a reason of its own (e.g. every client of a round was
rejected). ``DeployError``: a deployment's input (a key or certificate file, a server name,
an address) is wrong. Failed reads and writes become one OSError shape, whichever library
raised them:
safetensors reports a failed write as ``SafetensorError`` with the OS error only in its text;
turning it (and any OSError) into ``OSError(errno, reason, path)`` lets the engine say what a
failed write means for the run and the CLI print it as one line.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class RunStopped(ValueError):
    """A run cannot go on; the message says why and what to change."""


class DeployError(ValueError):
    """A key, certificate, name or address given for a deployment is wrong; the message
    names the file or value."""


# errno values that only a write can meet: no room left, a read-only file system
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
SAFETENSORS_IO = re.compile(r'I/O error: .*\(os error (\d+)\)(?: at path "(.*)")?')


def as_os_error(err: BaseException) -> OSError | None:
    """`err` itself if it is an OSError, the OSError inside a safetensors write error, else
    None."""
    if isinstance(err, OSError):
        return err
    found = SAFETENSORS_IO.search(str(err)) if type(err).__name__ == "SafetensorError" else None
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), found.group(2))


def write_error(path: object, err: BaseException, consequence: str) -> OSError:
    """An OSError naming `path` for a failed write, its reason and what it means for the run
    ("No space left on device; the rounds before it are saved ...")."""
    os_error = as_os_error(err)
    reason = os_error.strerror if os_error is not None and os_error.strerror else str(err)
    code = os_error.errno if os_error is not None else None
    return OSError(code, f"{reason}; {consequence}", str(path))


def describe(err: OSError) -> str:
    """One line: 'cannot write runs/x/round_0003: No space left on device; ...' for a failed
    write, '<file>: <reason>' for other OS errors that name a file, else the message."""
    if err.filename is None or err.strerror is None:
        return str(err)
    prefix = "cannot write " if err.errno in WRITE_ERRNOS else ""
    return f"{prefix}{err.filename}: {err.strerror}"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: a crash leaves the old file or the new one."""
    temporary = path.with_name(f".tmp-{path.name}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise write_error(path, err, "the file is as it was before") from err
