"""Fuzzing the file readers: real files (a tiny GGUF model, an adapter, a
peft checkpoint, a JSONL data file) are mutated (truncated, bytes flipped,
header fields, counts and tensor offsets overwritten) and read back. Every
case must either succeed or end in the project's error class
(:class:`~mlx_mtp.errors.MTPError`) with a message: no other exception, no
hang, no crash.

The examples per test are few in the suite (``MLX_MTP_FUZZ_EXAMPLES``, 25 by
default); a campaign runs the same tests with many more. Inputs that ever
failed are kept in ``tests/fuzz_corpus/<target>/`` and replayed here
(``MLX_MTP_FUZZ_SAVE=1`` writes a new failing input there).
"""

import hashlib
import json
import os
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from convert.checkpoint import read_json, read_tensors
from convert.torch import convert_loaded
from mlx_mtp.adapter import load_adapter, save_adapter
from mlx_mtp.errors import AdapterError, DataError, MTPError
from mlx_mtp.files import read_safetensors_header, read_text
from mlx_mtp.gguf.reader import read_header
from mlx_mtp.gguf.writer import convert_gguf, read_model
from mlx_mtp.training.data import read_jsonl

from conftest import need
from tiny import tiny_model, tiny_mtp

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
EXAMPLES = int(os.environ.get("MLX_MTP_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 25,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip


# ------------------------------------------------------------------ mutations


@st.composite
def mutated(draw, data: bytes, fields=(), keep: int = 0):
    """``data`` changed by 1-4 mutations: truncation, flipped bytes, random
    bytes written anywhere, or a little-endian integer field (from
    ``fields``: (offset, size)) set to a hostile value. The first ``keep``
    bytes (a magic number) are left alone, so that most cases get past it."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(["truncate", "flip", "write", "field"] if fields else ["truncate", "flip", "write"])
        )
        if kind == "truncate" and len(out) > keep:
            del out[draw(st.integers(keep, len(out) - 1)) :]
        elif kind == "flip" and len(out) > keep:
            i = draw(st.integers(keep, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "write" and len(out) > keep:
            i = draw(st.integers(keep, len(out) - 1))
            out[i : i + 8] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "field":
            offset, size = draw(st.sampled_from(list(fields)))
            if offset + size <= len(out):
                big = (1 << (8 * size)) - 1
                value = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 31, 32, 33, big, big // 2, big - 7]),
                                       st.integers(0, big)))  # fmt: skip
                out[offset : offset + size] = value.to_bytes(size, "little")
    return bytes(out)


def check(target: str, data: bytes, run) -> None:
    """``run()`` must succeed or raise an MTPError with a message; anything
    else fails (and, with MLX_MTP_FUZZ_SAVE=1, is saved to the corpus)."""
    try:
        run()
    except MTPError as e:
        assert str(e).strip(), "an error without a message"
        assert "\n" not in str(e).strip(), f"a multi-line message: {e}"
    except BaseException:
        if os.environ.get("MLX_MTP_FUZZ_SAVE"):
            folder = CORPUS / target
            folder.mkdir(parents=True, exist_ok=True)
            (folder / hashlib.sha256(data).hexdigest()[:16]).write_bytes(data)
        raise


def corpus(target: str):
    folder = CORPUS / target
    return sorted(folder.iterdir()) if folder.is_dir() else []


# ---------------------------------------------------------------------- GGUF


def _tiny_gguf(path: Path) -> Path:
    """A 1-layer llama GGUF (F32, Q8_0, Q4_1 tensors) with a byte-level BPE vocabulary."""
    gguf = need("gguf")

    vocab = ["<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he"]
    rng = np.random.default_rng(0)
    hidden, inter, n = 32, 64, len(vocab)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, hidden),
                   (w.add_feed_forward_length, inter), (w.add_head_count, 2), (w.add_head_count_kv, 1),
                   (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, n), (w.add_tokenizer_model, "gpt2"),
                   (w.add_tokenizer_pre, "smollm"), (w.add_token_list, vocab), (w.add_token_merges, ["h e"]),
                   (w.add_token_types, [3, 3] + [1] * (n - 2)), (w.add_bos_token_id, 0), (w.add_eos_token_id, 1)):  # fmt: skip  # noqa: E501
        add(v)
    shapes = {"token_embd.weight": (n, hidden), "output_norm.weight": (hidden,), "blk.0.attn_norm.weight": (hidden,),
              "blk.0.ffn_norm.weight": (hidden,), "blk.0.attn_q.weight": (hidden, hidden),
              "blk.0.attn_k.weight": (16, hidden), "blk.0.attn_v.weight": (16, hidden),
              "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_gate.weight": (inter, hidden),
              "blk.0.ffn_up.weight": (inter, hidden), "blk.0.ffn_down.weight": (hidden, inter)}  # fmt: skip
    quant = {"blk.0.ffn_up.weight": "Q8_0", "blk.0.ffn_gate.weight": "Q4_1"}
    for name, shape in shapes.items():
        x = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name in quant:
            qtype = getattr(gguf.GGMLQuantizationType, quant[name])
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def _gguf_fields(path: Path, data: bytes):
    """(offset, size) of the header's counts, every length and the tensor
    table's dims, types and offsets: where a hostile value hurts most."""
    gguf = need("gguf")
    fields = [(4, 4), (8, 8), (16, 8)]  # version, tensor count, metadata count
    reader = gguf.GGUFReader(str(path))
    for f in reader.fields.values():
        for part in f.parts[:2]:
            fields.append((int(part.ctypes.data - reader.data.ctypes.data), part.nbytes))
    for t in reader.tensors:
        for part in t.field.parts:
            fields.append((int(part.ctypes.data - reader.data.ctypes.data), min(part.nbytes, 8)))
    return [f for f in fields if 0 <= f[0] < len(data) and f[1] in (4, 8)]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = _tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    data = path.read_bytes()
    return data, _gguf_fields(path, data)


def convert_in_memory(path: Path) -> None:
    """Everything the converter does with a file, short of writing it."""
    read_model(path, "keep")


def test_tiny_gguf_converts(gguf_file, tmp_path):
    """The unmutated file converts: the fuzz cases start from a good file."""
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_file[0])
    convert_in_memory(path)
    assert (convert_gguf(path, tmp_path / "out") / "model.safetensors").is_file()


@FUZZ
@given(data=st.data())
def test_fuzz_gguf(gguf_file, tmp_path, data):
    raw, fields = gguf_file
    blob = data.draw(mutated(raw, fields, keep=4))
    path = tmp_path / "m.gguf"
    path.write_bytes(blob)
    check("gguf", blob, lambda path=path: convert_in_memory(path))


def test_gguf_corpus(tmp_path):
    """Replay tests/fuzz_corpus/gguf/: inputs that once failed."""
    for case in corpus("gguf"):
        path = tmp_path / "m.gguf"
        path.write_bytes(case.read_bytes())
        check("gguf", case.read_bytes(), lambda path=path: convert_in_memory(path))


# ------------------------------------------------------------------- adapter


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "ad"
    mtp = tiny_mtp("llama", num_masks=2)
    mtp.set_draft_vocab(mx.array([0, 3, 5, 9]))
    save_adapter(mtp, path)
    weights = (path / "adapters.safetensors").read_bytes()
    n = struct.unpack("<Q", weights[:8])[0]
    return path, weights, (path / "adapter_config.json").read_bytes(), n


def _load_adapter_from(tmp_path: Path, weights: bytes, config: bytes):
    d = tmp_path / "ad"
    d.mkdir(exist_ok=True)
    (d / "adapters.safetensors").write_bytes(weights)
    (d / "adapter_config.json").write_bytes(config)
    return lambda: load_adapter(tiny_model("llama"), d)


@FUZZ
@given(data=st.data())
def test_fuzz_adapter_weights(adapter_dir, tmp_path, data):
    _, weights, config, n = adapter_dir
    # mostly the header (8 + n bytes), where the structure is
    head = data.draw(mutated(weights[: 8 + n], [(0, 8)]))
    blob = head + weights[8 + n :] if data.draw(st.booleans()) else data.draw(mutated(weights, [(0, 8)]))
    check("adapter_weights", blob, _load_adapter_from(tmp_path, blob, config))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(data=st.data())
def test_fuzz_adapter_config(adapter_dir, tmp_path, data):
    _, weights, config, _ = adapter_dir
    cfg = json.loads(config)
    if data.draw(st.booleans()):
        # a field (or a nested one) replaced by a random JSON value
        section = data.draw(st.sampled_from(["", "lora", "sampler", "base_model"]))
        target = cfg if not section else cfg[section]
        key = data.draw(st.sampled_from(sorted(target) + ["extra"]))
        target[key] = data.draw(JSON_VALUES)
        blob = json.dumps(cfg).encode()
    else:
        blob = data.draw(mutated(config))
    check("adapter_config", blob, _load_adapter_from(tmp_path, weights, blob))


def test_adapter_weights_corpus(adapter_dir, tmp_path):
    """Replay tests/fuzz_corpus/adapter_weights/: inputs that once failed."""
    for case in corpus("adapter_weights"):
        check("adapter_weights", case.read_bytes(), _load_adapter_from(tmp_path, case.read_bytes(), adapter_dir[2]))


def test_adapter_config_corpus(adapter_dir, tmp_path):
    """Replay tests/fuzz_corpus/adapter_config/: inputs that once failed."""
    for case in corpus("adapter_config"):
        check("adapter_config", case.read_bytes(), _load_adapter_from(tmp_path, adapter_dir[1], case.read_bytes()))


# ------------------------------------------------------------ torch importer


@pytest.fixture(scope="module")
def peft_files():
    """A peft checkpoint for tiny_model("llama") (q/v LoRA rank 2, 2 masks)."""
    rng = np.random.default_rng(0)
    d, tensors = 64, {}
    for i in range(2):
        for proj, out in (("q_proj", 64), ("v_proj", 32)):
            stem = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{stem}.lora_A.weight"] = rng.standard_normal((2, d))
            tensors[f"{stem}.lora_B.weight"] = rng.standard_normal((out, 2))
    for j, shape in enumerate([(d, 2 * d), (d, d)]):
        tensors[f"sampler_head.layers.{j}.linear.weight"] = rng.standard_normal(shape)
        tensors[f"sampler_head.layers.{j}.norm.weight"] = np.ones(d)
    tensors["mask_embeddings"] = rng.standard_normal((2, d))
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlx_mtp_fuzz_peft_{os.getpid()}.safetensors"
    mx.save_safetensors(str(tmp), {k: mx.array(v.astype(np.float32)) for k, v in tensors.items()})
    weights = tmp.read_bytes()
    tmp.unlink()
    config = json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "num_masks": 2}).encode()
    return weights, config, struct.unpack("<Q", weights[:8])[0]


def _import_peft(tmp_path: Path, weights: bytes, config: bytes):
    ckpt = tmp_path / "peft"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "adapter_model.safetensors").write_bytes(weights)
    (ckpt / "adapter_config.json").write_bytes(config)
    return lambda: convert_loaded(ckpt, tiny_model("llama"), None, tmp_path / "out", fmt="peft", overwrite=True)


def test_peft_fixture_converts(peft_files, tmp_path):
    _import_peft(tmp_path, peft_files[0], peft_files[1])()
    assert (tmp_path / "out" / "adapters.safetensors").is_file()


@FUZZ
@given(data=st.data())
def test_fuzz_torch_importer(peft_files, tmp_path, data):
    weights, config, n = peft_files
    if data.draw(st.booleans()):
        blob = data.draw(mutated(weights[: 8 + n], [(0, 8)])) + weights[8 + n :]
        run = _import_peft(tmp_path, blob, config)
    else:
        cfg = json.loads(config)
        cfg[data.draw(st.sampled_from(sorted(cfg) + ["use_rslora", "rank_pattern", "sampler_eps"]))] = data.draw(
            JSON_VALUES
        )
        blob = json.dumps(cfg).encode()
        run = _import_peft(tmp_path, weights, blob)
    check("torch_importer", blob, run)


def test_torch_importer_corpus(peft_files, tmp_path):
    """Replay tests/fuzz_corpus/torch_importer/: inputs that once failed."""
    for case in corpus("torch_importer"):
        blob = case.read_bytes()
        is_json = blob[:1] == b"{"
        run = _import_peft(tmp_path, peft_files[0] if is_json else blob, blob if is_json else peft_files[1])
        check("torch_importer", blob, run)


def test_fuzz_torch_pickle(tmp_path):
    """A PyTorch .bin: truncated, flipped and non-zip files are refused in one line."""
    torch = need("torch")

    path = tmp_path / "adapter_model.bin"
    torch.save({"a": torch.ones(3, 4), "b": torch.zeros(2)}, str(path))
    good = path.read_bytes()
    rng = np.random.default_rng(0)
    cases = [good[:n] for n in (0, 10, len(good) // 2, len(good) - 1)] + [b"not a zip"]
    for _ in range(EXAMPLES):
        blob = bytearray(good)
        for i in rng.integers(0, len(blob), size=4):
            blob[i] ^= 0xFF
        cases.append(bytes(blob))
    for blob in cases:
        path.write_bytes(blob)
        check("torch_pickle", blob, lambda path=path: read_tensors(path))


# ------------------------------------------------------------------- JSONL


@FUZZ
@given(data=st.data())
def test_fuzz_data_reader(tmp_path, data):
    good = "\n".join(json.dumps(r) for r in [
        {"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ]).encode()  # fmt: skip
    blob = data.draw(st.one_of(mutated(good), st.binary(max_size=64)))
    path = tmp_path / "train.jsonl"
    path.write_bytes(blob)
    check("jsonl", blob, lambda path=path: read_jsonl(path))


def test_jsonl_corpus(tmp_path):
    """Replay tests/fuzz_corpus/jsonl/: inputs that once failed."""
    for case in corpus("jsonl"):
        path = tmp_path / "train.jsonl"
        path.write_bytes(case.read_bytes())
        check("jsonl", case.read_bytes(), lambda path=path: read_jsonl(path))


def test_torch_pickle_corpus(tmp_path):
    """Replay tests/fuzz_corpus/torch_pickle/: inputs that once failed."""
    need("torch")

    for case in corpus("torch_pickle"):
        path = tmp_path / "adapter_model.bin"
        path.write_bytes(case.read_bytes())
        check("torch_pickle", case.read_bytes(), lambda path=path: read_tensors(path))


# ------------------------------------------------------ opening (files.reading)

OPENERS = {
    "text": lambda p: read_text(p, DataError, "a prompts file"),
    "jsonl": read_jsonl,
    "safetensors": lambda p: read_safetensors_header(p, AdapterError),
    "gguf": read_header,
    "json": read_json,
}


@pytest.mark.parametrize("reader", list(OPENERS))
def test_readers_refuse_a_missing_file_or_a_directory_alike(tmp_path, reader):
    """Every reader opens through ``files.reading``: the same one line for a
    missing file, a directory and (where it decodes text) bytes that are not UTF-8."""
    with pytest.raises(MTPError) as e:
        OPENERS[reader](tmp_path / "missing")
    assert str(e.value) == f"{tmp_path / 'missing'} not found"
    with pytest.raises(MTPError) as e:
        OPENERS[reader](tmp_path)
    assert str(e.value).startswith(f"{tmp_path} is a directory, not a")


@pytest.mark.parametrize("reader", ["text", "jsonl", "json"])
def test_text_readers_refuse_bytes_that_are_not_utf8(tmp_path, reader):
    path = tmp_path / "f"
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(MTPError) as e:
        OPENERS[reader](path)
    assert str(e.value) == f"{path}: not UTF-8 text (invalid start byte at byte 7)"
