"""The architecture matrix: every mlx-lm family the adapter serves, against
mlx-lm's own decoding, and every family it cannot serve, refused with the
reason and decoded plainly (tiny random models built from a config).

Per supported family: greedy output identical to ``mlx_lm.generate.generate_step``
for k in {1, 4}, quadratic and linear, with drafts accepted partly and fully
(an oracle draft, as in test_decode.py); the masks' hidden states equal a
contiguous reference; gated LoRA leaves the regular tokens' logits exactly
unchanged; two training steps give a finite loss. Sliding windows are 8
tokens, shorter than the prompts and outputs, so the window is exercised.
Which family needs which mechanism: docs/architectures.md.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.generate import generate_step
from mlx_lm.utils import _get_classes

from mlx_mtp.adapter import load_adapter, save_adapter
from mlx_mtp.errors import MTPError
from mlx_mtp.model.architectures import UnsupportedModelError, supports
from mlx_mtp.model.cache import commit
from mlx_mtp.model.layouts import quadratic_layout
from mlx_mtp.model.mtp_model import MTPConfig, MTPModel
from mlx_mtp.training.data import Dataset, build_example
from mlx_mtp.training.trainer import TrainArgs, Trainer

from conftest import decoder_for

V = 128
WINDOW = 8
BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "vocab_size": V,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
MOE = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
}

# one config for the families below that need nothing else (their own
# ModelArgs take what they know of it)
GENERIC = {
    **MOE,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
    "num_local_experts": 4,
    "layer_norm_eps": 1e-5,
    "norm_eps": 1e-5,
    "partial_rotary_factor": 1.0,
    "mlp_only_layers": [],
    "shared_expert_intermediate_size": 32,
}

# name -> (model_type, overrides of BASE)
FAMILIES = {
    "llama": ("llama", {}),
    "llama3_rope": ("llama", {"rope_scaling": LLAMA3_SCALING}),
    "llama_sliding": ("llama", {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": WINDOW}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {**MOE, "mlp_only_layers": [1]}),
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 16, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    "gemma3_text": (
        "gemma3_text",
        {"sliding_window": WINDOW, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16},
    ),
    "phi3": ("phi3", {}),
    "phi3_longrope": (
        "phi3",
        {
            "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.5] * 8},
            "original_max_position_embeddings": 32,
        },
    ),
    "granite": (
        "granite",
        {
            "logits_scaling": 4.0,
            "attention_multiplier": 0.2,
            "embedding_multiplier": 6.0,
            "residual_multiplier": 0.5,
            "attention_bias": False,
            "mlp_bias": False,
        },
    ),
    "olmo2": ("olmo2", {}),
    "smollm3": ("smollm3", {"no_rope_layer_interval": 2}),
    "starcoder2": ("starcoder2", {"norm_epsilon": 1e-5}),
    "cohere2": ("cohere2", {"sliding_window": WINDOW, "sliding_window_pattern": 2, "logit_scale": 0.5}),
    "internlm3": ("internlm3", {}),
    # families that reuse these blocks under a vision-language wrapper
    "gemma3": (
        "gemma3",
        {
            "text_config": {
                "model_type": "gemma3_text",
                **BASE,
                "sliding_window": WINDOW,
                "sliding_window_pattern": 2,
                "query_pre_attn_scalar": 16,
            }
        },
    ),
    "qwen3_vl": ("qwen3_vl", {"text_config": {"model_type": "qwen3", **BASE}}),
    "pixtral": ("pixtral", {"text_config": {"model_type": "llama", **BASE}}),
    "qwen2_vl": ("qwen2_vl", {"text_config": {"model_type": "qwen2", **BASE}}),
    "qwen3_vl_moe": (
        "qwen3_vl_moe",
        {"text_config": {"model_type": "qwen3_moe", **BASE, **MOE, "mlp_only_layers": []}},
    ),
    "mistral3": ("mistral3", {"text_config": {"model_type": "mistral", **BASE}}),
    # other families found to work with the generic config
    "cohere": ("cohere", GENERIC),
    "deepseek": ("deepseek", GENERIC),
    "deepseek_v3": ("deepseek_v3", GENERIC),
    "gemma": ("gemma", GENERIC),
    "glm": ("glm", GENERIC),
    "glm4_moe_lite": ("glm4_moe_lite", GENERIC),
    "gpt_oss": ("gpt_oss", GENERIC),
}
QUANTIZED = ("llama", "gemma3_text", "qwen3_moe", "phi3")

# name -> (model_type, config) of families the adapter cannot serve
UNSUPPORTED = {
    "mamba": {
        "model_type": "mamba",
        "vocab_size": V,
        "hidden_size": 64,
        "intermediate_size": 128,
        "state_size": 8,
        "num_hidden_layers": 2,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "time_step_rank": 4,
    },
    "lfm2": {
        "model_type": "lfm2",
        "vocab_size": V,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "block_dim": 64,
        "block_ff_dim": 128,
        "block_multiple_of": 16,
        "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False,
        "full_attn_idxs": [1],
    },
    "qwen3_next": {
        "model_type": "qwen3_next",
        **BASE,
        **MOE,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "shared_expert_intermediate_size": 32,
        "mlp_only_layers": [],
        "partial_rotary_factor": 0.5,
        "full_attention_interval": 2,
    },
    "falcon_h1": {
        "model_type": "falcon_h1",
        **BASE,
        "mamba_d_ssm": 64,
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 8,
        "mamba_chunk_size": 8,
        "mamba_n_groups": 1,
    },
    "granitemoehybrid": {
        "model_type": "granitemoehybrid",
        **BASE,
        "attention_bias": False,
        "embedding_multiplier": 1.0,
        "attention_multiplier": 0.25,
        "logits_scaling": 1.0,
        "residual_multiplier": 1.0,
        "layer_types": ["mamba", "attention"],
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_proj_bias": False,
        "mamba_d_state": 8,
        "mamba_d_conv": 4,
        "mamba_n_groups": 1,
        "mamba_conv_bias": True,
        "shared_intermediate_size": 128,
    },
    "ministral3": {
        "model_type": "ministral3",
        **BASE,
        "rope_parameters": {"rope_theta": 10000.0, "llama_4_scaling_beta": 0.1, "original_max_position_embeddings": 8},
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_ctx": 512,
        "n_embd": 64,
        "n_head": 4,
        "n_layer": 2,
        "n_positions": 512,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": V,
    },
}

_MODELS = {}


def build(config: dict, seed: int = 0, bits=None) -> nn.Module:
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    # random norms and biases too, so scalings and offsets are exercised
    model.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), model.parameters()))
    # small token embeddings: a tied random model otherwise repeats its input
    # (its embedding dominates the residual stream, the head is its transpose)
    lm = getattr(model, "language_model", model)
    embed = getattr(getattr(lm, "model", None), "embed_tokens", None)
    if embed is not None:
        embed.weight = 0.1 * embed.weight
    if bits is not None:
        nn.quantize(model, group_size=32, bits=bits)
    mx.eval(model.parameters())
    return model


def family_config(name: str) -> dict:
    model_type, overrides = FAMILIES[name]
    if "text_config" in overrides:
        return {"model_type": model_type, "vocab_size": V, **overrides}
    return {"model_type": model_type, **BASE, **overrides}


def mtp_for(name: str, bits=None, k: int = 4) -> MTPModel:
    """A cached tiny model with a random, non-zero k-mask adapter."""
    key = (name, bits, k)
    if key not in _MODELS:
        mtp = MTPModel(build(family_config(name), bits=bits), MTPConfig(num_masks=k))
        mx.random.seed(1)
        mtp.update(tree_map(lambda x: 0.2 * mx.random.normal(x.shape), mtp.trainable_parameters()))
        mx.eval(mtp.parameters())
        _MODELS[key] = mtp
    return _MODELS[key]


def prompt_of(length: int, seed: int = 0):
    return np.random.default_rng(seed).integers(0, V, length).tolist()


def reference(model, prompt, n):
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def oracle_draft(mtp: MTPModel, sequence, rate: float, seed: int = 0):
    """Proposes ``sequence[pos]`` where a seeded coin (probability ``rate``)
    says so, the sampler head's choice elsewhere."""
    pad = 64
    good = mx.array(np.random.default_rng(seed).random(len(sequence) + pad) < rate)
    seq = mx.array(list(sequence) + [0] * pad)
    vocab = mx.arange(mtp.vocab_size)

    def draft(prev, z, pos):
        real = mtp.sampler_logits(prev, z)
        use = good[pos] & (pos < len(sequence))
        onehot = (vocab[None] == seq[pos][:, None]).astype(real.dtype) * 1e4
        return mx.where(use[:, None], onehot, real)

    return draft


def decode(mtp, prompt, n, **kwargs):
    steps = list(decoder_for(mtp, **kwargs).steps(prompt, max_tokens=n))
    return [t for s in steps for t in s.tokens], steps


def check_greedy(mtp: MTPModel, reference_model: nn.Module, k: int):
    prompt = prompt_of(11, seed=k)
    n = 2 + 3 * (k + 1)
    ref = reference(reference_model, prompt, n + 8)
    assert len(set(ref)) > 2, "degenerate reference"
    for mode in ("quadratic", "linear"):
        for rate in (0.6, 1.0):
            draft = oracle_draft(mtp, prompt + ref, rate, seed=k)
            got, steps = decode(mtp, prompt, n, num_masks=k, mode=mode, draft_fn=draft)
            assert got == ref[:n], (mode, rate)
            accepted = [s.accepted for s in steps[1:]]
            if rate == 1.0:
                assert accepted[:3] == [k] * 3, (mode, accepted)
            elif k > 1:
                assert any(a < k for a in accepted), (mode, accepted)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_equals_mlx_lm(name, k):
    mtp = mtp_for(name)
    check_greedy(mtp, build(family_config(name)), k)


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_greedy_equals_mlx_lm(name):
    mtp = mtp_for(name, bits=4)
    check_greedy(mtp, build(family_config(name), bits=4), 4)


def _prefilled(mtp, tokens):
    cache = mtp.make_cache()
    mtp(mx.array([tokens]), cache)
    commit(cache)
    return cache


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_masks_match_contiguous_reference_and_lora_leaves_regular_logits(name):
    """Quadratic layout over a prefilled cache longer than the window: each
    block's masks equal [prefix, m_1..m_k] as one causal sequence; the regular
    tokens' logits equal mlx-lm's, and are bit for bit the same with LoRA B
    changed (gated LoRA adds exact zeros there)."""
    k = 3
    mtp = mtp_for(name, k=k)
    prompt = prompt_of(14, seed=5)
    committed, fed = prompt[:11], prompt[11:]
    layout = quadratic_layout(fed, k)
    h = mtp.forward_layout(layout, _prefilled(mtp, committed))[0]
    for b in range(len(fed)):
        tokens = mx.array([committed + fed[: b + 1] + [-j for j in range(1, k + 1)]])
        ref = mtp(tokens, gate=tokens[0] < 0)[0, -k:]
        start = b * (k + 1) + 1
        assert mx.abs(h[start : start + k] - ref).max().item() <= 1e-4, b

    regular = mx.array(layout.regular)
    before = mtp.lm_head(h)[regular]
    ref = build(family_config(name))(mx.array([prompt]))[0, len(committed) :]
    assert mx.abs(before - ref).max().item() <= 1e-4
    lora_b = {n: v for n, v in mtp.adapter_parameters().items() if n.endswith("lora_b")}
    assert lora_b
    mtp.load_weights([(n, v + 0.5) for n, v in lora_b.items()], strict=False)
    try:
        after = mtp.lm_head(mtp.forward_layout(layout, _prefilled(mtp, committed))[0])
    finally:
        mtp.load_weights(list(lora_b.items()), strict=False)
    assert mx.array_equal(after[regular], before).item()
    masks = mx.array(np.flatnonzero(np.array(layout.gate)))
    assert mx.abs(after[masks] - mtp.lm_head(h)[masks]).max().item() > 1e-3


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_two_training_steps(name):
    k = 2
    mtp = MTPModel(build(family_config(name)), MTPConfig(num_masks=k))
    seqs = [(prompt_of(14, seed=s), 4) for s in range(3)]
    examples = [build_example(x, p, k) for x, p in seqs]
    args = TrainArgs(batch_size=3, iters=2, warmup=0, progress=False, mask_chunk=0)
    trainer = Trainer(mtp, Dataset(examples), None, args)
    before = {n: np.array(v) for n, v in mtp.adapter_parameters().items()}
    for step in range(2):
        terms, _, _ = trainer.train_step(step)
        assert terms and all(math.isfinite(v) for v in terms.values()), terms
    after = mtp.adapter_parameters()
    assert any(not np.array_equal(before[n], np.array(after[n])) for n in before)


def test_default_lora_keys_follow_the_model():
    keys = {name: mtp_for(name).config.lora.keys for name in ("llama", "phi3", "starcoder2", "qwen3_moe")}
    assert keys["llama"] == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    assert keys["phi3"] == ["self_attn.o_proj", "mlp.down_proj", "mlp.gate_up_proj", "self_attn.qkv_proj"]
    assert keys["starcoder2"] == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.c_fc",
        "mlp.c_proj",
    ]
    # the MoE block's router is left out; its experts are not nn.Linear; the dense block keeps its MLP
    assert "mlp.gate" not in keys["qwen3_moe"] and "mlp.gate_proj" in keys["qwen3_moe"]


def test_adapter_round_trip_on_another_family(tmp_path):
    mtp = mtp_for("phi3")
    save_adapter(mtp, tmp_path)
    loaded = load_adapter(build(family_config("phi3")), tmp_path)
    assert loaded.config.lora.keys == mtp.config.lora.keys
    for n, v in mtp.adapter_parameters().items():
        assert mx.array_equal(loaded.adapter_parameters()[n], v).item(), n


# --- families the adapter cannot serve ------------------------------------------


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_family_refused_with_reason(name, tmp_path):
    base = build(UNSUPPORTED[name])
    support = supports(base)
    assert not support.supported
    reason = {"gpt2": "no token embedding", "ministral3": "outside RoPE"}.get(name, "recurrent or state-space")
    assert reason in support.reason
    with pytest.raises(UnsupportedModelError, match=reason) as e:
        MTPModel(base, MTPConfig(num_masks=2))
    assert isinstance(e.value, MTPError)
    # an adapter made for another model: the reason comes first
    save_adapter(mtp_for("llama"), tmp_path)
    with pytest.raises(UnsupportedModelError, match=reason):
        load_adapter(base, tmp_path)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_family_decodes_plainly(name, capfd):
    base = build(UNSUPPORTED[name])
    prompt = prompt_of(9, seed=2)
    ref = reference(base, prompt, 12)
    mtp = MTPModel(base)
    got, steps = decode(mtp, prompt, 12, lookup=4)
    assert got == ref
    assert all(len(s.tokens) == 1 and s.proposed == 0 for s in steps)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"notice: model type '{name}' decodes without speculation")


# --- python -m mlx_mtp.check ------------------------------------------------------


def _save(config: dict, path):
    from mlx_lm.utils import save_config, save_model

    save_model(path, build(config))
    save_config(dict(config), path / "config.json")
    return path


def test_check_on_a_local_model_directory(tmp_path, capsys):
    from mlx_mtp.check import main

    path = _save(family_config("gemma3_text"), tmp_path / "gemma3")
    assert main(["--model", str(path), "--rank", "4", "--num-masks", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "model type: gemma3_text, 2 blocks"
    assert out[1] == "supported: yes"
    assert "1 sliding-window blocks" in out[2]
    # 7 projections x 2 blocks, rank 4: q (64->64), k, v (64->32), o (64->64), gate, up (64->128), down (128->64)
    assert out[3].startswith("adapter wraps: 14 linear layers in 2 blocks: self_attn.q_proj")
    lora = 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert f"(LoRA {lora:,};" in out[4]
    assert out[-1] == "self-test: passed"
    assert sum("identical to mlx-lm" in line for line in out) == 4


def test_check_unsupported_and_missing_models(tmp_path, capsys):
    from mlx_mtp.check import main

    path = _save(UNSUPPORTED["mamba"], tmp_path / "mamba")
    assert main(["--model", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("supported: no: layer 0 keeps an mlx-lm ArraysCache")
    assert main(["--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no model at")


@pytest.mark.real_model
def test_check_on_the_default_model(default_model_path, capsys):
    from mlx_mtp.check import main

    assert main(["--no-self-test"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["model type: llama, 30 blocks", "supported: yes"]
    assert out[3].startswith("adapter wraps: 210 linear layers in 30 blocks")


@pytest.mark.parametrize("name", ["gemma2", "llama"])
def test_batched_masked_forward_equals_each_row(name):
    """A batch of 2 rows (= gemma2's kv heads here, where a mask broadcast
    against the heads would go unnoticed) with a different mask and positions
    per row, as training chunks have, equals each row run alone."""
    mtp = mtp_for(name, k=3)
    tokens = mx.array([prompt_of(6, seed=1), prompt_of(6, seed=2)])
    tokens[:, 3:] = mx.array([[-1, -2, -3]] * 2)
    positions = mx.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, 1, 2, 3]])
    causal = np.tril(np.ones((6, 6), dtype=bool))
    other = causal.copy()
    other[3:, 1:3] = False  # the second row's masks follow token 0 only
    mask = mx.array(np.stack([causal, other]))
    gate = tokens < 0
    h = mtp(tokens, None, positions, mask, gate)
    for b in range(2):
        row = mtp(tokens[b : b + 1], None, positions[b : b + 1], mask[b : b + 1], gate[b : b + 1])
        assert mx.abs(h[b] - row[0]).max().item() <= 1e-5, b


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_packed_rows_equal_each_row_alone(name):
    """Rows of different cache lengths (some past the sliding window) and
    layouts (plain, linear with masks, a quadratic block, a tree) in one
    packed forward: each row's hidden states equal its own forward's, and a
    continuous batch decodes each row's greedy tokens as mlx-lm does."""
    from mlx_mtp.decoding.batch import BatchDecoder
    from mlx_mtp.decoding.settings import DecodeSettings
    from mlx_mtp.model.layouts import block_layout, linear_layout
    from mlx_mtp.model.rows import Feed

    k = 3
    mtp = mtp_for(name, k=k)
    assert mtp.packs_rows
    block = quadratic_layout([5, 6, 7], k)
    tree = block_layout([3, 4, 9, 8], k, (True, False, True, True), (-1, 0, 1, 0))
    linear = linear_layout([9, 10], k)
    feeds = [
        Feed(mx.array([3])),
        Feed(block.tokens, block.positions, block.mask, block.gate),
        Feed(linear.tokens, gate=linear.gate),
        Feed(tree.tokens, tree.positions, tree.mask, tree.gate),
        Feed(mx.array([1, 2, 3, 4])),
    ]
    prompts = [prompt_of(n, seed=n) for n in (5, 12, 3, 20, 9)]
    packed = mtp.forward_rows(feeds, [_prefilled(mtp, p) for p in prompts])
    for feed, prompt, h in zip(feeds, prompts, packed):
        alone = mtp(feed.tokens[None], _prefilled(mtp, prompt), feed.positions, feed.mask, feed.gate)[0]
        assert h.shape == alone.shape
        assert mx.abs(h - alone).max().item() <= 1e-4

    batch = BatchDecoder(mtp, DecodeSettings(num_masks=k, mode="quadratic", lookup=0))
    for i, prompt in enumerate(prompts[:3]):
        batch.add(i, prompt, 6 + 3 * i)
    got = {i: [] for i in range(3)}
    while len(batch):
        for event in batch.step():
            got[event.uid] += event.step.tokens
    base = build(family_config(name))
    assert [got[i] for i in range(3)] == [reference(base, p, 6 + 3 * i) for i, p in enumerate(prompts[:3])]


def test_packed_rows_run_an_unlisted_own_attention_whole_row_by_row(monkeypatch):
    """An attention that uses the mask itself (latent attention's positional
    scores) and is not listed: the first packed forward fails inside it, and
    from then on the model's attention runs whole, row by row."""
    import importlib

    import mlx_mtp.model.rows as rows
    from mlx_mtp.model.layouts import quadratic_layout as layout_of
    from mlx_mtp.model.rows import Feed

    module = importlib.import_module("mlx_lm.models.glm4_moe_lite")
    monkeypatch.setattr(module, "scaled_dot_product_attention", module.scaled_dot_product_attention)
    monkeypatch.setattr(rows, "OWN_ATTENTION", ())
    mtp = MTPModel(build(family_config("glm4_moe_lite")), MTPConfig(num_masks=2))
    assert module.scaled_dot_product_attention._mtp_rows
    block = layout_of([5, 6], 2)
    feeds = [Feed(mx.array([3])), Feed(block.tokens, block.positions, block.mask, block.gate)]
    prompts = [prompt_of(n, seed=n) for n in (4, 9)]
    packed = mtp.forward_rows(feeds, [_prefilled(mtp, p) for p in prompts])
    assert getattr(type(mtp.layers[0].self_attn), "_mtp_row_aware", False)
    for feed, prompt, h in zip(feeds, prompts, packed):
        alone = mtp(feed.tokens[None], _prefilled(mtp, prompt), feed.positions, feed.mask, feed.gate)[0]
        assert mx.abs(h - alone).max().item() <= 1e-4
