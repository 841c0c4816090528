"""Prompt caches: :class:`SpecCache` under mlx-lm's cache protocol (its
save/load/trim functions), and chat sessions through the API that reuse a
prompt cache with output identical to fresh runs."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, load_prompt_cache, save_prompt_cache, trim_prompt_cache

from mlx_mtp.model.cache import SpecCache, commit
from tiny import tiny_mtp


@pytest.fixture(scope="module")
def mtp():
    return tiny_mtp("qwen3", num_masks=3, tie_word_embeddings=False)


def tokens(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 128, n), dtype=mx.int32)


def prefilled(mtp, ids):
    cache = mtp.make_cache()
    mtp(ids[None], cache)
    commit(cache)
    return cache


def next_logits(mtp, cache, ids):
    """Logits of ``ids`` fed after ``cache`` (committed afterwards)."""
    out = mtp.logits(ids[None], cache)[0]
    commit(cache)
    return out


def test_save_and_load_prompt_cache_with_mlx_lm(mtp, tmp_path):
    ids, more = tokens(11), tokens(4, seed=1)
    cache = prefilled(mtp, ids)
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, cache, {"note": "x"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"note": "x"}
    assert [type(c) for c in loaded] == [SpecCache] * len(cache)
    assert [c.committed for c in loaded] == [11] * len(cache)
    assert mx.array_equal(next_logits(mtp, loaded, more), next_logits(mtp, cache, more))
    # an empty cache round-trips too
    save_prompt_cache(path, mtp.make_cache())
    empty = load_prompt_cache(path)
    assert all(c.empty() and c.committed == 0 for c in empty)
    assert mx.allclose(next_logits(mtp, empty, ids), next_logits(mtp, mtp.make_cache(), ids), atol=1e-5)


def test_state_setter_and_meta_state(mtp):
    cache = prefilled(mtp, tokens(7))
    copy = [SpecCache.from_state(c.state, c.meta_state) for c in cache]
    assert [c.committed for c in copy] == [7] * len(cache)
    assert copy[0].state[0].shape == cache[0].state[0].shape
    with pytest.raises(ValueError, match="no meta state"):
        copy[0].meta_state = "x"


def test_trim_prompt_cache_equals_a_shorter_prefill(mtp):
    ids, more = tokens(12), tokens(3, seed=2)
    cache = prefilled(mtp, ids)
    assert trim_prompt_cache(cache, 5) == 5
    assert [c.committed for c in cache] == [7] * len(cache)
    assert mx.allclose(next_logits(mtp, cache, more), next_logits(mtp, prefilled(mtp, ids[:7]), more), atol=1e-5)
    assert trim_prompt_cache(cache, 100) == 10  # no more than it holds


def test_trim_drops_pending_entries(mtp):
    """Entries fed but not committed lie after the committed ones: a trim
    drops them, so a later commit cannot keep stale entries."""
    ids, more = tokens(9), tokens(3, seed=3)
    cache = prefilled(mtp, ids)
    mtp(tokens(4, seed=4)[None], cache)  # pending, never committed
    assert cache[0].pending == 4
    assert trim_prompt_cache(cache, 2) == 2
    assert cache[0].pending == 0 and cache[0].committed == 7
    commit(cache)  # nothing pending: a no-op
    assert cache[0].committed == 7
    assert mx.allclose(next_logits(mtp, cache, more), next_logits(mtp, prefilled(mtp, ids[:7]), more), atol=1e-5)


def test_commit_checks_indices_before_gathering(mtp):
    cache = prefilled(mtp, tokens(5))
    mtp(tokens(3, seed=5)[None], cache)
    with pytest.raises(ValueError, match="out of range"):
        commit(cache, [0, 5])
    with pytest.raises(ValueError, match="cannot commit 4 entries, 3 are pending"):
        cache[0].commit([0, 1, 2, 2])
    assert cache[0].committed == 5 and cache[0].pending == 3  # unchanged
