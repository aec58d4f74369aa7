import json

import pytest
from safetensors import safe_open

from dataflow.errors import InputError
from dataflow.target import cache_root, cached_dir_for, default_gguf_path, resolve_target


def test_the_default_target_is_the_bundled_smollm2_gguf_converted_once_into_a_cached_hf_dir():
    model_dir = resolve_target()
    assert model_dir.parent == cache_root() and model_dir.name.startswith(default_gguf_path().stem)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        # the trainer reads these two directly; lm_head is written even though SmolLM2 ties it
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("lm_head.weight").get_shape() == [49152, 576]
    assert (model_dir / "tokenizer.json").exists()
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_target() == model_dir and (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_an_hf_dir_is_used_in_place(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_target(tmp_path) == tmp_path.resolve()


def test_a_missing_model_path_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such file or directory; pass --target-model"):
        resolve_target(tmp_path / "nope")


def test_an_hf_dir_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(InputError, match="no \\*.safetensors"):
        resolve_target(tmp_path)


def test_a_directory_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        resolve_target(tmp_path)


def test_an_unreadable_gguf_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFLOW_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(InputError, match="cannot read this GGUF file"):
        resolve_target(bad)
    assert not list((tmp_path / "cache").glob("broken-*/config.json"))


CONVERT_WITH_A_SLOW_FAKE = """
import sys, time
from pathlib import Path
import dataflow.target as target

def fake_convert(gguf, out_dir):
    time.sleep(1.0)
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text("{}")
    with open(sys.argv[2], "a") as log:
        log.write("converted\\n")

target.convert_gguf = fake_convert
print(target.cached_conversion(Path(sys.argv[1])))
"""


def test_two_processes_resolving_the_same_gguf_convert_it_only_once_and_clear_a_killed_conversion(
    tmp_path, monkeypatch
):
    import os
    import subprocess
    import sys

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    log = tmp_path / "conversions.log"
    env = {**os.environ, "DATAFLOW_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("DATAFLOW_CACHE", str(tmp_path / "cache"))
    expected = cached_dir_for(gguf)
    (expected.parent / f".{expected.name}.tmp-1").mkdir(parents=True)  # left by a converter killed midway
    procs = [
        subprocess.Popen([sys.executable, "-c", CONVERT_WITH_A_SLOW_FAKE, str(gguf), str(log)], env=env,
                         stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1] and outputs[0].startswith(str(tmp_path / "cache" / "model-"))
    assert log.read_text() == "converted\n"
    assert outputs[0] == str(expected) and [p for p in expected.parent.iterdir() if p.is_dir()] == [expected]


def test_a_gguf_is_cached_by_its_contents_not_its_path(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFLOW_CACHE", str(tmp_path / "cache"))
    body = bytes(range(256)) * 12_000  # 3 MB: the key reads the first and last MiB
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(body)
    assert cached_dir_for(first) == cached_dir_for(second)  # the same file installed twice: one conversion
    second.write_bytes(body[:-1] + b"\x00")  # another file: its last tensor's data differs
    assert cached_dir_for(first) != cached_dir_for(second)
    second.write_bytes(body + b"\x00")  # one more byte
    assert cached_dir_for(first) != cached_dir_for(second)
