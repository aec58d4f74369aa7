"""The option vocabulary the commands share: one dtype spelling, devices, byte sizes with units, help panels,
and usage errors as one line."""

from __future__ import annotations

import inspect
import re
import sys
from typing import Literal

import typer


class OneLineUsageErrors(typer.core.TyperGroup):
    """A mistyped option or a bad value is one line and exit 2 too, like every other refusal (invariant 8)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # Exit(n) comes back as n
        except typer._click.exceptions.UsageError as e:
            message = e.format_message().rstrip(".")
            if message:  # empty when the help was shown instead (no arguments)
                where = f"; see `{e.ctx.command_path} --help`" if e.ctx is not None else ""
                typer.echo(f"error: {message}{where}", err=True)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


# One spelling per dtype across commands, the long names accepted too.
Dtype = Literal["auto", "fp32", "bf16", "float32", "bfloat16"]
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}  # train's names
LONG_DTYPES = {short: long for long, short in SHORT_DTYPES.items()}  # the target engines' (torch's) names
FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # torch's names of the dtypes features may have
BYTE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
              "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def torch_dtype(name: str):
    """The torch dtype a name stands for, in either spelling (fp32 or float32, bf16 or bfloat16), or float16."""
    import torch  # here: the CLI's parsing stays torch-free

    long = LONG_DTYPES.get(name, name)
    if long not in FLOAT_DTYPES:
        raise ValueError(f"dtype {name!r}: pick one of {', '.join(FLOAT_DTYPES)}")
    return getattr(torch, long)


def parse_bytes(value: str | int) -> int:
    """A byte count with an optional unit: 4GiB, 512MiB, 1.5GB, 1073741824."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match[2].lower() not in BYTE_UNITS:
        raise typer.BadParameter(f"{value!r}: pass bytes with a unit, e.g. 4GiB, 512MiB or 1073741824")
    return int(float(match[1]) * BYTE_UNITS[match[2].lower()])


def check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r}: pass auto, cpu, cuda or cuda:N")
    return value


def help_panels(panels: dict[str, tuple[str, ...]]):
    """Group a command's options into `--help` panels by parameter name (kept apart from the option lines;
    an option shared by commands, like --db, is in the same panel everywhere)."""

    def decorate(fn):
        params = inspect.signature(fn).parameters
        for panel, names in panels.items():
            for name in names:
                option = params[name].default
                if option.rich_help_panel not in (None, panel):  # a shared option object: one panel for all
                    raise ValueError(f"--{name} is in panel {option.rich_help_panel!r} elsewhere, not {panel!r}")
                option.rich_help_panel = panel
        return fn

    return decorate
