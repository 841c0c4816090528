"""Exactness of the MTP forward over mlx-lm models, gated LoRA, the
selective-commit cache and adapter files (tiny random models)."""

import json
import os
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_mtp.adapter import AdapterError, load_adapter, save_adapter
from mlx_mtp.errors import WriteError
from mlx_mtp.model.cache import commit
from mlx_mtp.model.gated_lora import GatedLoRALinear, LoRAConfig
from mlx_mtp.model.layouts import linear_layout, quadratic_layout, training_layout
from mlx_mtp.model.mtp_model import MTPConfig, MTPModel

from conftest import decoder_for
from tiny import MODEL_TYPES, randomize_adapter, tiny_model, tiny_mtp

PROMPT = [3, 17, 42, 99, 5, 64, 7, 120, 33]


def base_logits(mtp: MTPModel, tokens) -> mx.array:
    """The unwrapped mlx-lm model's own logits (LoRA gate off)."""
    return mtp.model(mx.array([tokens]))[0]


def prefilled(mtp: MTPModel, tokens):
    cache = mtp.make_cache()
    mtp(mx.array([tokens]), cache)
    commit(cache)
    return cache


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("builder", [linear_layout, quadratic_layout])
@pytest.mark.parametrize("prefix", [0, 4])
def test_regular_positions_equal_base_model(model_type, builder, prefix):
    mtp = tiny_mtp(model_type, num_masks=3)
    ref = base_logits(mtp, PROMPT)
    cache = prefilled(mtp, PROMPT[:prefix]) if prefix else mtp.make_cache()
    layout = builder(PROMPT[prefix:], 3)
    logits = mtp.lm_head(mtp.forward_layout(layout, cache))[0]
    got = logits[mx.array(layout.regular)]
    assert got.shape == (len(PROMPT) - prefix, 128)
    assert mx.abs(got - ref[prefix:]).max().item() <= 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_regular_positions_quantized_argmax(bits):
    mtp = tiny_mtp("llama", num_masks=4, bits=bits)
    assert isinstance(mtp.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    ref = base_logits(mtp, PROMPT)
    layout = quadratic_layout(PROMPT, 4)
    logits = mtp.lm_head(mtp.forward_layout(layout, mtp.make_cache()))[0]
    got = logits[mx.array(layout.regular)]
    np.testing.assert_array_equal(np.array(got.argmax(-1)), np.array(ref.argmax(-1)))


def contiguous_mask_hidden(mtp: MTPModel, prefix, k):
    """Reference: [prefix, m_1..m_k] as one plain causal sequence, LoRA on masks."""
    tokens = mx.array([list(prefix) + [-j for j in range(1, k + 1)]])
    h = mtp(tokens, gate=tokens[0] < 0)
    return h[0, -k:]


LLAMA3_ROPE = {
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
}


@pytest.mark.parametrize("model_type,overrides", [("llama", {}), ("qwen3", {}), ("llama", LLAMA3_ROPE)])
def test_quadratic_masks_match_contiguous_reference(model_type, overrides):
    k = 3
    mtp = tiny_mtp(model_type, num_masks=k, **overrides)
    committed, fed = PROMPT[:5], PROMPT[5:8]
    layout = quadratic_layout(fed, k)
    h = mtp.forward_layout(layout, prefilled(mtp, committed))[0]
    for b in range(len(fed)):
        ref = contiguous_mask_hidden(mtp, committed + fed[: b + 1], k)
        start = b * (k + 1) + 1
        assert mx.abs(h[start : start + k] - ref).max().item() <= 1e-5


def test_training_layout_masks_match_contiguous_reference():
    k = 2
    mtp = tiny_mtp("llama", num_masks=k)
    lay = training_layout(PROMPT[:6], k, loss_start=2)
    tokens = mx.array(lay.tokens)
    h = mtp(tokens, positions=mx.array(lay.positions), mask=mx.array(lay.mask), gate=tokens < 0)[0]
    regular = np.flatnonzero(lay.tokens >= 0)
    ref = mtp(mx.array([PROMPT[:6]]))[0]
    assert mx.abs(h[mx.array(regular)] - ref).max().item() <= 1e-5
    for r, idx in enumerate(regular):
        if idx + 1 < len(lay.tokens) and lay.tokens[idx + 1] < 0:
            refm = contiguous_mask_hidden(mtp, PROMPT[: r + 1], k)
            assert mx.abs(h[idx + 1 : idx + 1 + k] - refm).max().item() <= 1e-5


def test_lora_changes_mask_positions_only():
    mtp = tiny_mtp("llama", num_masks=3)
    layout = quadratic_layout(PROMPT[:4], 3)
    before = mtp.lm_head(mtp.forward_layout(layout, mtp.make_cache()))[0]
    lora = {k: v for k, v in mtp.adapter_parameters().items() if "lora_b" in k}
    mtp.load_weights([(k, v + 0.5) for k, v in lora.items()], strict=False)
    after = mtp.lm_head(mtp.forward_layout(layout, mtp.make_cache()))[0]
    gate = np.array(layout.gate)
    diff = np.array(mx.abs(after - before).max(-1))
    assert (diff[~gate] == 0).all()
    assert (diff[gate] > 1e-3).all()


def test_runs_without_adapter():
    model = tiny_model("qwen2")
    ref = model(mx.array([PROMPT]))[0]
    mtp = MTPModel(model)
    assert mtp.num_masks == 0 and mtp.adapter_parameters() == {}
    cache = prefilled(mtp, PROMPT[:3])
    got = mtp.logits(
        mx.array(PROMPT[3:]), cache, positions=mx.arange(6), mask=mx.tril(mx.ones((6, 6), dtype=mx.bool_))
    )[0]
    assert mx.abs(got - ref[3:]).max().item() <= 1e-5


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_selective_commit_equals_fresh_model(model_type):
    k = 2
    mtp = tiny_mtp(model_type, num_masks=k)
    committed, fed = PROMPT[:4], PROMPT[4:7]
    cache = prefilled(mtp, committed)
    layout = quadratic_layout(fed, k)
    mx.eval(mtp.forward_layout(layout, cache))
    # keep the first two regular tokens (accepted); drop masks and the third
    keep = list(layout.regular[:2])
    assert keep == [0, k + 1]
    commit(cache, keep)
    assert cache[0].committed == len(committed) + 2
    nxt = 11
    got = mtp.logits(mx.array([nxt]), cache)[0, -1]
    ref = base_logits(mtp, committed + fed[:2] + [nxt])[-1]
    assert mx.abs(got - ref).max().item() <= 1e-5
    # a prefix commit (linear mode) takes the slice path
    cache = prefilled(mtp, committed)
    mx.eval(mtp.forward_layout(linear_layout(fed, k), cache))
    commit(cache, [0, 1])
    got = mtp.logits(mx.array([nxt]), cache)[0, -1]
    ref = base_logits(mtp, committed + fed[:2] + [nxt])[-1]
    assert mx.abs(got - ref).max().item() <= 1e-5


def test_commit_more_than_pending_fails():
    mtp = tiny_mtp("llama")
    cache = prefilled(mtp, PROMPT[:2])
    mx.eval(mtp(mx.array([[1]]), cache))
    with pytest.raises(ValueError):
        cache[0].commit([0, 1])


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_gated_lora_formula(bits):
    mx.random.seed(3)
    linear = nn.Linear(64, 32)
    if bits:
        linear = nn.QuantizedLinear.from_linear(linear, group_size=32, bits=bits)
    from mlx_mtp.model.gated_lora import Gate

    gate = Gate()
    lora = GatedLoRALinear(linear, gate, rank=4, scale=2.5)
    assert lora.lora_a.shape == (64, 4) and lora.lora_b.shape == (4, 32)
    assert (lora.lora_b == 0).all().item()
    lora.lora_b = mx.random.normal((4, 32))
    x = mx.random.normal((1, 5, 64))
    g = mx.array([0, 1, 0, 1, 1], dtype=mx.float32)[None, :, None]
    gate.value = g
    y = lora(x)
    expected = linear(x) + g * 2.5 * ((x @ lora.lora_a) @ lora.lora_b)
    assert mx.abs(y - expected).max().item() <= 1e-5
    gate.value = None
    assert mx.array_equal(lora(x), linear(x)).item()


def test_apply_lora_keys_layers_and_freezing():
    model = tiny_model("llama", num_hidden_layers=3)
    cfg = MTPConfig(num_masks=2, lora=LoRAConfig(rank=4, keys=["self_attn.q_proj", "mlp.down_proj"], layers=[0, 2]))
    mtp = MTPModel(model, cfg)
    names = sorted(mtp.adapter_parameters())
    lora_names = [n for n in names if "lora" in n]
    assert lora_names == [
        f"model.model.layers.{i}.{key}.{ab}"
        for i in (0, 2)
        for key in ("mlp.down_proj", "self_attn.q_proj")
        for ab in ("lora_a", "lora_b")
    ]
    assert "masks.weight" in names and "sampler.layers.0.linear.weight" in names
    assert not isinstance(mtp.layers[1].self_attn.q_proj, GatedLoRALinear)
    with pytest.raises(ValueError, match="no projection named"):
        MTPModel(tiny_model("llama"), MTPConfig(lora=LoRAConfig(keys=["self_attn.nope"])))


def test_sampler_logits_shape():
    mtp = tiny_mtp("llama", num_masks=2)
    z = mx.random.normal((1, 3, 64))
    assert mtp.sampler_logits(mx.array([[1, 2, 3]]), z).shape == (1, 3, 128)


def test_adapter_round_trip_bit_exact(tmp_path):
    mtp = tiny_mtp("qwen3", num_masks=4)
    save_adapter(mtp, tmp_path / "ad", recipe={"note": "test"})
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapters.safetensors"]
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["num_masks"] == 4 and config["base_model"]["hidden_size"] == 64
    assert config["base_model"]["model_type"] == "qwen3"
    loaded = load_adapter(tiny_model("qwen3"), tmp_path / "ad")
    a, b = mtp.adapter_parameters(), loaded.adapter_parameters()
    assert sorted(a) == sorted(b)
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name
    layout = quadratic_layout(PROMPT[:3], 4)
    ha = mtp.forward_layout(layout, mtp.make_cache())
    hb = loaded.forward_layout(layout, loaded.make_cache())
    assert mx.array_equal(ha, hb).item()


def test_adapter_for_other_model_rejected(tmp_path):
    save_adapter(tiny_mtp("llama"), tmp_path / "ad")
    with pytest.raises(AdapterError, match="hidden_size=64.*hidden_size=32"):
        load_adapter(tiny_model("llama", hidden_size=32, head_dim=8), tmp_path / "ad")
    with pytest.raises(AdapterError, match="num_layers=2.*num_layers=3"):
        load_adapter(tiny_model("llama", num_hidden_layers=3), tmp_path / "ad")
    with pytest.raises(AdapterError, match="vocab_size"):
        load_adapter(tiny_model("llama", vocab_size=64), tmp_path / "ad")


def test_adapter_shape_mismatch_names_tensor(tmp_path):
    mtp = tiny_mtp("llama", num_masks=2)
    save_adapter(mtp, tmp_path / "ad")
    weights = dict(mx.load(str(tmp_path / "ad" / "adapters.safetensors")))
    mx.eval(weights)
    name = "model.model.layers.1.self_attn.v_proj.lora_a"
    weights[name] = mx.zeros((64, 5))
    mx.save_safetensors(str(tmp_path / "ad" / "adapters.safetensors"), weights)
    with pytest.raises(AdapterError, match=rf"'{name}' has shape \(64, 5\) in the adapter but \(64, 16\)"):
        load_adapter(tiny_model("llama"), tmp_path / "ad")
    del weights[name]
    mx.save_safetensors(str(tmp_path / "ad" / "adapters.safetensors"), weights)
    with pytest.raises(AdapterError, match=f"missing tensors: {name}"):
        load_adapter(tiny_model("llama"), tmp_path / "ad")


def test_adapter_missing_or_bad_config(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        load_adapter(tiny_model("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{nope")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(tiny_model("llama"), tmp_path)


def test_failed_save_leaves_previous_adapter(tmp_path, monkeypatch):
    mtp = tiny_mtp("llama", num_masks=2)
    save_adapter(mtp, tmp_path / "ad")
    before = (tmp_path / "ad" / "adapters.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", boom)
    randomize_adapter(mtp, seed=9)
    with pytest.raises(WriteError, match="disk full.*previous file is unchanged"):
        save_adapter(mtp, tmp_path / "ad")
    assert (tmp_path / "ad" / "adapters.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapters.safetensors"]


@pytest.mark.parametrize("bits", [None, 4])
def test_draft_vocab_restricts_sampler_and_round_trips(tmp_path, bits):
    mtp = tiny_mtp("llama", num_masks=2, bits=bits)
    prev, z = mx.array([[1, 2, 3]]), mx.random.normal((1, 3, 64))
    full = mtp.sampler_logits(prev, z)
    ids = mx.array([0, 5, 7, 100, 127])
    mtp.set_draft_vocab(ids)
    sub = mtp.sampler_logits(prev, z)
    assert sub.shape == full.shape
    assert mx.allclose(sub[..., ids], full[..., ids], atol=1e-5).item()
    outside = np.ones(128, dtype=bool)
    outside[np.array(ids)] = False
    assert np.isneginf(np.array(sub)[..., outside]).all()
    save_adapter(mtp, tmp_path / "ad")
    loaded = load_adapter(tiny_model("llama", bits=bits), tmp_path / "ad")
    assert loaded.draft_vocab.tolist() == ids.tolist()
    assert mx.array_equal(loaded.sampler_logits(prev, z), sub).item()
    with pytest.raises(ValueError, match="draft vocabulary ids"):
        mtp.set_draft_vocab(mx.array([128]))


def test_adapter_decode_num_masks_default(tmp_path):
    from dataclasses import replace

    mtp = tiny_mtp("llama", num_masks=4)
    assert mtp.default_num_masks == 4  # nothing recorded: the trained k
    mtp.config = replace(mtp.config, decode_num_masks={"cpu": 2, "gpu": 3})
    save_adapter(mtp, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["decode_num_masks"] == {"cpu": 2, "gpu": 3}
    loaded = load_adapter(tiny_model("llama"), tmp_path / "ad")
    expected = 3 if mx.default_device().type == mx.DeviceType.gpu else 2
    assert loaded.default_num_masks == expected
    assert decoder_for(loaded).k == expected
    assert decoder_for(loaded, num_masks=4).k == 4  # asking still wins
    config["decode_num_masks"] = {"cpu": 5}
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="decode_num_masks"):
        load_adapter(tiny_model("llama"), tmp_path / "ad")


def test_skip_sampler_starts_as_lm_head_and_gets_gradients():
    import mlx.nn as nn_

    from mlx_mtp.model.sampler import SamplerConfig, SamplerHead

    head = SamplerHead(64, SamplerConfig(skip=True))
    prev, z = mx.random.normal((5, 64)), mx.random.normal((5, 64))
    assert mx.array_equal(head(prev, z), z).item()
    target = mx.random.normal((5, 64))

    def loss(params):
        head.update(params)
        return ((head(prev, z) - target) ** 2).mean()

    grads = dict(tree_flatten(mx.grad(loss)(head.trainable_parameters())))
    assert mx.any(grads["layers.0.norm.weight"] != 0).item()
    # the plain head of the paper starts elsewhere
    plain = SamplerHead(64, SamplerConfig(skip=False))
    assert not mx.allclose(plain(prev, z), z).item()
    assert isinstance(plain.layers[0].linear, nn_.Linear)


def test_save_into_read_only_directory_keeps_adapter(tmp_path, monkeypatch):
    """A read-only target (simulated: root ignores permissions): one line, old files kept."""
    import errno
    import tempfile

    mtp = tiny_mtp("llama", num_masks=2)
    save_adapter(mtp, tmp_path / "ad")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(WriteError) as e:
        save_adapter(randomize_adapter(mtp, seed=5), tmp_path / "ad")
    assert str(e.value).endswith("Read-only file system (the previous file is unchanged)")
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()} == before


def test_truncated_adapter_is_one_line(tmp_path):
    """The issue's case: a truncated adapters.safetensors ends in AdapterError naming the file."""
    save_adapter(tiny_mtp("llama", num_masks=2), tmp_path / "ad")
    weights = tmp_path / "ad" / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterError, match=r"adapters.safetensors: tensor '.*': .*past the end of the file"):
        load_adapter(tiny_model("llama"), tmp_path / "ad")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda w: w.__setitem__("masks.weight", w["masks.weight"].astype(mx.int32)), "not a floating-point type"),
        (lambda w: w.__setitem__("extra", mx.zeros(3)), "unexpected tensors: extra"),
        (lambda w: w.__setitem__("draft_vocab", mx.zeros((2, 2))), "'draft_vocab' is not a 1-D array of token ids"),
        (lambda w: w.__setitem__("masks.weight", mx.full(w["masks.weight"].shape, float("nan"))), "NaN or infinite"),
    ],
    ids=["int-dtype", "extra-tensor", "draft-vocab-2d", "nan"],
)
def test_adapter_tensors_checked(tmp_path, edit, message):
    save_adapter(tiny_mtp("llama", num_masks=2), tmp_path / "ad")
    path = tmp_path / "ad" / "adapters.safetensors"
    weights = dict(mx.load(str(path)))
    edit(weights)
    mx.save_safetensors(str(path), weights)
    with pytest.raises(AdapterError, match=message):
        load_adapter(tiny_model("llama"), tmp_path / "ad")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_masks", 10**9, "num_masks is 1000000000, not an integer in 1..16"),
        ("lora", {"rank": 10**6}, "lora rank 1000000 (rank) is more than the model's hidden size 64"),
        ("lora", {"keys": "q_proj"}, "lora.keys is not a list"),
        ("sampler", {"eps": -1}, "sampler.eps is -1"),
        ("base_model", [], "base_model is not an object"),
    ],
)
def test_adapter_config_checked(tmp_path, key, value, message):
    import json

    save_adapter(tiny_mtp("llama", num_masks=2), tmp_path / "ad")
    cfg_file = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=re.escape(message)):
        load_adapter(tiny_model("llama"), tmp_path / "ad")
