"""A PyTorch reference of the MTP forward for the converter's parity tests.

A tiny random ``transformers`` Llama, saved as an mlx-lm model directory, with
a random gated-LoRA adapter, sampler head and mask embeddings, computed here
in PyTorch independently of the MLX code:

- the gated forward over ``prompt + k masks`` (plain causal attention,
  consecutive positions: the linear decoding layout), LoRA on mask positions
  only, on separate projections (PEFT style) or on fused ``qkv_proj`` /
  ``gate_up_proj`` (MTP-GLoRA with ``--fuse_weights``);
- the sampler head ``h1 = RMSNorm(SiLU(W0 [embed(prev); z]))``,
  ``h1 + RMSNorm(SiLU(W1 h1))``, logits through the LM head;
- the greedy draft chain: the next token from the last prompt position, then
  one sampler token per mask, each conditioned on the token before it.

Checkpoints are written in the two formats ``convert.torch`` reads.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HIDDEN = 64
VOCAB = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128
LAYERS = 2
EPS = 1e-5

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


# --- the base model ------------------------------------------------------------


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random fp32 Llama (untied LM head) with spread-out logits."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=EPS,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():  # non-trivial norm weights, so that a wrong norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def save_mlx_model(model: LlamaForCausalLM, path: Path) -> Path:
    """An mlx-lm llama directory: config.json, model.safetensors (HF names,
    which mlx-lm's llama loads as they are) and a word-level tokenizer whose
    token ``t{i}`` has id i."""
    from safetensors.numpy import save_file as save_numpy
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": 10000.0,
        "rope_traditional": False,  # HF rotates halves, not interleaved pairs
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    state = {
        k: v.detach().to(torch.float32).contiguous().numpy()
        for k, v in model.state_dict().items()
        if "rotary_emb" not in k
    }
    save_numpy(state, str(path / "model.safetensors"), metadata={"format": "mlx"})
    vocab = {f"t{i}": i for i in range(c.vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1").save_pretrained(str(path))
    return path


# --- the adapter ---------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)) * weight


@dataclass
class TorchAdapter:
    """LoRA pairs in torch layout, sampler weights and mask embeddings.

    ``lora[(layer, "self_attn.q_proj")] = (A (r, in), B (out, r), scale)``;
    fused keys ``self_attn.qkv_proj`` / ``mlp.gate_up_proj`` act on the
    concatenated projections.
    """

    lora: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor, float]]
    sampler: Dict[str, torch.Tensor]  # layers.{0,1}.{linear,norm}.weight
    masks: torch.Tensor  # (k, d)
    eps: float = EPS
    residual: bool = True

    @property
    def num_masks(self) -> int:
        return self.masks.shape[0]


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(torch.float32)


def random_adapter(
    model: LlamaForCausalLM,
    num_masks: int,
    rank: int,
    alpha: float,
    rslora: bool,
    fused: bool,
    seed: int,
    storage: torch.dtype = torch.float32,
    shared_mask: Optional[torch.Tensor] = None,
) -> TorchAdapter:
    """Random non-zero LoRA (scaled like PEFT / MTP-GLoRA), sampler and masks,
    rounded through ``storage`` so that the checkpoint holds them exactly."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return _round(std * torch.randn(*shape, generator=g), storage)

    attn = model.model.layers[0].self_attn
    outs = {
        "self_attn.q_proj": attn.q_proj.out_features,
        "self_attn.k_proj": attn.k_proj.out_features,
        "self_attn.v_proj": attn.v_proj.out_features,
        "self_attn.o_proj": HIDDEN,
        "mlp.gate_proj": INTERMEDIATE,
        "mlp.up_proj": INTERMEDIATE,
        "mlp.down_proj": HIDDEN,
    }
    ins = {k: (INTERMEDIATE if k == "mlp.down_proj" else HIDDEN) for k in outs}
    if fused:
        groups = {
            "self_attn.qkv_proj": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), 3),
            "self_attn.o_proj": (("self_attn.o_proj",), 1),
            "mlp.gate_up_proj": (("mlp.gate_proj", "mlp.up_proj"), 2),
            "mlp.down_proj": (("mlp.down_proj",), 1),
        }
    else:
        groups = {k: ((k,), 1) for k in outs}
    lora = {}
    for layer in range(len(model.model.layers)):
        for key, (parts, f) in groups.items():
            r, a = f * rank, f * alpha
            scale = a / r**0.5 if rslora else a / r
            fan_in = ins[parts[0]]
            A = rnd(r, fan_in, std=fan_in**-0.5)
            B = rnd(sum(outs[p] for p in parts), r, std=0.5 / r**0.5)
            lora[(layer, key)] = (A, B, scale)
    sampler = {
        "layers.0.linear.weight": rnd(HIDDEN, 2 * HIDDEN, std=(2 * HIDDEN) ** -0.5),
        "layers.0.norm.weight": 1 + rnd(HIDDEN, std=0.2),
        "layers.1.linear.weight": rnd(HIDDEN, HIDDEN, std=HIDDEN**-0.5),
        "layers.1.norm.weight": 1 + rnd(HIDDEN, std=0.2),
    }
    sampler = {k: _round(v, storage) for k, v in sampler.items()}
    if shared_mask is not None:
        masks = shared_mask[None].expand(num_masks, -1).clone()
    else:
        masks = rnd(num_masks, HIDDEN, std=0.1)
    return TorchAdapter(lora, sampler, masks)


# --- the forward ---------------------------------------------------------------


def _proj(block, lora, layer, group: str, names, x, gate):
    """Outputs of ``group.names`` on x, with gated LoRA (fused or not)."""
    module = getattr(block, group)
    weights = [getattr(module, n).weight for n in names]
    fused_key = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}.get(tuple(names))
    if fused_key and (layer, f"{group}.{fused_key}") in lora:
        A, B, s = lora[(layer, f"{group}.{fused_key}")]
        y = x @ torch.cat(weights).T + s * gate * ((x @ A.T) @ B.T)
        return list(torch.split(y, [w.shape[0] for w in weights], dim=-1))
    outs = []
    for n, w in zip(names, weights):
        y = x @ w.T
        if (layer, f"{group}.{n}") in lora:
            A, B, s = lora[(layer, f"{group}.{n}")]
            y = y + s * gate * ((x @ A.T) @ B.T)
        outs.append(y)
    return outs


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Non-traditional (rotate-half) RoPE, as transformers' Llama. x: (H, L, D)."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    freqs = positions.to(torch.float32)[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


@torch.no_grad()
def hidden_states(model: LlamaForCausalLM, adapter: Optional[TorchAdapter], embeds, gate) -> torch.Tensor:
    """Last hidden states (L, d) after the final norm: causal attention over
    ``embeds`` (L, d) at positions 0..L-1, LoRA where ``gate`` (L,) is 1."""
    lora = adapter.lora if adapter is not None else {}
    L = embeds.shape[0]
    g = gate.to(torch.float32)[:, None]
    positions = torch.arange(L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    h = embeds.to(torch.float32)
    for i, block in enumerate(model.model.layers):
        x = rms_norm(h, block.input_layernorm.weight, EPS)
        q, k, v = _proj(block, lora, i, "self_attn", ("q_proj", "k_proj", "v_proj"), x, g)
        q = _rope(q.view(L, HEADS, HEAD_DIM).transpose(0, 1), positions)
        k = _rope(k.view(L, KV_HEADS, HEAD_DIM).transpose(0, 1), positions)
        v = v.view(L, KV_HEADS, HEAD_DIM).transpose(0, 1)
        rep = HEADS // KV_HEADS
        k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
        scores = (q @ k.transpose(1, 2)) * HEAD_DIM**-0.5
        scores = scores.masked_fill(~causal, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v
        att = att.transpose(0, 1).reshape(L, HEADS * HEAD_DIM)
        (o,) = _proj(block, lora, i, "self_attn", ("o_proj",), att, g)
        h = h + o
        x = rms_norm(h, block.post_attention_layernorm.weight, EPS)
        gt, up = _proj(block, lora, i, "mlp", ("gate_proj", "up_proj"), x, g)
        (down,) = _proj(block, lora, i, "mlp", ("down_proj",), F.silu(gt) * up, g)
        h = h + down
    return rms_norm(h, model.model.norm.weight, EPS)


def lm_head(model: LlamaForCausalLM, h: torch.Tensor) -> torch.Tensor:
    return h @ model.lm_head.weight.T


def embed(model: LlamaForCausalLM, tokens) -> torch.Tensor:
    return model.model.embed_tokens.weight[torch.as_tensor(tokens, dtype=torch.long)]


@torch.no_grad()
def sampler_hidden(adapter: TorchAdapter, prev_embedding: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    s = adapter.sampler
    x = torch.cat([prev_embedding, z], dim=-1)
    h1 = rms_norm(F.silu(x @ s["layers.0.linear.weight"].T), s["layers.0.norm.weight"], adapter.eps)
    h2 = rms_norm(F.silu(h1 @ s["layers.1.linear.weight"].T), s["layers.1.norm.weight"], adapter.eps)
    return h1 + h2 if adapter.residual else h2


def sampler_logits(model, adapter, prev_tokens, z) -> torch.Tensor:
    return lm_head(model, sampler_hidden(adapter, embed(model, prev_tokens), z))


@dataclass
class Reference:
    logits: np.ndarray  # (n + k, V): LM head at every position of prompt + masks
    chain: List[int]  # next token + k sampler tokens, greedy
    sampler_logits: np.ndarray  # (k, V): the sampler steps of the chain
    hidden: np.ndarray = field(repr=False, default=None)


@torch.no_grad()
def reference(model, adapter: TorchAdapter, prompt: List[int]) -> Reference:
    n, k = len(prompt), adapter.num_masks
    embeds = torch.cat([embed(model, prompt), adapter.masks.to(torch.float32)])
    gate = torch.cat([torch.zeros(n), torch.ones(k)])
    h = hidden_states(model, adapter, embeds, gate)
    logits = lm_head(model, h)
    chain = [int(logits[n - 1].argmax())]
    steps = []
    for j in range(1, k + 1):
        sl = sampler_logits(model, adapter, [chain[-1]], h[n - 1 + j][None])[0]
        steps.append(sl)
        chain.append(int(sl.argmax()))
    return Reference(logits.numpy(), chain, torch.stack(steps).numpy(), h.numpy())


# --- checkpoints ---------------------------------------------------------------


def save_peft(adapter: TorchAdapter, path: Path, rank: int, alpha: float, rslora: bool, storage=torch.float32):
    """PEFT-style: adapter_model.safetensors + adapter_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, key), (A, B, _) in adapter.lora.items():
        base = f"base_model.model.model.layers.{layer}.{key}"
        tensors[f"{base}.lora_A.weight"] = A.to(storage).contiguous()
        tensors[f"{base}.lora_B.weight"] = B.to(storage).contiguous()
    for name, value in adapter.sampler.items():
        tensors[f"sampler_head.{name}"] = value.to(storage).contiguous()
    tensors["mask_embeddings"] = adapter.masks.to(storage).contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": sorted({key.split(".")[-1] for _, key in adapter.lora}),
        "lora_dropout": 0.0,
        "bias": "none",
        "num_masks": adapter.num_masks,
        "sampler_residual": adapter.residual,
        "sampler_eps": adapter.eps,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def save_glora(adapter: TorchAdapter, save_dir: Path, rank: int, alpha: float, rslora: bool, fused: bool, step=100):
    """MTP-GLoRA layout: save_dir/step-N/{model.safetensors, config.json},
    save_dir/latest.json; tensor names of its MTPModel's trainable state dict
    (no embeddings: its <mask> embedding is frozen)."""
    ckpt = save_dir / f"step-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, key), (A, B, _) in adapter.lora.items():
        base = f"model.model.layers.{layer}.{key}"
        tensors[f"{base}.lora_A.weight"] = A.contiguous()
        tensors[f"{base}.lora_B.weight"] = B.contiguous()
    for name, value in adapter.sampler.items():
        tensors[f"sampler_head.{name}"] = value.contiguous()
    save_file(tensors, str(ckpt / "model.safetensors"))
    config = {
        "model_path": "tiny-llama",
        "dtype": "float32",
        "fuse_weights": fused,
        "draft_length": adapter.num_masks,
        "lora_rank": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "lora_bias": False,
        "lora_use_rslora": rslora,
        "lora_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "lr": 2e-4,
        "max_steps": step,
    }
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    (save_dir / "latest.json").write_text(json.dumps({"latest": ckpt.name}))
    return save_dir


def glora_mask_vector(model: LlamaForCausalLM) -> torch.Tensor:
    """MTP-GLoRA's added ``<mask>`` row: the mean of the old embedding table
    (float32), as its resize_token_embeddings initialises it."""
    return model.model.embed_tokens.weight.detach().to(torch.float32).mean(0)
