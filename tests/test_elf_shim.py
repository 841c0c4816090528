"""The forwarding shim (mlx_mtp.elf_shim): a shared object written in Python
whose exported functions jump to prefixed functions of another library."""

import ctypes
import platform
import struct
import sys

import pytest

from mlx_mtp.elf_shim import ShimError, forwarding_shim

LIBC = "libc.so.6"
x86_64_linux = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"), reason="x86_64 Linux only"
)


def load(tmp_path, data: bytes) -> ctypes.CDLL:
    path = tmp_path / "shim.so"
    path.write_bytes(data)
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)


@x86_64_linux
def test_exported_names_call_the_prefixed_functions(tmp_path):
    # "len" -> libc's "strlen", "cmp" -> "strcmp": known answers through the jump
    shim = load(tmp_path, forwarding_shim(["len", "cmp"], "str", LIBC))
    shim.len.restype, shim.len.argtypes = ctypes.c_size_t, [ctypes.c_char_p]
    shim.cmp.restype, shim.cmp.argtypes = ctypes.c_int, [ctypes.c_char_p, ctypes.c_char_p]
    assert shim.len(b"hello, shim") == 11
    assert shim.cmp(b"abc", b"abc") == 0 and shim.cmp(b"abc", b"abd") < 0
    # "len" is the shim's own stub, which jumps to libc's function
    address = lambda f: ctypes.cast(f, ctypes.c_void_p).value
    assert address(shim.len) != address(ctypes.CDLL(LIBC).strlen)


@x86_64_linux
def test_a_name_the_target_lacks_fails_the_load_not_a_call(tmp_path):
    with pytest.raises(OSError, match="undefined symbol: strno_such_function"):
        load(tmp_path, forwarding_shim(["len", "no_such_function"], "str", LIBC))


def test_layout_is_a_64_bit_x86_64_shared_object_without_an_executable_stack():
    data = forwarding_shim(["cblas_sgemm", "cblas_dgemm"], "scipy_", "/x/libscipy_openblas.so")
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1  # ELF64, little-endian
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert (e_type, e_machine) == (3, 62)  # ET_DYN, EM_X86_64
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 32)[0], *struct.unpack_from("<HH", data, 54)
    kinds = {}
    for i in range(phnum):
        kind, flags = struct.unpack_from("<II", data, phoff + i * phentsize)
        kinds[kind] = flags
    assert kinds[0x6474E551] == 6  # PT_GNU_STACK: read and write, no execute
    assert kinds[2] == 6  # PT_DYNAMIC
    assert b"/x/libscipy_openblas.so\0" in data and b"scipy_cblas_dgemm\0" in data and b"\0cblas_sgemm\0" in data
    assert forwarding_shim(["cblas_sgemm", "cblas_dgemm"], "scipy_", "/x/libscipy_openblas.so") == data  # deterministic


def test_names_must_be_plain():
    with pytest.raises(ShimError):
        forwarding_shim([], "p_", LIBC)
    with pytest.raises(ShimError):
        forwarding_shim(["a\0b"], "p_", LIBC)
