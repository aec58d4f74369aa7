"""Checkpoints: an SGLang/vLLM-loadable export plus the training state, written whole or not at all.

    OUT/step-00000100/config.json            LlamaForCausalLMEagle3, one layer (docs/architecture.md, "Checkpoint")
    OUT/step-00000100/model.safetensors      export names, no `model.` prefix
    OUT/step-00000100/training_state.pt      model (fp32), optimiser, scheduler, RNG, step, refs covered
    OUT/latest -> step-00000100              always the newest recorded checkpoint
    OUT/final  -> step-...                   set when the run finished (its stream drained)

A checkpoint is written into a temp dir (owner-only, like the database), fsynced and renamed, so a crash
leaves either the old set or the new one. It counts (its refs become `trained`) only once the caller records
it in the run database; only then does `publish` move `latest` and prune, so the last recorded checkpoint
is never deleted. The training state carries the run id: another run's state is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dataflow.errors import InputError
from dataflow.train.eagle3 import AUX_LAYERS_KEY, DraftConfig, Eagle3Draft

EXPORT_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "training_state.pt"
EMBED_NAME = "embed_tokens.weight"
TMP_PREFIX = ".tmp-step-"
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


def export_shapes(cfg: DraftConfig) -> dict[str, tuple[int, ...]]:
    """The tensors SGLang's LlamaForCausalLMEagle3 reads, with their shapes (embed_tokens optional)."""
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = "midlayer.self_attn"
    return {
        f"{attn}.q_proj.weight": (cfg.num_attention_heads * hd, 2 * H),
        f"{attn}.k_proj.weight": (cfg.num_key_value_heads * hd, 2 * H),
        f"{attn}.v_proj.weight": (cfg.num_key_value_heads * hd, 2 * H),
        f"{attn}.o_proj.weight": (H, cfg.num_attention_heads * hd),
        "midlayer.mlp.gate_proj.weight": (I, H),
        "midlayer.mlp.up_proj.weight": (I, H),
        "midlayer.mlp.down_proj.weight": (H, I),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,),
        "fc.weight": (H, 3 * cfg.target_hidden_size),
        "norm.weight": (H,),
        "lm_head.weight": (cfg.draft_vocab_size, H),
        "d2t": (cfg.draft_vocab_size,),
        "t2d": (cfg.vocab_size,),
    }


def export_tensors(model: Eagle3Draft, *, dtype: torch.dtype, include_embed: bool) -> dict[str, torch.Tensor]:
    """The state dict in serving form: weights in `dtype`, d2t int64, t2d bool; checked against the list."""
    wanted = set(export_shapes(model.cfg)) | ({EMBED_NAME} if include_embed else set())
    state = model.state_dict()
    if set(state) - {EMBED_NAME} != set(export_shapes(model.cfg)):
        raise RuntimeError(f"draft parameters {sorted(state)} differ from the export list; fix eagle3.py")
    out = {}
    for name in sorted(wanted):
        t = state[name].detach().cpu()
        out[name] = t if name in ("d2t", "t2d") else t.to(dtype)
    return {name: t.contiguous() for name, t in out.items()}


def write_export(model: Eagle3Draft, out_dir: Path, *, dtype: torch.dtype, include_embed: bool,
                 aux_layers: list[int]) -> None:
    torch_dtype = str(dtype).removeprefix("torch.")
    config = model.cfg.to_hf_config(torch_dtype=torch_dtype, aux_layers=aux_layers)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(export_tensors(model, dtype=dtype, include_embed=include_embed), out_dir / EXPORT_FILE)


def read_export(path: str | Path) -> tuple[DraftConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    hf = json.loads((path / CONFIG_FILE).read_text())
    cfg = DraftConfig(**{k: hf[k] for k in DraftConfig.__dataclass_fields__})
    with safe_open(path / EXPORT_FILE, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return cfg, tensors


def export_aux_layers(path: str | Path) -> list[int] | None:
    """The target layers (HF hidden_states indices) an export was trained on; None for older exports."""
    return json.loads((Path(path) / CONFIG_FILE).read_text()).get(AUX_LAYERS_KEY)


def draft_from_export(path: str | Path, *, embed_tokens: torch.Tensor | None = None) -> Eagle3Draft:
    """Rebuild the draft from an export (embeddings from the export, else from `embed_tokens`)."""
    cfg, tensors = read_export(path)
    embed = tensors.pop(EMBED_NAME, embed_tokens)
    if embed is None:
        raise InputError(f"{path}: the export has no embed_tokens; pass the target's embeddings")
    model = Eagle3Draft(cfg, embed_tokens=embed.float(), d2t=tensors["d2t"], t2d=tensors["t2d"])
    weights = {name: t.float() if t.is_floating_point() else t for name, t in tensors.items()}
    model.load_state_dict(weights, strict=False)
    return model


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(path)


def _point(link: Path, target_name: str) -> None:
    """Atomically make `link` a relative symlink to `target_name`."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target_name)
    os.replace(tmp, link)


def _make_private(directory: Path) -> None:
    """Checkpoints are the run's data, like the database and the feature files: owner-only."""
    os.chmod(directory, PRIVATE_DIR)
    for file in directory.iterdir():
        os.chmod(file, PRIVATE_FILE)


def write_checkpoint(out: Path, step: int, model: Eagle3Draft, state: dict, *, dtype: torch.dtype,
                     include_embed: bool, aux_layers: list[int]) -> Path:
    """Write OUT/step-N (export + training state) atomically. It is not `latest` and prunes nothing until the
    caller has recorded it in the run database and calls `publish`."""
    final = out / f"step-{step:08d}"
    tmp = out / f"{TMP_PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=PRIVATE_DIR)
    write_export(model, tmp, dtype=dtype, include_embed=include_embed, aux_layers=aux_layers)
    torch.save(state, tmp / STATE_FILE)
    _make_private(tmp)
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a complete dir from a run whose record never became durable
    os.replace(tmp, final)
    _fsync_dir(out)
    return final


def publish(out: Path, recorded: Path, *, keep: int) -> None:
    """After `recorded` is durable in the run database: point `latest` at it and keep the newest `keep`
    step dirs (never `recorded` itself, nor what `latest`/`final` point to)."""
    _point(out / "latest", recorded.name)
    pinned = {recorded.resolve()} | {(out / link).resolve() for link in ("latest", "final") if (out / link).exists()}
    steps = sorted(out.glob("step-*"))
    for old in steps[: max(0, len(steps) - keep)]:
        if old.resolve() not in pinned:
            shutil.rmtree(old, ignore_errors=True)


def remove_partial_writes(out: Path) -> list[str]:
    """Temp dirs of checkpoint writes that a kill interrupted (only this run's one trainer writes here)."""
    partial = sorted(p for p in out.glob(f"{TMP_PREFIX}*") if p.is_dir())
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in partial]


def mark_final(out: Path, checkpoint: Path) -> Path:
    _point(out / "final", checkpoint.name)
    return out / "final"


def read_training_state(checkpoint: str | Path, *, run_id: str | None = None) -> dict:
    """The training state of a checkpoint (tensors and plain data only: weights_only); with `run_id`, refused
    unless it is that run's."""
    path = Path(checkpoint) / STATE_FILE
    if not path.exists():
        raise InputError(f"checkpoint {checkpoint}: {STATE_FILE} missing; the run's checkpoint dir was altered")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(
            f"checkpoint {checkpoint}: {STATE_FILE} holds objects other than tensors and plain data; not loading "
            "it (a dataflow state never does): restore the checkpoint dir or start a new run"
        ) from None
    if run_id is not None:
        check_run(state, checkpoint, run_id)
    return state


def check_run(state: dict, checkpoint: str | Path, run_id: str) -> None:
    """Refuse another run's checkpoint (two runs sharing an --out). States older than the stamp pass."""
    if state.get("run_id", run_id) != run_id:
        raise InputError(
            f"checkpoint {checkpoint} belongs to run {state['run_id'][:12]}, not to this run ({run_id[:12]}): "
            "two runs share this --out; give each run its own --out"
        )


def check_out_dir_run(out: Path, run_id: str) -> None:
    """Before writing into `out`: its newest checkpoint must be this run's (read lazily, mmap)."""
    latest = out / "latest" / STATE_FILE
    if latest.exists():
        check_run(torch.load(latest, map_location="cpu", weights_only=True, mmap=True), out / "latest", run_id)
