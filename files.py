"""
The bottom of the import graph, imported by every layer above: DataError, the one error that every
script reports as a single line (a file, line and field, or a flag) with exit status 2, and file
writing that a kill or a full disk never leaves half done. It imports nothing of the project.
"""
import os


class DataError(ValueError):
    """A bad input record; the message names the file, line and field."""


def make_out_dir(path: str) -> None:
    """Create --out_dir (and its parents): one line when it cannot be written, before a script
    loads anything, rather than an OSError once the work is done."""
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:  # a read-only or full disk, a file in the way
        raise DataError(f"--out_dir {path}: cannot write there ({e.strerror})") from None


def write_atomic(path: str, data: bytes | str) -> None:
    """Write to a temporary file then rename, so a crash never leaves a half-written file."""
    def write(tmp):
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
    replace_atomically(path, write)


def replace_atomically(path: str, write) -> None:
    """write(tmp) to a temporary file beside `path` (named by process, so two writers never share
    one), flushed to disk, then renamed over `path`: a kill leaves the old file or the new one,
    never half of one; a failed write (a full disk) removes its temporary file and raises."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
