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
from typing import Callable, NamedTuple

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


class Past(NamedTuple):
    """What a TTT step k >= 1 attends to besides its own key: step 0's keys (causally) and, at the query's
    own position, steps 1..k-1's keys. The later steps' keys sit in a fixed number of slots, unfilled ones
    masked by `extra_bias`, so every step k >= 1 has the same shapes (one compiled graph for all of them)."""

    k0: torch.Tensor  # (B, nKV, Tk, hd)
    v0: torch.Tensor
    extra_k: torch.Tensor | None  # (B, nKV, Tq, S, hd): slot j holds step j+1's key at the query's position
    extra_v: torch.Tensor | None
    extra_bias: torch.Tensor | None  # (S,) 0 for a filled slot, -inf for an unfilled one; None: all filled


def past_of(cache: list[tuple[torch.Tensor, torch.Tensor]]) -> Past | None:
    """The Past of a list of (k, v) per step so far, every slot filled (inference drafts step by step)."""
    if not cache:
        return None
    (k0, v0), later = cache[0], cache[1:]
    stack = lambda i: torch.stack([kv[i] for kv in later], dim=3) if later else None
    return Past(k0, v0, stack(0), stack(1), None)


class Attention(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(2 * cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos, sin, past: Past | None):
        """x: (B, T, 2H) -> (output (B, T, H), this step's k, v (B, nKV, T, hd)); attends as the module
        docstring says."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nH, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nKV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # GQA without repeating K/V: head h reads kv group h // g, so (nH) splits into (nKV, g)
        q = q.view(B, self.n_kv, self.n_heads // self.n_kv, T, self.head_dim)
        out = ttt_attention(q, k, v, past, scale=1.0 / math.sqrt(self.head_dim))  # (B, nKV, g, T, hd)
        return self.o_proj(out.permute(0, 3, 1, 2, 4).reshape(B, T, self.n_heads * self.head_dim)), k, v


def ttt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: Past | None, *, scale: float) -> torch.Tensor:
    """q (B, nKV, g, Tq, hd); this step's k, v (B, nKV, Tq, hd) -> (B, nKV, g, Tq, hd).

    Step 0 (no past) attends causally to its own keys. Later steps attend to step 0's keys causally plus,
    at the query's own position, steps 1..k's keys (the past's, then their own); one softmax over all.
    The queries may be the last Tq of step 0's Tk positions (inference drafts from the last position only).
    """
    B, nKV, g, Tq, hd = q.shape
    q = q * scale
    if past is None:
        k0, v0, extra_k, extra_v, bias = k, v, None, None, None
    else:
        k0, v0 = past.k0, past.v0
        own = lambda x, extra: x.unsqueeze(3) if extra is None else torch.cat([extra, x.unsqueeze(3)], dim=3)
        extra_k, extra_v = own(k, past.extra_k), own(v, past.extra_v)  # (B, nKV, Tq, S+1, hd)
        bias = None if past.extra_bias is None else F.pad(past.extra_bias, (0, 1))  # own slot: filled
    Tk = k0.shape[2]
    future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(diagonal=Tk - Tq + 1)
    causal = (q.reshape(B, nKV, g * Tq, hd) @ k0.transpose(-1, -2)).view(B, nKV, g, Tq, Tk)
    scores = [causal.masked_fill(future, float("-inf"))]
    if extra_k is not None:
        diagonal = (q.unsqueeze(-2) * extra_k.unsqueeze(2)).sum(-1)  # (B, nKV, g, Tq, S+1): the diagonal keys
        scores.append(diagonal if bias is None else diagonal + bias)
    # One softmax over all keys; for bf16 inputs it accumulates in fp32 and writes bf16.
    weights = torch.cat(scores, dim=-1).softmax(dim=-1)
    out = (weights[..., :Tk].reshape(B, nKV, g * Tq, Tk) @ v0).view(B, nKV, g, Tq, hd)
    if extra_v is not None:
        out = out + (weights[..., Tk:].unsqueeze(-1) * extra_v.unsqueeze(2)).sum(-2)
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

    def step(self, embeds, hidden, cos, sin, past: Past | None):
        """-> (output (B, T, H), this step's k, v)."""
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # (B, T, 2H)
        attended, k, v = self.self_attn(x, cos, sin, past)
        residual = hidden + attended
        return residual + self.mlp(self.post_attention_layernorm(residual)), k, v

    def forward(self, embeds, hidden, cos, sin, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One step attending to the (k, v) of the steps in `cache`, to which it appends its own."""
        out, k, v = self.step(embeds, hidden, cos, sin, past_of(cache))
        cache.append((k, v))
        return out


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
        return [self.lm_head(normed) for normed in self.normed_states(input_ids, aux_hidden, ttt_length)]

    def normed_states(self, input_ids: torch.Tensor, aux_hidden: torch.Tensor, ttt_length: int,
                      step: "TTTStep | None" = None) -> list[torch.Tensor]:
        """`norm` of the midlayer's output per TTT step, each (B, T, H): what `lm_head` reads (the trainer
        runs it on the positions that carry loss only). `step` runs one TTT step (default `ttt_step`; the
        trainer passes a compiled one)."""
        step = step or ttt_step
        B, T = input_ids.shape
        dtype = self.fc.weight.dtype
        cos, sin = (t.to(dtype) for t in rotary_tables(self.cfg, torch.arange(T + ttt_length, device=input_ids.device)))
        hidden = self.fc(aux_hidden.to(dtype))  # (B, T, H)
        slots = max(ttt_length - 1, 1)  # steps 1..ttt-1's keys; one slot stays empty, so all steps >= 1 match
        past, first, later, normed = None, None, [], []
        for k in range(ttt_length):
            tokens = F.pad(input_ids[:, k + 1 :], (0, k + 1))  # token t+k+1 at position t; 0 past the end
            hidden, out, key, value = step(self, tokens, hidden, cos[k : k + T], sin[k : k + T], past)
            normed.append(out)
            if first is None:
                first = (key, value)
            else:
                later.append((key, value))
            if k + 1 < ttt_length:
                past = slotted_past(first, later, slots)
        return normed


def slotted_past(first: tuple[torch.Tensor, torch.Tensor], later: list[tuple[torch.Tensor, torch.Tensor]],
                 slots: int) -> Past:
    """Step 0's (k, v) and steps 1..j's in `slots` slots. The rest hold step 0's (masked, so they get no
    gradient): then the slots need a gradient at every step, as a compiled graph's guards want."""
    k0, v0 = first
    stack = lambda i: torch.stack([kv[i] for kv in later + [first] * (slots - len(later))], dim=3)
    filled = torch.arange(slots, device=k0.device) < len(later)
    bias = torch.zeros(slots, dtype=k0.dtype, device=k0.device).masked_fill(~filled, float("-inf"))
    return Past(k0, v0, stack(0), stack(1), bias)


def ttt_step(model: Eagle3Draft, tokens: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             past: Past | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training-time-test step: tokens (B, T), hidden (B, T, H) -> (output (B, T, H), norm(output), this
    step's k, v). A pure function of its inputs, so that torch.compile fuses the layer's elementwise work."""
    out, k, v = model.midlayer.step(model.embed_tokens(tokens), hidden, cos, sin, past)
    return out, model.norm(out), k, v


TTTStep = Callable[[Eagle3Draft, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Past | None],
                   tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
