"""The BLAS that MLX's CPU backend runs with on Linux: finding a fast one and
loading it before MLX is imported, and telling which one runs.

MLX's Linux CPU wheel (``mlx[cpu]``) links a bundled reference BLAS, ~30x
slower for fp32 matmuls than OpenBLAS (docs/calibration.md). ``libmlx.so``
resolves ``cblas_sgemm`` through the process's global symbol scope before its
own dependencies, so a BLAS loaded with ``RTLD_GLOBAL`` before MLX is imported
takes its place, as ``LD_PRELOAD`` would. :func:`preload` does that; the
package calls it first thing on import. Loaded after MLX, a BLAS does not take
effect (measured), so where MLX came first :func:`preload` only says so.

Where it looks, first found first: ``MLX_MTP_BLAS`` (a path, or ``off``), the
distributions' OpenBLAS paths, ``ctypes.util.find_library("openblas")``, then a
BLAS shipped in a PyPI wheel that exports the plain ``cblas_sgemm`` MLX links
against (``ngsolve-openblas``, a Linux x86_64 dependency of this package; MKL's
``libmkl_rt``). :func:`blas_info` tells which library provides ``cblas_sgemm``
to MLX, and :func:`measure_gflops` times one sgemm to confirm it.
"""

import ctypes
import glob
import importlib.util
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

ENV_VAR = "MLX_MTP_BLAS"  # a library path to load, or "off"
OFF = ("off", "0", "none", "no", "false")

# what to install where no fast BLAS can be had
INSTALL_ADVICE = (
    "install OpenBLAS: apt install libopenblas0-pthread (Debian/Ubuntu), "
    "dnf install openblas-threads (Fedora/RHEL), pacman -S openblas (Arch), apk add openblas (Alpine); "
    "on x86_64, pip install ngsolve-openblas also serves (it needs libgfortran5)"
)


def _system_paths() -> List[str]:
    """OpenBLAS's shared library where distributions put it, most usual first."""
    arch = platform.machine()
    multiarch = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "ppc64le": "powerpc64le-linux-gnu"}
    paths = []
    if arch in multiarch:  # Debian, Ubuntu (alternatives: pthread, openmp, serial)
        d = f"/usr/lib/{multiarch[arch]}"
        paths += [f"{d}/{sub}libopenblas.so.0" for sub in ("openblas-pthread/", "", "openblas-openmp/")]
    paths += [
        "/usr/lib64/libopenblasp.so.0",  # Fedora, RHEL: the pthreads build
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib64/libopenblaso.so.0",
        "/usr/lib/libopenblas.so.0",  # Arch, Alpine, others
        "/usr/lib/libopenblas.so.3",
        "/usr/local/lib/libopenblas.so.0",
        "/home/linuxbrew/.linuxbrew/opt/openblas/lib/libopenblas.so.0",  # Homebrew on Linux
    ]
    return paths


def _wheel_paths() -> List[str]:
    """BLAS libraries shipped in installed PyPI wheels whose ``cblas_sgemm``
    is unprefixed (scipy-openblas32/64 and numpy's prefix theirs: unusable)."""
    import sysconfig

    paths = []
    spec = importlib.util.find_spec("ngsolve_openblas")  # found without importing it (that loads it too)
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            paths += sorted(glob.glob(os.path.join(d, "libopenblas*.so*")))
    for prefix in {sys.prefix, sysconfig.get_config_var("prefix") or sys.prefix}:
        paths += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))  # the `mkl` wheel
    return paths


def _candidates() -> Iterator[str]:
    seen = set()
    for path in _system_paths():
        if os.path.exists(path):
            seen.add(path)
            yield path
    import ctypes.util  # runs ldconfig: only where the usual paths had none

    lib = ctypes.util.find_library("openblas")
    if lib and lib not in seen:
        yield lib
    yield from _wheel_paths()


def candidates() -> List[str]:
    """Fast BLAS libraries to try, in order (existing files only)."""
    return list(dict.fromkeys(_candidates()))


@dataclass
class Preload:
    """What :func:`preload` did."""

    loaded: Optional[str] = None  # the library loaded with RTLD_GLOBAL
    mlx_first: bool = False  # MLX was imported before the package: nothing loaded
    disabled: bool = False  # MLX_MTP_BLAS=off
    errors: List[str] = field(default_factory=list)  # libraries that failed to load, with why


_STATE: Optional[Preload] = None


def preload() -> Preload:
    """On Linux, load the first fast BLAS of :func:`candidates` (or
    ``$MLX_MTP_BLAS``) with ``RTLD_GLOBAL``, so that MLX, imported later,
    runs its matmuls with it. Once per process; never raises. Does nothing
    where a fast BLAS is already in the global scope (``LD_PRELOAD``), off
    Linux, or with ``MLX_MTP_BLAS=off``; where MLX was imported first, warns
    once (a fast BLAS was there to load, and cannot take effect now)."""
    global _STATE
    if _STATE is not None:
        return _STATE
    _STATE = state = Preload()
    if not sys.platform.startswith("linux"):
        return state
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced.lower() in OFF:
        state.disabled = True
        return state
    if _global_provider() is not None:  # LD_PRELOAD, or loaded by the application
        return state
    paths = iter([forced]) if forced else _candidates()
    if "mlx.core" in sys.modules:
        state.mlx_first = True
        first = next(paths, None)
        if first:
            warnings.warn(
                "mlx was imported before mlx_mtp, so mlx_mtp could not load a fast BLAS for it "
                f"(found {first}): fp32 matmuls run many times slower. Import mlx_mtp first, or run with "
                f"LD_PRELOAD={first}",
                RuntimeWarning,
                stacklevel=3,
            )
        return state
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            state.errors.append(f"{path}: {e}")
            continue
        state.loaded = path
        break
    return state


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _global_provider(symbol: str = "cblas_sgemm") -> Optional[str]:
    """The file of the library that provides ``symbol`` in the process's
    global scope (what ``libmlx.so`` binds to before its own bundled BLAS);
    None when none does or it cannot be told."""
    try:
        libc = ctypes.CDLL(None)
        libc.dlsym.restype = ctypes.c_void_p
        libc.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        addr = libc.dlsym(None, symbol.encode())
        if not addr:
            return None
        info = _DlInfo()
        libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        if not libc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or not info.dli_fname:
            return None
        return os.path.realpath(info.dli_fname.decode())
    except (OSError, AttributeError):
        return None


def _name(path: str) -> str:
    base = os.path.basename(path).lower()
    for key, name in (("openblas", "OpenBLAS"), ("mkl", "MKL"), ("blis", "BLIS"), ("flexiblas", "FlexiBLAS")):
        if key in base:
            return name
    return base


@dataclass
class BlasInfo:
    """Which BLAS MLX's CPU matmuls run with."""

    name: str  # "OpenBLAS", "MKL", "Accelerate", "reference BLAS (bundled)", ...
    fast: bool  # False: MLX's bundled reference BLAS
    path: Optional[str] = None  # the library, where it is a file
    how: str = ""  # "loaded by mlx_mtp", "LD_PRELOAD", ...
    advice: Optional[str] = None  # what to do for a fast one, where it is not

    def describe(self) -> str:
        """One line for verbose output: which BLAS, how, and what to do if slow."""
        text = self.name + (f" ({self.how}: {self.path})" if self.path else "")
        return text + (f"; {self.advice}" if self.advice else "")


def blas_info() -> BlasInfo:
    """Which BLAS MLX's CPU backend runs with, from the library that provides
    ``cblas_sgemm`` in the global scope (Linux) or the platform (macOS)."""
    if sys.platform == "darwin":
        return BlasInfo("Accelerate", True, how="macOS")
    if not sys.platform.startswith("linux"):
        return BlasInfo("unknown", False)
    state = preload()
    provider = _global_provider()
    if provider is not None:
        loaded = state.loaded and os.path.realpath(state.loaded) == provider
        how = "loaded by mlx_mtp" if loaded else ("LD_PRELOAD" if "LD_PRELOAD" in os.environ else "loaded before mlx")
        # a reference BLAS in the global scope (netlib's libblas.so.3) is no faster
        slow = os.path.basename(provider).startswith("libblas.")
        advice = f"a reference BLAS: {INSTALL_ADVICE}" if slow else None
        return BlasInfo(_name(provider), not slow, provider, how, advice)
    if state.disabled:
        advice = f"{ENV_VAR}=off: unset it for a fast BLAS"
    elif state.mlx_first and candidates():
        advice = f"mlx was imported before mlx_mtp: import mlx_mtp first, or run with LD_PRELOAD={candidates()[0]}"
    elif state.errors:
        advice = "could not load " + "; ".join(state.errors) + f"; {INSTALL_ADVICE}"
    else:
        advice = f"fp32 matmuls run many times slower than with OpenBLAS: {INSTALL_ADVICE}"
    return BlasInfo("reference BLAS (bundled)", False, advice=advice)


def describe() -> str:
    """:meth:`BlasInfo.describe` of :func:`blas_info` (the CLIs' verbose output, the benchmark)."""
    return blas_info().describe()


def measure_gflops(n: int = 256, repeats: int = 5) -> float:
    """GFLOP/s of an n x n fp32 matmul on MLX's CPU device (best of
    ``repeats``: the least disturbed by other processes). Confirms a BLAS is
    in effect: the bundled reference BLAS runs at a few GFLOP/s."""
    import mlx.core as mx

    with mx.stream(mx.cpu):
        ka, kb = mx.random.split(mx.random.key(0))  # the caller's seeded stream is left alone
        a = mx.random.normal((n, n), key=ka)
        b = mx.random.normal((n, n), key=kb)
        mx.eval(a, b, a @ b)
        best = float("inf")
        for _ in range(repeats):
            tic = time.perf_counter()
            mx.eval(a @ b)
            best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e9
