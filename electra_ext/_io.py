"""Writing files so that a crash never leaves a half-written one in place of what the user had."""
import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_output(path: str, mode: str = "wb"):
    """Yields a file object for a temporary file beside `path`; on success, fsyncs it, renames it over
    `path` (atomic on POSIX) and fsyncs the directory, so that the rename survives a power loss too (callers
    delete older files after it). On error the temporary file is removed and `path` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        directory_descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_descriptor)
        finally:
            os.close(directory_descriptor)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
