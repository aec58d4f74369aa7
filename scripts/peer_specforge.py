"""The peer for scripts/bench_train.py: SpecForge's own EAGLE3 training step, run from a source checkout.

    .venv/bin/python scripts/bench_train.py --modes bf16,specforge --specforge-source DIR

DIR is a checkout of github.com/sgl-project/SpecForge (measured with a6b6b023, 2026-12); nothing of it is
copied here. The step is SpecForge's: `OnlineEagle3Model` (TTT over `LlamaForCausalLMEagle3`, its `sdpa`
backend) on the full-vocabulary target logits from the frozen head (its `TargetHead` path: shift, then the
head), the TTT losses weighted 0.8**k (its `Eagle3TrainStrategy`), and its `BF16Optimizer` (bf16
parameters, fp32 master AdamW, clipping). One substitution: its log-softmax loss is a Triton kernel, which
needs a GPU; on CPU the step uses SpecForge's own torch.compile'd reference of that loss (`_compute_loss`,
the same numbers).

The draft's shapes, weights' scale, target head, vocabulary and batch are the bench's (scripts/bench_train.py
`problem`), so both steps do the same work on the same data.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class PeerSums:
    """What the bench reads from a step: per-TTT-step correct counts and denominators."""

    correct: list[torch.Tensor]
    count: list[torch.Tensor]


class PeerStep:
    """SpecForge's step behind the bench's step interface (accumulate, update, optimizer, dtype)."""

    dtype = torch.bfloat16

    def __init__(self, source: Path, problem, *, ttt: int, lr: float):
        if not (Path(source) / "specforge" / "algorithms" / "eagle3" / "model.py").is_file():
            raise SystemExit(f"--specforge-source {source}: no SpecForge checkout there (specforge/algorithms/eagle3/"
                             "model.py missing); clone github.com/sgl-project/SpecForge and pass its directory")
        sys.path.insert(0, str(source))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flash_attn is not found": the sdpa backend is what runs on CPU
            from transformers import LlamaConfig

            import specforge.algorithms.eagle3.model as eagle3_model
            from specforge.core.loss import _compute_loss
            from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
            from specforge.optimizer import BF16Optimizer
            from specforge.utils import padding

        class ReferenceLoss:  # the Triton kernel's CPU stand-in: SpecForge's compiled reference of it
            apply = staticmethod(_compute_loss)

        eagle3_model.LogSoftmaxLoss = ReferenceLoss
        self.padding = padding
        cfg = problem.config
        config = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                             num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                             head_dim=cfg.head_dim, num_hidden_layers=1, vocab_size=cfg.vocab_size,
                             max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", pad_token_id=0,
                             tie_word_embeddings=False)
        config.draft_vocab_size = cfg.draft_vocab_size
        torch.manual_seed(problem.seed)
        draft = LlamaForCausalLMEagle3(config, attention_backend="sdpa")
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(problem.embed_tokens)
            draft.t2d.copy_(problem.vocab.t2d)
            draft.d2t.copy_(problem.vocab.d2t)
        draft.embed_tokens.weight.requires_grad_(False)  # frozen, like ours
        self.draft = draft.to(self.dtype)
        self.model = eagle3_model.OnlineEagle3Model(self.draft, length=ttt, attention_backend="sdpa")
        self.head = problem.lm_head.to(self.dtype)  # the frozen target head
        self.optimizer = BF16Optimizer(self.draft, lr=lr, max_grad_norm=0.5, total_steps=1_000_000)

    def accumulate(self, batch, n_tokens: float):
        input_ids = self.padding(batch.input_ids, left=False)
        target = self.padding(batch.target_hidden.to(self.dtype), left=False) @ self.head.T
        plosses, _, _, corrects, denoms, _, _ = self.model(
            input_ids=input_ids, attention_mask=torch.ones_like(batch.input_ids), target=target,
            loss_mask=batch.loss_mask[..., None].to(self.dtype), hidden_states=batch.aux_hidden.to(self.dtype))
        loss = sum(0.8**k * p for k, p in enumerate(plosses))
        loss.backward()
        return loss.detach(), PeerSums(correct=corrects, count=denoms)

    def update(self, *, step: int, samples: int) -> None:
        self.optimizer.step()
