"""The two frozen target tensors the trainer needs, read from the HF dir without building the model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from dataflow.errors import InputError


@dataclass(frozen=True)
class TargetHead:
    config: dict  # the target's config.json
    embed_tokens: torch.Tensor  # (V, H)
    lm_head: torch.Tensor  # (V, H); the embeddings when tie_word_embeddings


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded checkpoints carry an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"target model {model_dir}: no *.safetensors files; point the rollout at an HF model dir")
    names = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names.update({name: file for name in f.keys()})
    return names


def _find(names: dict[str, Path], suffix: str) -> str | None:
    """The shortest tensor name ending in `suffix` (e.g. model.embed_tokens.weight before a vision tower's)."""
    matches = sorted((n for n in names if n == suffix or n.endswith("." + suffix)), key=len)
    return matches[0] if matches else None


def _read(names: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(names[name], framework="pt") as f:
        return f.get_tensor(name)


def read_target_tensors(model_dir: str | Path, suffixes: list[str]) -> dict[str, torch.Tensor]:
    """The target's tensors by name suffix (e.g. `layers.29.mlp.up_proj.weight`: the shortest name ending in
    it), read from its safetensors without building the model."""
    model_dir = Path(model_dir)
    names = _tensor_files(model_dir)
    found = {suffix: _find(names, suffix) for suffix in suffixes}
    missing = [suffix for suffix, name in found.items() if name is None]
    if missing:
        raise InputError(f"target model {model_dir}: no tensor named like {missing[0]} ({len(missing)} missing); "
                         "it is not a Llama-style decoder")
    return {suffix: _read(names, name) for suffix, name in found.items()}


def load_target_head(model_dir: str | Path) -> TargetHead:
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise InputError(f"target model {model_dir}: config.json not found; is the run's target dir still there?")
    config = json.loads(config_file.read_text())
    text = config.get("text_config", config)  # multimodal configs nest the language model's
    config = text | {"tie_word_embeddings": config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))}
    names = _tensor_files(model_dir)
    embed_name = _find(names, "embed_tokens.weight")
    if embed_name is None:
        raise InputError(f"target model {model_dir}: no embed_tokens.weight tensor found")
    embed = _read(names, embed_name)
    head_name = _find(names, "lm_head.weight")
    if head_name is None and not config["tie_word_embeddings"]:
        raise InputError(f"target model {model_dir}: no lm_head.weight and tie_word_embeddings is false")
    head = embed if head_name is None else _read(names, head_name)
    return TargetHead(config=config, embed_tokens=embed, lm_head=head)
