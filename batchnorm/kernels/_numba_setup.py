"""Where numba keeps its compiled-kernel cache — set up before numba loads.

numba's ``cache=True`` writes machine code next to the source file (``__pycache__``) when that
folder is writable, which it often is not for an installed package (site-packages owned by root,
a read-only container image). A kernel that cannot be cached is recompiled in every new process
(seconds per kernel). :func:`configure` therefore picks one writable folder, in this order:

1. ``NUMBA_CACHE_DIR`` if the user (or CI) set it — never overridden;
2. ``$XDG_CACHE_HOME/batchnorm/numba`` (default ``~/.cache/batchnorm/numba``);
3. ``<tempdir>/batchnorm-numba-<uid>`` (e.g. a home directory that is read-only or missing).

The choice goes into ``os.environ["NUMBA_CACHE_DIR"]`` before numba is imported (numba reads it
at import); if numba is already loaded, into ``numba.config.CACHE_DIR`` as well. Every numba module
of this package calls :func:`configure` before ``import numba``::

    from ._numba_setup import configure
    configure()
    import numba
"""

from __future__ import annotations

import os
import sys
import tempfile

__all__ = ["cache_dir", "configure"]

_configured: str | None = None


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def cache_dir() -> str | None:
    """The folder numba caches compiled kernels in (see the module docstring), or None if none is writable."""
    user = os.environ.get("NUMBA_CACHE_DIR")
    if user:
        return user
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    for cand in (os.path.join(base, "batchnorm", "numba"),
                 os.path.join(tempfile.gettempdir(), f"batchnorm-numba-{uid}")):
        if _writable_dir(cand):
            return cand
    return None


def configure() -> str | None:
    """Point numba's cache at :func:`cache_dir` (idempotent); returns the folder in use."""
    global _configured
    if _configured is not None:
        return _configured
    d = cache_dir()
    if d is not None and not os.environ.get("NUMBA_CACHE_DIR"):
        os.environ["NUMBA_CACHE_DIR"] = d
        if "numba" in sys.modules:  # numba read its config already: tell it directly
            import numba

            numba.config.CACHE_DIR = d
    _configured = d or ""
    return d

