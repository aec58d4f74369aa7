"""`dataflow eval`: τ of a trained draft vs an untrained one on held-out prompts, with the exactness check."""

from __future__ import annotations

import os
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch

from dataflow.errors import InputError
from dataflow.rollout.data import DEFAULT_HELD_OUT
from dataflow.eval.speculative import SpecStats, Target, greedy, speculative
from dataflow.train.checkpoint import draft_from_export, export_aux_layers
from dataflow.train.eagle3 import Eagle3Draft


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    draft: Path
    """A checkpoint dir (config.json + model.safetensors), e.g. OUT/final."""
    target_model: str | None = None
    """The target (HF dir or .gguf); None = the default SmolLM2."""
    data: Path | None = None
    """jsonl of conversations; None = the bundled dataset."""
    num_prompts: int = 8
    """Prompts taken from the dataset's held-out rows (spread through it), which no rollout trains on."""
    held_out: int = DEFAULT_HELD_OUT
    """The rollout's --held-out: how many conversation rows (spread through the dataset) are held out."""
    run: Path | None = None
    """A run's database: prompt with the prompts its trainer held out (--validation-share) instead."""
    num_draft_tokens: int = 7
    max_new_tokens: int = 64
    aux_layers: tuple[int, ...] | None = None
    """HF hidden_states indices the draft was trained on; None = the default (2, N//2, N-3)."""
    threads: int | None = None
    seed: int = 0
    baseline: bool = True
    """Also decode with an untrained draft of the same shape (tau_untrained): the floor τ is measured against.
    It takes a third of the eval's time (1.00 in every quality run and demo so far)."""

    def __post_init__(self):
        for name in ("num_prompts", "num_draft_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.run is None and self.num_prompts > self.held_out:
            raise ValueError(
                f"num_prompts {self.num_prompts} > held_out {self.held_out}: the extra prompts would be rows a "
                "rollout trains on; pass --num-prompts at most --held-out (and the rollout the same --held-out)"
            )


def untrained_like(draft: Eagle3Draft, seed: int) -> Eagle3Draft:
    """Same shape, vocab mapping and embeddings, fresh weights: the floor τ."""
    torch.manual_seed(seed)
    return Eagle3Draft(draft.cfg, embed_tokens=draft.embed_tokens.weight, d2t=draft.d2t, t2d=draft.t2d).eval()


def eval_prompts(tokenizer, config: EvalConfig) -> list[list[int]]:
    """The first user turn of `num_prompts` prompts no training sample came from, spread among them, rendered for
    generation: the dataset's held-out rows (`split_held_out`), or with `run` the prompts its trainer held out."""
    from dataflow.rollout.data import load_dataset, split_held_out, spread
    from dataflow.rollout.template import render

    if config.run is None:
        _, rows = split_held_out(load_dataset(config.data, on_bad_row="skip").samples, config.held_out)
        conversations = [sample.messages for sample in rows]
    else:
        conversations = validation_conversations(config.run)
    prompts = []
    for messages in spread(conversations, config.num_prompts):
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        text = render(tokenizer, list(messages[: first_user + 1]), add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def prompt_source(config: EvalConfig) -> str:
    return "the dataset's held-out rows" if config.run is None else f"the prompts {config.run}'s trainer held out"


def validation_conversations(run: Path) -> list[list[dict]]:
    """One conversation per prompt the run's trainer held out (`train.validation.held_out`): prompts like the
    ones it trained on (self-written ones too), none of whose samples it trained on. Text rows have no prompt."""
    from dataflow.control.db import connect
    from dataflow.control.meta import RunMeta
    from dataflow.control.tasks import TaskQueue
    from dataflow.keys import prompt_of
    from dataflow.rollout.data import Conversation
    from dataflow.train.validation import held_out

    with closing(connect(run)) as conn:
        share = (RunMeta(conn).get("config.train") or {}).get("validation_share", 0.0)
        tasks = TaskQueue(conn).payloads()
    if not share:
        raise InputError(f"--run {run}: its trainer held no prompts out (trained without --validation-share); "
                         "evaluate on the dataset's held-out rows (drop --run)")
    firsts: dict[str, list[dict]] = {}
    for key, payload in tasks:
        messages = Conversation.from_payload(payload).messages
        if messages and held_out(key, share):
            firsts.setdefault(prompt_of(key), messages)
    if not firsts:
        raise InputError(f"--run {run}: the prompt of none of its {len(tasks)} samples falls in its trainer's "
                         f"--validation-share {share:g}; train with a larger share or evaluate on the dataset's "
                         "held-out rows (drop --run)")
    return list(firsts.values())


def load_target(spec: str | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dataflow.rollout.engines.hf import default_aux_layers
    from dataflow.rollout.template import set_chat_template
    from dataflow.target import resolve_target

    model_dir = resolve_target(spec)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    set_chat_template(tokenizer, model_dir, None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer, default_aux_layers(model.config.num_hidden_layers)


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return {t for t in [*ids, tokenizer.eos_token_id] if t is not None}


def evaluate(config: EvalConfig, on_prompt=lambda i, n: None) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    if not (config.draft / "model.safetensors").exists():
        raise InputError(f"--draft {config.draft}: no model.safetensors there; pass a checkpoint dir such as OUT/final")
    model, tokenizer, default_layers = load_target(config.target_model)
    target = Target(model, list(config.aux_layers or export_aux_layers(config.draft) or default_layers))
    draft = draft_from_export(config.draft, embed_tokens=model.get_input_embeddings().weight.detach()).eval()
    if draft.cfg.vocab_size != model.config.vocab_size:
        raise InputError(f"--draft {config.draft}: vocab {draft.cfg.vocab_size} does not match the target's")
    floor = untrained_like(draft, config.seed) if config.baseline else None
    eos = eos_ids(model, tokenizer)
    prompts = eval_prompts(tokenizer, config)
    trained, untrained = SpecStats(), SpecStats()
    greedy_tokens, greedy_seconds, mismatches = 0, 0.0, 0
    for i, prompt in enumerate(prompts):
        on_prompt(i, len(prompts))
        reference, seconds = greedy(target, prompt, config.max_new_tokens, eos)
        greedy_tokens, greedy_seconds = greedy_tokens + len(reference), greedy_seconds + seconds
        got = speculative(target, draft, prompt, config.max_new_tokens, eos, config.num_draft_tokens, trained)
        mismatches += got != reference
        if floor is not None:
            floor_got = speculative(target, floor, prompt, config.max_new_tokens, eos, config.num_draft_tokens,
                                    untrained)
            mismatches += floor_got != reference
    result = {
        "draft": str(config.draft),
        "prompts": len(prompts),
        "prompts_from": prompt_source(config),
        "num_draft_tokens": config.num_draft_tokens,
        "tau": round(trained.tau, 3),
        "accept_rate_per_position": [round(a, 3) for a in trained.per_position()],
        "verify_steps": trained.steps,
        "tokens_per_s_greedy": round(greedy_tokens / greedy_seconds, 2),
        "tokens_per_s_speculative": round(trained.new_tokens / trained.seconds, 2),
        "exact_match": mismatches == 0,
        "mismatches": mismatches,
    }
    if floor is not None:
        result["tau_untrained"] = round(untrained.tau, 3)
    return result
