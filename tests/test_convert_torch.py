"""Parity of ``convert.torch`` against a PyTorch reference (real torch).

A tiny random transformers Llama is saved as an mlx-lm model; random gated
LoRA, sampler head and mask embeddings are applied in PyTorch
(tests/torch_reference.py) and saved as a peft-style and an MTP-GLoRA-style
checkpoint (fused qkv/gate_up, one shared <mask> token). After conversion the
MLX model must give the same logits at every position of ``prompt + k masks``
and the same sampler logits (within 1e-4, fp32), and the same greedy draft
chain on several prompts. Skipped without torch/transformers, except under
CI=true, where a missing torch is a failure.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import need

torch = need("torch", "pip install torch==2.13.0")
need("transformers", "pip install -e '.[parity]'")

import mlx.core as mx
from mlx_lm import load

from convert.mtp_glora import glora_mask_token_id
from convert.torch import convert, main
from mlx_mtp import propose
from mlx_mtp.adapter import load_adapter, read_adapter_config
from mlx_mtp.model.layouts import linear_layout
from mlx_mtp.model.mtp_model import MTPModel

import torch_reference as R

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
PROMPTS = [
    [3, 17, 42, 99, 5, 64, 7],
    [120, 1, 2, 3],
    [55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65],
    [9],
    [100, 27, 81, 27, 100],
]
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch_model = R.tiny_llama(seed=0)
    model_dir = R.save_mlx_model(torch_model, tmp_path_factory.mktemp("model") / "tiny-llama")
    return torch_model, model_dir


def mlx_chain(mtp: MTPModel, prompt, k):
    """Greedy draft chain in MLX: next token + k sampler tokens."""
    layout = linear_layout(prompt, k)
    h = mtp(layout.tokens, None, layout.positions, layout.mask, layout.gate)[0]
    n = len(prompt)
    tokens = [mtp.lm_head(h[n - 1]).argmax().item()]
    for j in range(1, k + 1):
        logits = mtp.sampler_logits(mx.array([tokens[-1]]), h[n - 1 + j][None])
        tokens.append(logits[0].argmax().item())
    return tokens, h


def check_parity(torch_model, adapter, model_dir, adapter_dir):
    """Max |diff| of logits and sampler logits over PROMPTS; chains equal."""
    model, tokenizer = load(str(model_dir))
    mtp = load_adapter(model, adapter_dir)
    k = adapter.num_masks
    assert mtp.num_masks == k
    worst = {"logits": 0.0, "sampler": 0.0}
    for prompt in PROMPTS:
        ref = R.reference(torch_model, adapter, prompt)
        chain, h = mlx_chain(mtp, prompt, k)
        logits = np.array(mtp.lm_head(h))
        n = len(prompt)
        z = h[n : n + k]
        sampler = np.array(mtp.sampler_logits(mx.array(ref.chain[:k]), z))
        worst["logits"] = max(worst["logits"], float(np.abs(logits - ref.logits).max()))
        worst["sampler"] = max(worst["sampler"], float(np.abs(sampler - ref.sampler_logits).max()))
        assert chain == ref.chain, f"prompt {prompt}: MLX chain {chain} != PyTorch chain {ref.chain}"
        assert propose(mtp, tokenizer, prompt) == ref.chain, f"prompt {prompt}: propose() differs"
    print(f"max |diff|: logits {worst['logits']:.2e}, sampler logits {worst['sampler']:.2e}")
    assert worst["logits"] <= TOL and worst["sampler"] <= TOL, worst
    return worst


def test_reference_matches_transformers(base):
    """The reference forward with LoRA off is transformers' own forward."""
    torch_model, _ = base
    prompt = PROMPTS[0]
    with torch.no_grad():
        expected = torch_model(torch.tensor([prompt])).logits[0]
        h = R.hidden_states(torch_model, None, R.embed(torch_model, prompt), torch.zeros(len(prompt)))
        got = R.lm_head(torch_model, h)
    assert (got - expected).abs().max().item() <= 1e-5


def test_peft_cli_parity(base, tmp_path):
    """peft-style checkpoint (bf16 storage, distinct masks), through the CLI."""
    torch_model, model_dir = base
    adapter = R.random_adapter(
        torch_model, num_masks=3, rank=RANK, alpha=ALPHA, rslora=False, fused=False, seed=1, storage=torch.bfloat16
    )
    ckpt = R.save_peft(adapter, tmp_path / "peft", RANK, ALPHA, rslora=False, storage=torch.bfloat16)
    out = tmp_path / "adapter"
    proc = subprocess.run(
        [sys.executable, "-m", "convert.torch", str(ckpt), "--model", str(model_dir), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "converted peft checkpoint" in proc.stdout
    config = read_adapter_config(out)
    assert config["num_masks"] == 3
    assert config["lora"]["rank"] == RANK and config["lora"]["scale"] == ALPHA / RANK
    assert config["lora"]["ranks"] == {} and config["lora"]["scales"] == {}
    assert config["sampler"] == {"residual": True, "eps": R.EPS, "skip": False}
    assert config["recipe"]["source"] == "peft"
    check_parity(torch_model, adapter, model_dir, out)


def test_peft_bin_parity(base, tmp_path):
    """peft-style checkpoint as a PyTorch pickle (adapter_model.bin), rsLoRA,
    one mask row shared by all masks."""
    torch_model, model_dir = base
    adapter = R.random_adapter(torch_model, num_masks=2, rank=RANK, alpha=ALPHA, rslora=True, fused=False, seed=6)
    adapter.masks = adapter.masks[:1].expand(2, -1).clone()
    ckpt = R.save_peft(adapter, tmp_path / "peft", RANK, ALPHA, rslora=True)
    st = ckpt / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(st))
    tensors["mask_embeddings"] = tensors["mask_embeddings"][0]
    torch.save(tensors, str(ckpt / "adapter_model.bin"))
    st.unlink()
    out = tmp_path / "adapter"
    convert(ckpt, str(model_dir), out)
    assert read_adapter_config(out)["lora"]["scale"] == pytest.approx(ALPHA / RANK**0.5)
    check_parity(torch_model, adapter, model_dir, out)


@pytest.mark.parametrize("fused", [True, False])
def test_mtp_glora_parity(base, tmp_path, fused):
    """MTP-GLoRA checkpoint (rsLoRA; fused qkv/gate_up split exactly, per-key
    ranks and scales), one shared <mask> = mean of the base embeddings."""
    torch_model, model_dir = base
    adapter = R.random_adapter(
        torch_model,
        num_masks=4,
        rank=RANK,
        alpha=ALPHA,
        rslora=True,
        fused=fused,
        seed=2,
        shared_mask=R.glora_mask_vector(torch_model),
    )
    save_dir = R.save_glora(adapter, tmp_path / "run", RANK, ALPHA, rslora=True, fused=fused)
    out = tmp_path / "adapter"
    summary = convert(save_dir, str(model_dir), out)
    assert summary["format"] == "mtp-glora"
    config = read_adapter_config(out)
    lora = config["lora"]
    assert config["num_masks"] == 4
    assert lora["rank"] == RANK and lora["scale"] == pytest.approx(ALPHA / RANK**0.5)
    if fused:
        expect_ranks = {
            "self_attn.q_proj": 3 * RANK,
            "self_attn.k_proj": 3 * RANK,
            "self_attn.v_proj": 3 * RANK,
            "mlp.gate_proj": 2 * RANK,
            "mlp.up_proj": 2 * RANK,
        }
        assert lora["ranks"] == expect_ranks
        for key, r in expect_ranks.items():
            f = r // RANK
            assert lora["scales"][key] == pytest.approx(f * ALPHA / (f * RANK) ** 0.5)
    else:
        assert lora["ranks"] == {} and lora["scales"] == {}
    assert sorted(lora["keys"]) == sorted(
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    )
    assert config["recipe"]["mask_token_id"] == R.VOCAB
    assert config["recipe"]["step"] == 100
    check_parity(torch_model, adapter, model_dir, out)


def test_glora_mask_token_id():
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

        def __len__(self):
            return len(self.vocab)

    assert glora_mask_token_id(Tok({"a": 0, "b": 1})) == 2
    assert glora_mask_token_id(Tok({"a": 0, "<mask>": 1, "b": 2})) == 1


def test_glora_mask_token_inside_table(base, tmp_path):
    """A <mask> id inside the base table (Qwen3: table larger than the
    tokenizer) takes that row, not the mean."""
    torch_model, model_dir = base
    row = torch_model.model.embed_tokens.weight.detach()[77]
    adapter = R.random_adapter(torch_model, 2, RANK, ALPHA, rslora=False, fused=True, seed=3, shared_mask=row)
    save_dir = R.save_glora(adapter, tmp_path / "run", RANK, ALPHA, rslora=False, fused=True, step=7)
    out = tmp_path / "adapter"
    convert(save_dir / "step-7", str(model_dir), out, fmt="mtp-glora", mask_token_id=77)
    model, _ = load(str(model_dir))
    mtp = load_adapter(model, out)
    np.testing.assert_array_equal(np.array(mtp.masks.weight), np.stack([row.numpy()] * 2))
    chain, _ = mlx_chain(mtp, PROMPTS[0], 2)
    assert chain == R.reference(torch_model, adapter, PROMPTS[0]).chain


# --- errors: one line, exit status 2, nothing written ---------------------------


@pytest.fixture()
def peft_ckpt(base, tmp_path):
    torch_model, _ = base
    adapter = R.random_adapter(torch_model, 2, RANK, ALPHA, rslora=False, fused=False, seed=4)
    return R.save_peft(adapter, tmp_path / "peft", RANK, ALPHA, rslora=False)


def _edit_tensors(path: Path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _run_main(capsys, args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("sampler_head.layers.1.norm.weight"), "missing tensors: sampler_head.layers.1.norm.weight"),
        (
            lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"),
            "missing tensor: lora_B of 'model.layers.1.mlp.up_proj.lora_A.weight'",
        ),
        (lambda t: t.__setitem__("extra.weight", torch.zeros(3)), "unexpected tensors in"),
        (
            lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", torch.zeros(64)),
            "LoRA biases are not supported",
        ),
        (lambda t: t.pop("mask_embeddings"), "missing tensor: mask_embeddings"),
        (
            lambda t: t.__setitem__("sampler_head.layers.0.linear.weight", torch.zeros(64, 64)),
            "tensor 'sampler_head.layers.0.linear.weight' has shape (64, 64), expected (64, 128)",
        ),
        (
            lambda t: t.__setitem__(
                "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight", torch.zeros(48, RANK)
            ),
            "lora_B has 48 outputs, the model's self_attn.k_proj 32",
        ),
    ],
    ids=[
        "missing-sampler",
        "missing-lora-half",
        "unexpected",
        "lora-bias",
        "missing-masks",
        "sampler-shape",
        "lora-shape",
    ],
)
def test_errors_name_the_tensor(base, peft_ckpt, tmp_path, capsys, edit, message):
    _, model_dir = base
    _edit_tensors(peft_ckpt / "adapter_model.safetensors", edit)
    out = tmp_path / "adapter"
    code, err = _run_main(capsys, [peft_ckpt, "--model", model_dir, "--out", out])
    assert code == 2
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]


def test_error_cli_exit_code_no_traceback(base, tmp_path):
    _, model_dir = base
    (tmp_path / "empty").mkdir()
    out = tmp_path / "adapter"
    proc = subprocess.run(
        [sys.executable, "-m", "convert.torch", str(tmp_path / "empty"), "--model", str(model_dir), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot tell the format") and "Traceback" not in proc.stderr
    assert not out.exists()


def test_existing_output_needs_overwrite(base, peft_ckpt, tmp_path, capsys):
    _, model_dir = base
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, err = _run_main(capsys, [peft_ckpt, "--model", model_dir, "--out", out])
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").exists()
    code, _ = _run_main(capsys, [peft_ckpt, "--model", model_dir, "--out", out, "--overwrite", "--dtype", "bfloat16"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    assert all(v.dtype == mx.bfloat16 for v in mx.load(str(out / "adapters.safetensors")).values())


def test_glora_wrong_format_and_config_errors(base, tmp_path, capsys):
    torch_model, model_dir = base
    adapter = R.random_adapter(torch_model, 2, RANK, ALPHA, rslora=False, fused=True, seed=5)
    save_dir = R.save_glora(adapter, tmp_path / "run", RANK, ALPHA, rslora=False, fused=True)
    code, err = _run_main(capsys, [save_dir, "--model", model_dir, "--out", tmp_path / "a", "--format", "peft"])
    assert code == 2 and "adapter_config.json" in err
    cfg_file = save_dir / "step-100" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["lora_rank"] = 8  # the tensors have rank 4 (12 fused)
    cfg_file.write_text(json.dumps(cfg))
    code, err = _run_main(capsys, [save_dir, "--model", model_dir, "--out", tmp_path / "b"])
    assert code == 2 and "mlp.down_proj has rank 4, but the config gives 8" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
