"""trilut's per-user cache: Verilator builds, yosys results, the toolchain wrapper."""

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["cache_root", "file_lock"]


def cache_root() -> Path:
    """``$TRILUT_CACHE``, else ``$XDG_CACHE_HOME/trilut``, else ``~/.cache/trilut``."""
    if root := os.environ.get("TRILUT_CACHE"):
        return Path(root).expanduser().resolve()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser().resolve() / "trilut"
    return Path.home() / ".cache" / "trilut"


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive ``flock`` on ``path`` (created if missing): concurrent pytest-xdist
    workers and terminals wait for one another instead of building the same thing twice."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
