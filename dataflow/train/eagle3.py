"""The EAGLE3 draft model, laid out as SGLang's / vLLM's `LlamaForCausalLMEagle3` loads it.

One step of the draft, per position t (SGLang's LlamaDecoderLayer of llama_eagle3.py):

    h        = fc(aux_hidden)               # step 0: target features (3H_t -> H); later steps: own output
    x        = cat(input_layernorm(embed(token)), hidden_norm(h))        # (.., 2H): q/k/v take 2H
    r        = h + o_proj(attention(x))
    out      = r + mlp(post_attention_layernorm(r))                      # fed to the next step
    logits   = lm_head(norm(out))                                        # over the draft vocab

Training-time test (TTT) unrolls `ttt_length` steps: step k at position t embeds token t+k+1, sits at
rotary position t+k, and attends to step 0's keys at positions <= t (causal) plus steps 1..k's keys at
position t only (what the draft saw of its own earlier guesses at inference).
Parameter names equal the export names (no `model.` prefix), so the state dict *is* the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

AUX_LAYERS_KEY = "eagle_aux_hidden_state_layer_ids"


@dataclass(frozen=True, kw_only=True)
class DraftConfig:
    hidden_size: int
    """Draft width; must equal the target's (the draft shares the target's embeddings)."""
    intermediate_size: int
    """MLP width."""
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    """The target's vocabulary size (d2t/t2d are defined over it)."""
    draft_vocab_size: int
    """Size of the draft's lm_head."""
    target_hidden_size: int
    """Width of one captured target layer; fc takes 3x this."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"draft config: {f.name} must be positive, got {getattr(self, f.name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("draft config: num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError("draft config: head_dim must be even (rotary embedding)")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError("draft config: draft_vocab_size cannot exceed vocab_size")

    @classmethod
    def from_target(cls, target: dict, *, draft_vocab_size: int, overrides: dict | None = None) -> "DraftConfig":
        """Default shape from the target's HF config.json; `overrides` (from --draft-config) win."""
        hidden, heads = target["hidden_size"], target["num_attention_heads"]
        values = {
            "hidden_size": hidden,
            "intermediate_size": target["intermediate_size"],
            "num_attention_heads": heads,
            "num_key_value_heads": target.get("num_key_value_heads") or heads,
            "head_dim": target.get("head_dim") or hidden // heads,
            "vocab_size": target["vocab_size"],
            "draft_vocab_size": draft_vocab_size,
            "target_hidden_size": hidden,
            "rms_norm_eps": target.get("rms_norm_eps", 1e-6),
            "rope_theta": target.get("rope_theta") or (target.get("rope_parameters") or {}).get("rope_theta", 1e4),
            "max_position_embeddings": target.get("max_position_embeddings", 4096),
        }
        unknown = set(overrides or {}) - set(values)
        if unknown:
            raise ValueError(f"draft config: unknown keys {sorted(unknown)}; allowed: {sorted(values)}")
        return cls(**(values | (overrides or {})))

    def to_hf_config(self, *, torch_dtype: str, aux_layers: list[int]) -> dict:
        """config.json for SGLang/vLLM (`LlamaForCausalLMEagle3`, one layer, untied lm_head), with the target
        layers the draft was trained on (HF hidden_states indices) in the keys each server reads: vLLM reads
        the top-level key and captures the output of that many layers, SGLang reads `eagle_config` and
        captures the input of layer id + 1 (the output of `id + 1` layers), hence one less there."""
        return asdict(self) | {
            AUX_LAYERS_KEY: list(aux_layers),
            "eagle_config": {AUX_LAYERS_KEY: [a - 1 for a in aux_layers]},
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "num_hidden_layers": 1,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "rope_scaling": None,
            "torch_dtype": torch_dtype,
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalise in fp32 like HF/SGLang
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(cfg: DraftConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (len(positions), head_dim), neox layout (the HF/SGLang Llama convention)."""
    half = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / (cfg.rope_theta ** (half / cfg.head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, hd); cos/sin: (T, hd) fp32, applied in x's dtype (as HF/SGLang do)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(2 * cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos, sin, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x: (B, T, 2H). Appends this step's (k, v) to `cache`; attends as the module docstring says."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nH, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nKV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        repeat = self.n_heads // self.n_kv
        cache.append((k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)))
        out = ttt_attention(q, cache, scale=1.0 / math.sqrt(self.head_dim))  # (B, nH, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def ttt_attention(q: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]], *, scale: float) -> torch.Tensor:
    """Step-0 keys causally, later steps' keys on the diagonal only; one softmax over all of them.

    The queries may be the last Tq of step 0's Tk positions (inference drafts from the last position only).
    """
    Tq = q.shape[2]
    k0, v0 = cache[0]
    Tk = k0.shape[2]
    q = q * scale
    future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(diagonal=Tk - Tq + 1)
    scores = [(q @ k0.transpose(-1, -2)).masked_fill_(future, float("-inf"))]  # (B, nH, Tq, Tk)
    if len(cache) > 1:
        extra_k = torch.stack([kj for kj, _ in cache[1:]], dim=-2)  # (B, nH, Tq, j, hd)
        scores.append((q.unsqueeze(-2) * extra_k).sum(-1))  # (B, nH, Tq, j): the diagonal keys
    # One softmax over all keys; for bf16 inputs the kernel accumulates in fp32 and writes bf16.
    weights = torch.cat(scores, dim=-1).softmax(dim=-1)
    out = weights[..., :Tk] @ v0
    if len(cache) > 1:
        extra_v = torch.stack([vj for _, vj in cache[1:]], dim=-2)  # (B, nH, Tq, j, hd)
        out = out + (weights[..., Tk:].unsqueeze(-1) * extra_v).sum(-2)
    return out


class MLP(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, embeds, hidden, cos, sin, cache) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # (B, T, 2H)
        residual = hidden + self.self_attn(x, cos, sin, cache)
        return residual + self.mlp(self.post_attention_layernorm(residual))


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: DraftConfig, *, embed_tokens: torch.Tensor, d2t: torch.Tensor, t2d: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        # Frozen: the draft reads the target's embeddings (SGLang shares them at serving time).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.data.copy_(embed_tokens)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", d2t.to(torch.int64).clone())
        self.register_buffer("t2d", t2d.to(torch.bool).clone())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))  # (B, T, Vd)

    def forward(self, input_ids: torch.Tensor, aux_hidden: torch.Tensor, ttt_length: int) -> list[torch.Tensor]:
        """input_ids (B, T), aux_hidden (B, T, 3H_t) -> draft logits per TTT step, each (B, T, Vd).

        Step k's logits at position t predict token t+k+2 (its teacher is the target at position t+k+1).
        """
        return [self.logits(hidden) for hidden in self.hidden_states(input_ids, aux_hidden, ttt_length)]

    def hidden_states(self, input_ids: torch.Tensor, aux_hidden: torch.Tensor, ttt_length: int) -> list[torch.Tensor]:
        """The midlayer's output per TTT step, each (B, T, H), before `norm` and `lm_head` (the trainer runs
        those on the positions that carry loss only)."""
        B, T = input_ids.shape
        cos, sin = rotary_tables(self.cfg, torch.arange(T + ttt_length, device=input_ids.device))
        hidden = self.fc(aux_hidden.to(self.fc.weight.dtype))  # (B, T, H)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        hiddens = []
        for k in range(ttt_length):
            tokens = F.pad(input_ids[:, k + 1 :], (0, k + 1))  # token t+k+1 at position t; 0 past the end
            hidden = self.midlayer(self.embed_tokens(tokens), hidden, cos[k : k + T], sin[k : k + T], cache)
            hiddens.append(hidden)
        return hiddens
