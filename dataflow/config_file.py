"""`--config run.toml`: option defaults per command from one TOML file, flags on the command line winning.

    [rollout]                  # `dataflow rollout`'s options, named as flags (dashes or underscores)
    db = "runs/a.sqlite"
    max-length = 1024
    [train]
    db = "runs/a.sqlite"
    lr = 3e-4
    [eval]
    num-draft-tokens = 5
    [run]                      # `dataflow run`'s own options (its children read [rollout] and [train])
    ray = "local"

The file only sets click's `default_map`, so precedence, type conversion and `--help` stay click's.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from dataflow.errors import InputError

CONFIG_KEY = "dataflow.config"  # where the file's path is kept in click's ctx.meta (shared by every context)


def read_sections(path: Path) -> dict[str, dict]:
    """The file's sections as {command: {key: value}}; a missing or malformed file is one line."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"--config {path}: no such file; pass a TOML file with [rollout], [train], [eval] or [run]") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"--config {path}: not readable as TOML ({e}); fix the file") from None
    loose = [k for k, v in data.items() if not isinstance(v, dict)]
    if loose:
        raise InputError(f"--config {path}: key {loose[0]!r} is outside a section; put it under [rollout], "
                         "[train], [eval] or [run]")
    return data


def section_defaults(path: Path, section: str, values: dict, command) -> dict:
    """One section's keys as `command`'s parameter names (click's default_map); an unknown key is one line."""
    names = {p.name for p in command.params if p.param_type_name == "option" and p.name != "config"}
    defaults = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in names:
            raise InputError(f"--config {path}: [{section}] has no option {key!r} (`dataflow {section} --help` "
                             "lists them); fix or remove the key")
        defaults[name] = value
    return defaults


def group_defaults(path: Path, commands: dict) -> dict:
    """click's default_map for the whole group ({command: {parameter: value}}): every section must name a
    command and hold only its options, whichever command reads the file."""
    sections = read_sections(path)
    unknown = sorted(set(sections) - set(commands))
    if unknown:
        raise InputError(f"--config {path}: unknown section [{unknown[0]}]; use [rollout], [train], [eval] or [run]")
    return {name: section_defaults(path, name, values, commands[name]) for name, values in sections.items()}
