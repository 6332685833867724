"""Where compiled kernels are cached: a writable folder on any machine, never the user's choice overridden.

The story: ``NUMBA_CACHE_DIR`` wins when set; otherwise ``$XDG_CACHE_HOME/batchnorm/numba``; if
that cannot be created, a folder in the temp dir. In a fresh process the choice reaches numba
whether numba was imported before the kernels or not, and a compiled kernel lands there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from batchnorm.kernels import _numba_setup


def test_user_setting_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert _numba_setup.cache_dir() == str(tmp_path / "mine")


def test_default_is_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = _numba_setup.cache_dir()
    assert d == str(tmp_path / "batchnorm" / "numba") and os.path.isdir(d)


def test_unwritable_home_falls_back_to_the_temp_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    d = _numba_setup.cache_dir()
    assert d is not None and d.startswith(tempfile.gettempdir()) and os.access(d, os.W_OK)


def _run(code: str, env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_fresh_process_caches_kernels_in_the_chosen_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    want = str(tmp_path / "xdg" / "batchnorm" / "numba")
    # numba imported first, then the kernels: the choice must still reach numba.config
    code = ("import numba, os, torch; from batchnorm.kernels import cpu;"
            "x = torch.randn(3, 2, dtype=torch.float64);"
            "cpu.eval_forward(x, None, None, None, None, 1e-5, 1, 'relu', 0.0);"
            "print(os.environ['NUMBA_CACHE_DIR'], numba.config.CACHE_DIR)")
    assert _run(code, env) == [want, want]
    cached = [f for _, _, files in os.walk(want) for f in files]
    assert any(f.endswith(".nbi") for f in cached), f"no numba cache index written under {want}: {cached}"


def test_fresh_process_keeps_the_users_numba_cache_dir(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "user"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    code = ("import os; from batchnorm.kernels import cpu; import numba;"
            "print(os.environ['NUMBA_CACHE_DIR'], numba.config.CACHE_DIR)")
    assert _run(code, env) == [str(tmp_path / "user")] * 2
    assert not (tmp_path / "xdg" / "batchnorm").exists()
