"""Loading a fast BLAS for MLX on Linux (mlx_mtp.blas): what the install
brought takes effect without LD_PRELOAD, a candidate that cannot load is passed
over with its reason, a prefixed one serves through the forwarding shim, and a
missing one is quiet."""

import ctypes.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_mtp import blas

from conftest import unavailable

ROOT = Path(__file__).resolve().parent.parent
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

PROBE = """
import json, sys
import numpy as np
import mlx_mtp
import mlx.core as mx
from mlx_mtp import blas
a = np.random.default_rng(0).standard_normal((96, 80)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((80, 72)).astype(np.float32)
error = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())
info = blas.blas_info()
state = blas.preload()
maps = open("/proc/self/maps").read()
print(json.dumps({"name": info.name, "fast": info.fast, "path": info.path, "how": info.how,
                  "advice": info.advice, "in_maps": info.path is not None and info.path in maps,
                  "loaded": state.loaded and state.loaded.path, "errors": state.errors,
                  "provider": blas._global_provider(), "shim": state.shim, "error": error}))
"""


def run_probe(code: str = PROBE, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.ENV_VAR)}
    clean.update(PYTHONPATH=str(ROOT), **env)
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


# mlx_mtp.blas alone, without the package's __init__ (which loads a BLAS at once)
ALONE = f"""
import sys, types
package = types.ModuleType("mlx_mtp")
package.__path__ = [{str(ROOT / "mlx_mtp")!r}]
sys.modules["mlx_mtp"] = package
import mlx_mtp.blas as blas
"""


def probe_with_candidates(paths) -> str:
    """The probe, with ``paths`` as the only candidates."""
    listed = ", ".join(f"blas.Candidate({p!r}, 'test')" for p in paths)
    return ALONE + f"blas._candidates = lambda: iter([{listed}])\nblas.preload()\n" + PROBE


@linux
def test_what_the_install_brought_takes_effect_without_ld_preload():
    # on Linux x86_64 the install brings scipy-openblas32; elsewhere a system OpenBLAS is needed
    found = blas.candidates()
    if not found:
        assert platform.machine() != "x86_64", "the Linux x86_64 install brings scipy-openblas32"
        unavailable("no fast BLAS installed here (not x86_64: install OpenBLAS)")
    result, stderr = run_probe()
    # the first candidate that loads is the one in effect; the ones before it failed, each with its reason
    assert len(result["errors"]) < len(found)
    assert [e.split(": ")[0] for e in result["errors"]] == [c.path for c in found[: len(result["errors"])]]
    assert result["loaded"] == found[len(result["errors"])].path
    assert result["fast"] and result["how"].startswith("loaded by mlx_mtp from ")
    # MLX's cblas_sgemm resolves to it (or to the shim in front of it), it is mapped, and it multiplies right
    assert result["path"] == os.path.realpath(result["loaded"]) and result["in_maps"]
    assert result["provider"] == (result["shim"] or os.path.realpath(result["loaded"]))
    assert result["error"] < 1e-3
    assert stderr == ""


@linux
def test_a_candidate_that_cannot_load_is_passed_over_with_its_reason(tmp_path):
    good = blas.candidates()
    if not good:
        unavailable("no fast BLAS installed here")
    not_elf = tmp_path / "libopenblas.so.0"
    not_elf.write_text("not a library\n" * 200)
    no_blas = ctypes.util.find_library("z") or "libz.so.1"  # loads, but exports no cblas_sgemm
    result, stderr = run_probe(probe_with_candidates([str(not_elf), no_blas, good[0].path]))
    assert result["loaded"] == good[0].path and result["fast"]
    assert len(result["errors"]) == 2
    assert result["errors"][0].startswith(f"{not_elf}: ") and "invalid ELF header" in result["errors"][0]
    assert result["errors"][1].startswith(f"{no_blas}: ") and "exports no cblas_sgemm" in result["errors"][1]
    assert result["error"] < 1e-3 and stderr == ""


@linux
def test_a_prefixed_library_serves_through_the_forwarding_shim():
    wheel = [c for c in blas.candidates() if c.origin == "the scipy-openblas32 wheel"]
    if not wheel:
        assert platform.machine() != "x86_64", "the Linux x86_64 install brings scipy-openblas32"
        unavailable("scipy-openblas32 is a dependency on Linux x86_64 only")
    result, stderr = run_probe(MLX_MTP_BLAS=wheel[0].path)
    assert result["loaded"] == wheel[0].path and result["fast"] and result["errors"] == []
    assert result["how"] == "loaded by mlx_mtp from MLX_MTP_BLAS, through a forwarding shim"
    assert result["shim"].startswith("/memfd:mlx_mtp_blas_shim") and result["provider"] == result["shim"]
    assert result["error"] < 1e-3 and stderr == ""


@linux
def test_missing_library_is_quiet():
    result, stderr = run_probe(MLX_MTP_BLAS="/nonexistent/libopenblas.so.0")
    assert result["loaded"] is None and not result["fast"]
    assert result["name"] == "reference BLAS (bundled)"
    assert len(result["errors"]) == 1 and result["errors"][0].startswith("/nonexistent/libopenblas.so.0")
    assert "could not load" in result["advice"] and "apt install libopenblas0-pthread" in result["advice"]
    assert "pip install scipy-openblas32" in result["advice"]
    assert stderr == ""


@linux
def test_off_loads_nothing():
    result, _ = run_probe(MLX_MTP_BLAS="off")
    assert result["loaded"] is None and not result["fast"]
    assert "MLX_MTP_BLAS=off" in result["advice"]


@linux
def test_mlx_imported_first_warns_once_and_loads_nothing():
    if not blas.candidates():
        unavailable("no fast BLAS installed here: nothing to warn about")
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


WHEEL_PROBE = (
    ALONE
    + """
import ctypes.util, json
blas._system_paths = lambda: []  # as on a system without OpenBLAS
ctypes.util.find_library = lambda name: None
state = blas.preload()
import mlx.core as mx
mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))
print(json.dumps({"loaded": state.loaded.path, "shim": state.shim, "provider": blas._global_provider()}))
"""
)


@linux
def test_a_wheel_blas_serves_where_the_system_has_none():
    wheel = blas._wheel_candidates()
    if not wheel:
        assert platform.machine() != "x86_64", "the Linux x86_64 install brings scipy-openblas32"
        unavailable("no BLAS wheel installed (scipy-openblas32 is a Linux x86_64 dependency)")
    result, _ = run_probe(WHEEL_PROBE)
    assert result["loaded"] == wheel[0].path
    assert result["provider"] == (result["shim"] or os.path.realpath(wheel[0].path))


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
