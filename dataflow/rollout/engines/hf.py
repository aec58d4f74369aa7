"""The `hf` engine: a transformers causal LM on CPU or CUDA, batched forward with hidden states.

Features per sample (docs/architecture.md): input_ids [T] int64, loss_mask [T] bool,
aux_hidden [T, 3H] = HF hidden_states[a] for a in aux_layers (default 2, N//2, N-3), concatenated,
target_hidden [T, H] = the last hidden state after the final norm.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dataflow.errors import InputError
from dataflow.options import torch_dtype
from dataflow.rollout.template import TokenizedSample, render, set_chat_template

ENGINE_DTYPES = ("float32", "bfloat16")

CONTENDERS_TOP_K = 5  # candidates counted per written position when the vocabulary is learnt from replies
CPU_ATTENTION = "dataflow_cpu"  # the target's attention on CPU (registered with transformers below)


def cpu_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention, except for one query over a cache (each step of generate), which is two
    batched matmuls with the query heads grouped by the key/value head they share. Why: torch's fused CPU
    kernel is slow for one query (SmolLM2, 64 rows, bf16, 2 threads: 4.4 ms per layer and step, half the
    step) and the eager path copies every cached key and value once per query head group (repeat_kv);
    for the capture's long prompts the fused kernel is the fast one. In: query (B, Hq, 1, D), key and value
    (B, Hkv, L, D), mask (B, 1, 1, L) bool or None. Out: (B, 1, Hq, D), no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, dim = query.shape
    grouped = query.view(rows, key.shape[1], heads // key.shape[1], dim)  # query head h reads kv head h // groups
    scores = grouped @ key.transpose(2, 3) * (dim**-0.5 if scaling is None else scaling)  # (B, Hkv, groups, L)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return (weights @ value).view(rows, heads, 1, dim).transpose(1, 2), None


def register_cpu_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(CPU_ATTENTION, cpu_attention)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)  # the masks SDPA takes: bool, or None when causal


def default_aux_layers(num_layers: int) -> list[int]:
    """The layers SGLang and vLLM capture for EAGLE3, in HF hidden_states indexing."""
    return [2, num_layers // 2, num_layers - 3]


def choose_aux_layers(chosen: tuple[int, ...] | None, num_layers: int, model_dir) -> list[int]:
    """--aux-layers, or the default; three distinct layers in increasing order within 0..num_layers. The
    default repeats or goes backwards on targets with fewer than 7 layers: those must name their own."""
    layers = list(chosen or default_aux_layers(num_layers))
    where = f"--aux-layers {','.join(map(str, layers))}" if chosen else f"the default aux layers {layers}"
    if not all(0 <= a <= num_layers for a in layers):
        raise InputError(f"{where}: out of range 0..{num_layers} for {model_dir}; pass --aux-layers a,b,c within it")
    if layers != sorted(set(layers)):
        raise InputError(
            f"{where}: they repeat or go backwards for {model_dir} ({num_layers} layers); pass --aux-layers "
            "a,b,c: three increasing HF hidden_states indices"
        )
    return layers


@dataclass(frozen=True, kw_only=True)
class HFEngineConfig:
    model_dir: Path
    """A local HF model directory (see dataflow.target.resolve_target)."""
    device: str = "auto"
    """'cpu', 'cuda[:i]' or 'auto' (cuda if visible, else cpu; see resolved_device)."""
    dtype: str = "auto"
    """'float32', 'bfloat16', or 'auto': bfloat16 on CUDA and on CPUs with native bf16 matmuls (oneDNN
    AVX512-BF16/AMX: the forward measured 3.9x faster than fp32 there, scripts/bench_rollout.py), else
    float32."""
    threads: int | None = None
    """torch CPU threads; None keeps torch's default."""
    aux_layers: tuple[int, ...] | None = None
    """HF hidden_states indices to capture; None = default_aux_layers(N)."""
    chat_template: str | None = None
    """A Jinja file or string replacing the tokenizer's chat template."""

    def __post_init__(self):
        if self.dtype not in (*ENGINE_DTYPES, "auto"):
            raise ValueError(f"dtype must be one of {[*ENGINE_DTYPES, 'auto']}, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.aux_layers is not None and len(self.aux_layers) != 3:
            raise ValueError(f"aux_layers needs 3 layer indices (EAGLE3 fuses 3), got {list(self.aux_layers)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") or cpu_has_fast_bf16() else torch.float32
        return torch_dtype(self.dtype)


def resolved_device(config: HFEngineConfig) -> HFEngineConfig:
    """--device auto (cuda if this process sees one, else cpu) settled where the engine runs: a Ray actor's
    node, not the driver's. The trainer's rule (train/dist.py), so both commands read --device alike."""
    from dataflow.train.dist import pick_device

    return dataclasses.replace(config, device=str(pick_device(config.device, local_rank=0)))


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (without it, bf16 is emulated and slower)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class HFEngine:
    def __init__(self, config: HFEngineConfig):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config = resolved_device(config)
        attention = {}
        if config.device == "cpu":
            register_cpu_attention()
            attention = {"attn_implementation": CPU_ATTENTION}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=config.torch_dtype, **attention)
        except (OSError, ValueError) as e:
            raise InputError(f"target model {config.model_dir}: cannot load it ({e}); pass a valid --target-model")
        self.model.to(config.device).eval()
        set_chat_template(self.tokenizer, config.model_dir, config.chat_template)
        model_config = self.model.config
        self.num_layers = model_config.num_hidden_layers
        self.hidden_size = model_config.hidden_size
        self.vocab_size = model_config.vocab_size
        self.aux_layers = choose_aux_layers(config.aux_layers, self.num_layers, config.model_dir)

    def describe(self) -> dict:
        """The run's `target` record (read by the trainer)."""
        return {
            "model": str(Path(self.config.model_dir).resolve()),
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_hidden_layers": self.num_layers,
            "aux_layers": self.aux_layers,
            "dtype": str(self.config.torch_dtype).removeprefix("torch."),
        }

    @torch.inference_mode()
    def features(self, batch: list[TokenizedSample]) -> list[dict[str, torch.Tensor]]:
        """One right-padded forward over `batch`; per-sample features with the padding removed."""
        lengths = [len(s.input_ids) for s in batch]
        input_ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)
        for b, sample in enumerate(batch):
            input_ids[b, : lengths[b]] = torch.tensor(sample.input_ids)
            attention_mask[b, : lengths[b]] = 1
        device = self.config.device
        # The base model (no lm_head): the trainer applies lm_head itself, so logits would be wasted work.
        out = self.model.get_decoder()(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), output_hidden_states=True
        )
        aux = torch.cat([out.hidden_states[a] for a in self.aux_layers], dim=-1).cpu()  # (B, T, 3H); syncs
        last = out.last_hidden_state.cpu()  # (B, T, H)
        return [
            {
                "input_ids": input_ids[b, :n],
                "loss_mask": torch.tensor(sample.loss_mask, dtype=torch.bool),
                "aux_hidden": aux[b, :n],
                "target_hidden": last[b, :n],
            }
            for b, (sample, n) in enumerate(zip(batch, lengths))
        ]

    def generate(
        self, conversations: list[list[dict]], *, max_new_tokens: int, temperature: float | list[float],
        contenders: torch.Tensor | None = None,
    ) -> list[str]:
        """The target's reply to each conversation (ending with a user turn); `temperature`: one for all, or
        one per conversation (0 = greedy)."""
        return self.complete(self.rendered(conversations), max_new_tokens=max_new_tokens, temperature=temperature,
                             contenders=contenders)

    def rendered(self, conversations: list[list[dict]]) -> list[str]:
        """Each conversation in the chat template, up to where the assistant's reply starts."""
        return [render(self.tokenizer, c, add_generation_prompt=True) for c in conversations]

    def left_padded(self, texts: list[str]):
        """`texts` tokenised as one batch, left-padded (generate appends on the right), on the engine's device."""
        tok = self.tokenizer
        if tok.pad_token is None:  # left padding needs a pad token; the attention mask hides it
            tok.pad_token = tok.eos_token
        tok.padding_side, side = "left", tok.padding_side
        try:
            return tok(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(self.config.device)
        finally:
            tok.padding_side = side

    @torch.inference_mode()
    def complete(
        self, texts: list[str], *, max_new_tokens: int, temperature: float | list[float],
        contenders: torch.Tensor | None = None,
    ) -> list[str]:
        """The target's continuation of each rendered text up to its end-of-turn: batched, left-padded.
        `temperature`: one for all texts or one per text; 0 = greedy.
        `contenders` (V,), if given, counts the target's top next-token candidates at every position it
        wrote (what it was likely to say there, not only what it said)."""
        tok = self.tokenizer
        enc = self.left_padded(texts)
        stop_ids = self.model.generation_config.eos_token_id
        processors = [] if contenders is None else [Contenders(contenders, stop_ids, enc["input_ids"].shape[1])]
        temperatures = per_row(temperature, len(texts))
        if any(t > 0 for t in temperatures):  # after Contenders: it counts the target's own candidates, not the draw
            processors.append(InverseCDFSampler(torch.tensor(temperatures)))
        from transformers import LogitsProcessorList

        out = self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,  # greedy over the processed scores: the sampler left one token possible
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
            logits_processor=LogitsProcessorList(processors),
        )
        return [tok.decode(row, skip_special_tokens=True).strip() for row in out[:, enc["input_ids"].shape[1] :]]


def per_row(temperature: float | list[float], rows: int) -> list[float]:
    """One temperature per row, from one for all rows or one per row."""
    if isinstance(temperature, (int, float)):
        return [float(temperature)] * rows
    if len(temperature) != rows:
        raise ValueError(f"{len(temperature)} temperatures for {rows} rows")
    return [float(t) for t in temperature]


class InverseCDFSampler:
    """A generate() logits processor that draws each row's next token from softmax(scores / temperature)
    and leaves only that token possible, for generate's greedy step to pick. Why not generate's own
    sampling: torch.multinomial draws an exponential per vocabulary id (64 rows x 49k ids: 50 ms of a
    225 ms step on 2 cores); one uniform per row against the cumulative distribution is the same law in
    2 ms. Seeded by torch's global generator, like generate's sampling. `temperature`: one for all rows or
    a (rows,) tensor; a row at 0 keeps its argmax (greedy), and still draws its uniform, so that the other
    rows' draws do not depend on which rows are greedy."""

    def __init__(self, temperature: float | torch.Tensor):
        temperature = torch.as_tensor(temperature, dtype=torch.float32).reshape(-1, 1)  # (rows or 1, 1)
        # fixed for the whole generate call: worked out once, not at every decoding step
        self.sampled = temperature > 0
        self.all_sampled = bool(self.sampled.all())
        self.divisor = torch.where(self.sampled, temperature, 1.0)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.float() / self.divisor.to(scores.device), dim=-1).cumsum_(dim=-1)
        uniform = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        # right: the first id whose cumulative mass exceeds the draw, so an id of zero probability never is
        drawn = torch.searchsorted(cdf, uniform, right=True).clamp_(max=cdf.shape[1] - 1)
        if not self.all_sampled:
            drawn = torch.where(self.sampled.to(scores.device), drawn, scores.argmax(dim=-1, keepdim=True))
        return scores.fill_(float("-inf")).scatter_(1, drawn, 0.0)  # in place: no fresh (rows, V) per step


class Contenders:
    """A generate() logits processor that counts, at every position a row is still writing, the target's
    `top_k` most likely next tokens into `counts` (V,), and leaves the scores alone. A row is done once its
    last token is a stop token. (Top-k, not the probability mass: summed over thousands of positions the
    mass favours tokens every distribution's tail carries a little of, not the ones the target weighs.)"""

    def __init__(self, counts: torch.Tensor, stop_ids: int | list[int] | None, prompt_length: int, top_k: int = CONTENDERS_TOP_K):
        self.counts, self.prompt_length, self.top_k = counts, prompt_length, top_k
        self.stop_ids = torch.tensor([] if stop_ids is None else stop_ids, dtype=torch.long).reshape(-1)
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        elif input_ids.shape[1] > self.prompt_length:
            self.done |= torch.isin(input_ids[:, -1], self.stop_ids.to(input_ids.device))
        top = scores[~self.done, : self.counts.numel()].topk(self.top_k, dim=-1).indices.flatten().cpu()
        self.counts.index_add_(0, top, torch.ones(top.numel(), dtype=self.counts.dtype))
        return scores


def token_budget_batches(
    samples: list[TokenizedSample], token_budget: int, max_padding: float = 0.25
) -> list[list[TokenizedSample]]:
    """Length-sorted batches whose padded size (batch x longest) stays within the budget, and where no
    sample is padded by more than `max_padding` of the batch's longest (padding is wasted compute)."""
    batches: list[list[TokenizedSample]] = []
    for sample in sorted(samples, key=lambda s: len(s.input_ids), reverse=True):
        longest = len(batches[-1][0].input_ids) if batches else 0
        fits = batches and (len(batches[-1]) + 1) * longest <= token_budget
        if fits and len(sample.input_ids) >= (1 - max_padding) * longest:
            batches[-1].append(sample)
        else:
            batches.append([sample])
    return batches
