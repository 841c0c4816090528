"""Loading a fast BLAS for MLX on Linux (mlx_mtp.blas): it takes effect
without LD_PRELOAD where one is installed, and a missing one is quiet."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_mtp import blas

ROOT = Path(__file__).resolve().parent.parent
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

PROBE = """
import json, sys
import mlx_mtp
import mlx.core as mx
from mlx_mtp import blas
a = mx.ones((64, 64))
mx.eval(a @ a)
info = blas.blas_info()
maps = open("/proc/self/maps").read()
print(json.dumps({"name": info.name, "fast": info.fast, "path": info.path, "how": info.how,
                  "advice": info.advice, "in_maps": info.path is not None and info.path in maps,
                  "loaded": blas.preload().loaded, "errors": blas.preload().errors}))
"""


def run_probe(code: str = PROBE, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.ENV_VAR)}
    clean.update(PYTHONPATH=str(ROOT), **env)
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@linux
def test_installed_openblas_takes_effect_without_ld_preload():
    found = blas.candidates()
    if not found:
        pytest.skip("no fast BLAS installed here")
    result, stderr = run_probe()
    assert result["loaded"] == found[0]
    assert result["fast"] and result["how"] == "loaded by mlx_mtp"
    # the library MLX's cblas_sgemm resolves to is the one loaded, and it is mapped
    assert result["path"] == os.path.realpath(found[0])
    assert result["in_maps"]
    assert stderr == ""


@linux
def test_missing_library_is_quiet():
    result, stderr = run_probe(MLX_MTP_BLAS="/nonexistent/libopenblas.so.0")
    assert result["loaded"] is None and not result["fast"]
    assert result["name"] == "reference BLAS (bundled)"
    assert len(result["errors"]) == 1 and result["errors"][0].startswith("/nonexistent/libopenblas.so.0")
    assert "could not load" in result["advice"] and "apt install libopenblas0-pthread" in result["advice"]
    assert stderr == ""


@linux
def test_off_loads_nothing():
    result, _ = run_probe(MLX_MTP_BLAS="off")
    assert result["loaded"] is None and not result["fast"]
    assert "MLX_MTP_BLAS=off" in result["advice"]


@linux
def test_mlx_imported_first_warns_once_and_loads_nothing():
    if not blas.candidates():
        pytest.skip("no fast BLAS installed here: nothing to warn about")
    code = "import warnings; warnings.simplefilter('default')\nimport mlx.core\n" + PROBE
    result, stderr = run_probe(code)
    assert result["loaded"] is None and not result["fast"]
    assert "imported before mlx_mtp" in result["advice"]
    assert stderr.count("RuntimeWarning: mlx was imported before mlx_mtp") == 1


def test_advice_names_what_to_install_when_none_is_found(monkeypatch):
    monkeypatch.setattr(blas, "_STATE", blas.Preload())
    monkeypatch.setattr(blas, "_global_provider", lambda symbol="cblas_sgemm": None)
    monkeypatch.setattr(blas, "candidates", lambda: [])
    monkeypatch.setattr(sys, "platform", "linux")
    info = blas.blas_info()
    assert not info.fast and info.path is None
    assert "apt install libopenblas0-pthread" in info.describe()


WHEEL_PROBE = """
import ctypes.util, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("blas_alone", sys.argv[1])
blas = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blas)
blas._system_paths = lambda: []  # as on a system without OpenBLAS
ctypes.util.find_library = lambda name: None
state = blas.preload()
import mlx.core as mx
mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))
print(json.dumps({"loaded": state.loaded, "provider": blas._global_provider()}))
"""


@linux
def test_a_wheel_blas_serves_where_the_system_has_none():
    wheel = blas._wheel_paths()
    if not wheel:
        pytest.skip("no BLAS wheel installed (ngsolve-openblas is a Linux x86_64 dependency)")
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.ENV_VAR)}
    out = subprocess.run(
        [sys.executable, "-c", WHEEL_PROBE, str(ROOT / "mlx_mtp" / "blas.py")],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == wheel[0]
    assert result["provider"] == os.path.realpath(wheel[0])


def test_a_reference_blas_in_the_global_scope_is_not_called_fast(monkeypatch):
    monkeypatch.setattr(blas, "_STATE", blas.Preload())
    monkeypatch.setattr(sys, "platform", "linux")
    netlib = "/usr/lib/x86_64-linux-gnu/blas/libblas.so.3.11.0"
    monkeypatch.setattr(blas, "_global_provider", lambda symbol="cblas_sgemm": netlib)
    info = blas.blas_info()
    assert not info.fast and "apt install libopenblas0-pthread" in info.describe()
    monkeypatch.setattr(blas, "_global_provider", lambda symbol="cblas_sgemm": "/opt/x/libopenblasp-r0.3.21.so")
    info = blas.blas_info()
    assert info.fast and info.name == "OpenBLAS" and info.advice is None
