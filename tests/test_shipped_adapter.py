"""The adapter shipped for the default model, on the real SmolLM2-135M."""

import json

import mlx.core as mx
import pytest
from mlx_lm import stream_generate as lm_stream_generate

from mlx_mtp import load, stream_generate
from mlx_mtp.loading import ADAPTERS_DIR, find_shipped_adapter

SHIPPED = ADAPTERS_DIR / "smollm2-135m-instruct"
# the masks alone on the two prompts below, 48 tokens each: a floor under the shipped
# adapter's measured figure (docs/adapter.md)
MASKS_ALONE_MIN_TOKENS_PER_STEP = 1.6


def test_shipped_adapter_files():
    config = json.loads((SHIPPED / "adapter_config.json").read_text())
    assert config["base_model"] == {
        "model_type": "llama",
        "hidden_size": 576,
        "num_layers": 30,
        "vocab_size": 49152,
    }
    assert 1 <= config["num_masks"] <= 16
    assert config["recipe"]["script"] == "examples/train_default_adapter.sh"
    assert (SHIPPED / "adapters.safetensors").stat().st_size <= 25 * 2**20


@pytest.mark.real_model
def test_default_load_uses_shipped_adapter_and_stays_identical(default_model_path):
    model, tokenizer, state = load(str(default_model_path), return_state=True)
    config = json.loads((SHIPPED / "adapter_config.json").read_text())
    assert find_shipped_adapter(model.model) == SHIPPED
    assert model.num_masks == config["num_masks"]
    assert model.draft_vocab is not None
    assert state.datastore is not None and state.datastore.num_tokens == config["recipe"]["datastore_tokens"]
    device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    assert model.default_num_masks == config.get("decode_num_masks", {}).get(device, config["num_masks"])
    for k in sorted({model.default_num_masks, model.num_masks}):
        steps = tokens = 0
        sources = set()
        for text in ("Write a Python function that checks whether a number is even.", "What is 12 times 7?"):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            ref = [r.token for r in lm_stream_generate(model.model, tokenizer, prompt, max_tokens=40)]
            rs = list(stream_generate(model, tokenizer, prompt, max_tokens=40, num_masks=k))
            assert [r.token for r in rs] == ref, k
            assert rs[-1].num_masks == k
            steps += rs[-1].steps
            tokens += len(rs)
            sources |= {r.draft_source for r in rs if r.from_draft}
        # the trained masks do speculate correctly, often, and so does the
        # datastore; at k=0 (CPUs) only copied drafts are verified
        assert tokens / steps > 1.2, k
        assert "datastore" in sources, k
        assert ("mtp" in sources) == (k > 0), k


@pytest.mark.real_model
def test_shipped_masks_alone_speculate_and_stay_identical(default_model_path):
    """The masks with nothing copied (no prompt lookup, no datastore) at the
    adapter's trained k: greedy output equal to mlx-lm's, every accepted draft
    the masks' own, and more than one token a step."""
    model, tokenizer = load(str(default_model_path))
    k = model.num_masks
    steps = tokens = 0
    for text in ("Write a Python function that checks whether a number is even.", "What is 12 times 7?"):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ref = [r.token for r in lm_stream_generate(model.model, tokenizer, prompt, max_tokens=48)]
        rs = list(stream_generate(model, tokenizer, prompt, max_tokens=48, num_masks=k, lookup=0, use_datastore=False))
        assert [r.token for r in rs] == ref
        assert {r.draft_source for r in rs if r.from_draft} == {"mtp"}
        steps += rs[-1].steps
        tokens += len(rs)
    assert tokens / steps > MASKS_ALONE_MIN_TOKENS_PER_STEP
