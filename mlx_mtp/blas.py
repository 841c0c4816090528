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
BLAS shipped in a PyPI wheel: ``scipy-openblas32``, a Linux x86_64 dependency
of this package that needs nothing from the system, whose prefixed names
(``scipy_cblas_sgemm``) MLX reaches through a forwarding shim
(:mod:`mlx_mtp.elf_shim`); ``ngsolve-openblas`` and MKL's ``libmkl_rt``
where installed. A candidate that fails to load is passed over, with its
reason kept. :func:`blas_info` tells which library provides ``cblas_sgemm``
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

from .elf_shim import ShimError, forwarding_shim

ENV_VAR = "MLX_MTP_BLAS"  # a library path to load, or "off"
OFF = ("off", "0", "none", "no", "false")

# what to install where no fast BLAS can be had
INSTALL_ADVICE = (
    "install OpenBLAS: apt install libopenblas0-pthread (Debian/Ubuntu), "
    "dnf install openblas-threads (Fedora/RHEL), pacman -S openblas (Arch), apk add openblas (Alpine); "
    "on x86_64, pip install scipy-openblas32 also serves"
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


# The BLAS and LAPACK functions libmlx.so imports (MLX 0.29-0.32): what a
# forwarding shim exports, where the library has them.
MLX_BLAS_NAMES = (
    "cblas_sgemm", "cblas_dgemm", "cblas_cgemm",
    "sgetrf_", "sgetri_", "sgeqrf_", "sorgqr_", "spotrf_", "strtri_", "ssyevd_", "sgesdd_", "sgeev_",
    "dgetrf_", "dgetri_", "dgeqrf_", "dorgqr_", "dpotrf_", "dtrtri_", "dsyevd_", "dgesdd_", "dgeev_",
    "cheevd_", "cgesdd_", "cgeev_",
)  # fmt: skip


@dataclass(frozen=True)
class Candidate:
    """A fast BLAS that :func:`preload` may load."""

    path: str  # the library file
    origin: str  # where it comes from: "the system", "the scipy-openblas32 wheel", "MLX_MTP_BLAS", ...


def _package_files(package: str, pattern: str) -> List[str]:
    """Files matching ``pattern`` in an installed package's directory, found
    without importing it (some packages load their library on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(p for d in spec.submodule_search_locations for p in glob.glob(os.path.join(d, pattern)))


def _wheel_candidates() -> List[Candidate]:
    """BLAS libraries shipped in installed PyPI wheels, most preferred first:
    ``scipy-openblas32`` (a dependency of this package on Linux x86_64:
    self-contained, prefixed names, loaded through a forwarding shim), then
    ``ngsolve-openblas`` (plain names, needs the system's libgfortran5) and
    MKL's ``libmkl_rt`` (the ``mkl`` wheel). docs/linux.md has their figures."""
    import sysconfig

    found = [Candidate(p, "the scipy-openblas32 wheel") for p in _package_files("scipy_openblas32", "lib/*.so")]
    found += [Candidate(p, "the ngsolve-openblas wheel") for p in _package_files("ngsolve_openblas", "*.so*")]
    for prefix in {sys.prefix, sysconfig.get_config_var("prefix") or sys.prefix}:
        mkl = glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*"))
        found += [Candidate(p, "the mkl wheel") for p in sorted(mkl)]
    return found


def _candidates() -> Iterator[Candidate]:
    seen = set()
    for path in _system_paths():
        if os.path.exists(path):
            seen.add(path)
            yield Candidate(path, "the system")
    import ctypes.util  # runs ldconfig: only where the usual paths had none

    lib = ctypes.util.find_library("openblas")
    if lib and lib not in seen:
        yield Candidate(lib, "the system")
    yield from _wheel_candidates()


def candidates() -> List[Candidate]:
    """Fast BLAS libraries to try, in order (existing files only)."""
    return list(dict.fromkeys(_candidates()))


@dataclass
class Preload:
    """What :func:`preload` did."""

    loaded: Optional[Candidate] = None  # the library loaded with RTLD_GLOBAL
    shim: Optional[str] = None  # the name a forwarding shim for ``loaded`` was loaded under
    mlx_first: bool = False  # MLX was imported before the package: nothing loaded
    disabled: bool = False  # MLX_MTP_BLAS=off
    errors: List[str] = field(default_factory=list)  # libraries that failed to load, with why


_STATE: Optional[Preload] = None


# the prefixes a BLAS may put before ``cblas_sgemm``: none, or scipy-openblas32's
PREFIXES = ("", "scipy_")


def _prefix_of(lib: ctypes.CDLL) -> str:
    """What ``lib`` puts before its BLAS function names; OSError where it has
    no 32-bit-integer ``cblas_sgemm`` under any known prefix."""
    for prefix in PREFIXES:
        if hasattr(lib, prefix + "cblas_sgemm"):
            return prefix
    raise OSError("it exports no cblas_sgemm (" + ", ".join(p + "cblas_sgemm" for p in PREFIXES[1:]) + " neither)")


def _load_shim(path: str, lib: ctypes.CDLL, prefix: str) -> str:
    """Load a forwarding shim that exports, under the names MLX binds, the
    functions ``lib`` (at ``path``) has under ``prefix``; returns the name the
    shim was loaded under. Raises OSError when it cannot be done."""
    if platform.machine() != "x86_64":
        raise OSError(f"its names are prefixed ({prefix}), and the forwarding shim is written for x86_64 only")
    names = [name for name in MLX_BLAS_NAMES if hasattr(lib, prefix + name)]
    fd = os.memfd_create("mlx_mtp_blas_shim", os.MFD_CLOEXEC)  # in memory: nothing on disk to go stale
    try:
        os.write(fd, forwarding_shim(names, prefix, path))
        ctypes.CDLL(f"/proc/self/fd/{fd}", mode=ctypes.RTLD_GLOBAL)
    except (OSError, ShimError):
        os.close(fd)
        raise
    # the descriptor stays open, so the name dladdr gives the shim resolves to the memfd
    return os.path.realpath(f"/proc/self/fd/{fd}")


def _load(candidate: Candidate, state: Preload) -> bool:
    """Load one candidate so that MLX binds to it: with RTLD_GLOBAL, or behind
    a forwarding shim where its names are prefixed. On failure, record why and
    return False."""
    try:
        lib = ctypes.CDLL(candidate.path, mode=ctypes.RTLD_LOCAL)  # looked at before it joins the global scope
        prefix = _prefix_of(lib)
        if prefix:
            state.shim = _load_shim(candidate.path, lib, prefix)
        else:
            ctypes.CDLL(candidate.path, mode=ctypes.RTLD_GLOBAL)
    except (OSError, ShimError) as e:
        state.errors.append(f"{candidate.path}: {e}")
        return False
    state.loaded = candidate
    return True


def preload() -> Preload:
    """On Linux, load the first fast BLAS of :func:`candidates` (or
    ``$MLX_MTP_BLAS``) with ``RTLD_GLOBAL``, so that MLX, imported later,
    runs its matmuls with it; a candidate that fails to load is passed over,
    its reason kept in ``errors``. Once per process; never raises. Does
    nothing where a fast BLAS is already in the global scope (``LD_PRELOAD``),
    off Linux, or with ``MLX_MTP_BLAS=off``; where MLX was imported first,
    warns once (a fast BLAS was there to load, and cannot take effect now)."""
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
    found = iter([Candidate(forced, ENV_VAR)]) if forced else _candidates()
    if "mlx.core" in sys.modules:
        state.mlx_first = True
        first = next(found, None)
        if first:
            warnings.warn(
                "mlx was imported before mlx_mtp, so mlx_mtp could not load a fast BLAS for it "
                f"(found {first.path}): fp32 matmuls run many times slower. Import mlx_mtp first"
                + (f", or run with LD_PRELOAD={first.path}" if first.origin == "the system" else ""),
                RuntimeWarning,
                stacklevel=3,
            )
        return state
    for candidate in found:
        if _load(candidate, state):
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
    ours = state.loaded and (state.shim or os.path.realpath(state.loaded.path))
    if provider is not None and provider == ours:
        how = f"loaded by mlx_mtp from {state.loaded.origin}" + (", through a forwarding shim" if state.shim else "")
        return BlasInfo(_name(state.loaded.path), True, os.path.realpath(state.loaded.path), how)
    if provider is not None:
        how = "LD_PRELOAD" if "LD_PRELOAD" in os.environ else "loaded before mlx"
        # a reference BLAS in the global scope (netlib's libblas.so.3) is no faster
        slow = os.path.basename(provider).startswith("libblas.")
        advice = f"a reference BLAS: {INSTALL_ADVICE}" if slow else None
        return BlasInfo(_name(provider), not slow, provider, how, advice)
    if state.disabled:
        advice = f"{ENV_VAR}=off: unset it for a fast BLAS"
    elif state.mlx_first and candidates():
        first = candidates()[0]
        advice = "mlx was imported before mlx_mtp: import mlx_mtp first" + (
            f", or run with LD_PRELOAD={first.path}" if first.origin == "the system" else ""
        )
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
