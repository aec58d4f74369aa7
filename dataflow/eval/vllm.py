"""`dataflow eval --engine vllm`: the trained draft served by vLLM as an EAGLE3 speculator, judged by vLLM's
own counters.

On the held-out prompts, one at a time (batch size 1, like the HF evaluator):
    1. the target alone in vLLM, greedy: the reference output and the tokens/s without the draft;
    2. the target with the draft (`speculative_config={"method": "eagle3", ...}`), greedy: tokens/s with the
       draft, and vLLM's counters `vllm:spec_decode_num_drafts`, `..._num_accepted_tokens` and
       `..._num_accepted_tokens_per_pos`, read as differences around our calls (the registry is per process);
    3. τ = 1 + accepted / drafts, per-position acceptance = accepted_per_pos[k] / drafts (the same definitions
       as the HF evaluator's), and whether every output equals the reference.
"""

from __future__ import annotations

import gc
import time

from dataflow.errors import InputError
from dataflow.eval.report import EvalConfig, eval_prompts, prompt_source
from dataflow.rollout.engines.hf import HFEngineConfig, default_aux_layers
from dataflow.rollout.engines.vllm import require_vllm, start_llm
from dataflow.train.checkpoint import export_aux_layers

COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens")
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


def evaluate_vllm(config: EvalConfig, verbose: bool = False, on_phase=lambda what: None) -> dict:
    require_vllm()
    if not (config.draft / "model.safetensors").exists():
        raise InputError(f"--draft {config.draft}: no model.safetensors there; pass a checkpoint dir such as OUT/final")
    from transformers import AutoConfig, AutoTokenizer

    from dataflow.rollout.template import set_chat_template
    from dataflow.target import resolve_target

    model_dir = resolve_target(config.target_model)
    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    served_layers = export_aux_layers(config.draft) or default_aux_layers(num_layers)
    if config.aux_layers and list(config.aux_layers) != served_layers:
        raise InputError(
            f"--aux-layers {','.join(map(str, config.aux_layers))}: vLLM takes a draft's layers from "
            f"eagle_aux_hidden_state_layer_ids in its config.json ({served_layers}); drop the option or use --engine hf"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    set_chat_template(tokenizer, model_dir, None)
    prompts = eval_prompts(tokenizer, config)
    # fp32 like the HF evaluator: in bf16, verifying K drafted tokens at once rounds differently from decoding one
    # at a time, so near-ties flip and the output stops being exactly the greedy one.
    engine_config = HFEngineConfig(model_dir=model_dir, threads=config.threads, dtype="float32")
    max_model_len = max(map(len, prompts)) + config.max_new_tokens + config.num_draft_tokens + 1

    on_phase("vLLM: the target alone (greedy reference)")
    reference, greedy_s = decode_each(start_llm(engine_config, max_model_len, verbose), prompts, config.max_new_tokens)
    gc.collect()  # the first LLM's memory goes before the second starts
    on_phase(f"vLLM: the target with the draft (EAGLE3, K = {config.num_draft_tokens})")
    speculator = {"method": "eagle3", "model": str(config.draft), "num_speculative_tokens": config.num_draft_tokens}
    llm = start_llm(engine_config, max_model_len, verbose, speculative_config=speculator, disable_log_stats=False)
    drafts_0, accepted_0, per_pos_0 = spec_counters(llm.get_metrics())
    got, spec_s = decode_each(llm, prompts, config.max_new_tokens)
    drafts, accepted, per_pos = spec_counters(llm.get_metrics())
    drafts, accepted = drafts - drafts_0, accepted - accepted_0
    per_pos = [n - (per_pos_0[k] if k < len(per_pos_0) else 0) for k, n in enumerate(per_pos)]
    mismatches = sum(g != r for g, r in zip(got, reference))
    return {
        "engine": "vllm",
        "draft": str(config.draft),
        "prompts": len(prompts),
        "prompts_from": prompt_source(config),
        "num_draft_tokens": config.num_draft_tokens,
        "tau": round(1 + accepted / drafts, 3) if drafts else 0.0,
        "accept_rate_per_position": [round(a / drafts, 3) if drafts else 0.0 for a in per_pos],
        "num_drafts": drafts,
        "num_accepted_tokens": accepted,
        "tokens_per_s_greedy": round(sum(map(len, reference)) / greedy_s, 2),
        "tokens_per_s_speculative": round(sum(map(len, got)) / spec_s, 2),
        "exact_match": mismatches == 0,
        "mismatches": mismatches,
    }


def decode_each(llm, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy decoding of each prompt on its own; the generated ids and the seconds spent in vLLM."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    outputs, seconds = [], 0.0
    for prompt in prompts:
        start = time.perf_counter()
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        seconds += time.perf_counter() - start
        outputs.append(list(out.outputs[0].token_ids))
    return outputs, seconds


def spec_counters(metrics) -> tuple[int, int, list[int]]:
    """(drafts, accepted tokens, accepted per position) from a vLLM metrics snapshot."""
    values = {name: 0 for name in COUNTERS}
    per_pos: list[int] = []
    for metric in metrics:
        if metric.name in values:
            values[metric.name] += metric.value
        elif metric.name == PER_POSITION:
            per_pos = list(metric.values)
    return values[COUNTERS[0]], values[COUNTERS[1]], per_pos
