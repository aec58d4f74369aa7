"""CLI smoke tests through typer's CliRunner, plus `dataflow run`'s option routing."""

import json

import click
import pytest
from typer.testing import CliRunner

from dataflow.cli import app
from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefItem, RefQueue
from dataflow.errors import InputError
from dataflow.run import route_options

runner = CliRunner()


def make_run(tmp_path, n=3):
    db = tmp_path / "run.sqlite"
    conn = connect(db)
    RefQueue(conn).put_many([RefItem(f"s{i}", {"kind": "test"}, 100, "arena-a") for i in range(n)])
    RunMeta(conn).heartbeat("rollout-0", "rollout", "waiting for trainer")
    return db, conn


def test_status_json_reports_counts_bytes_and_processes(tmp_path):
    db, _ = make_run(tmp_path)
    result = runner.invoke(app, ["status", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    snap = json.loads(result.output)
    assert snap["refs"]["pending"] == 3
    assert snap["in_flight_bytes"] == 300
    assert snap["processes"][0]["status"] == "waiting for trainer"
    assert snap["processes"][0]["alive"] is True


def test_status_table_shows_the_waiting_producer(tmp_path):
    db, _ = make_run(tmp_path)
    result = runner.invoke(app, ["status", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "waiting for trainer" in result.output
    assert "pending 3" in result.output


def test_status_of_a_missing_database_is_one_line_and_nonzero(tmp_path):
    result = runner.invoke(app, ["status", "--db", str(tmp_path / "nope.sqlite")])
    assert result.exit_code == 2
    assert "no such run database" in result.output
    assert not (tmp_path / "nope.sqlite").exists()


def test_a_file_that_is_not_a_database_is_refused_and_left_intact(tmp_path):
    bogus = tmp_path / "notes.sqlite"
    bogus.write_text("my precious notes\n")
    result = runner.invoke(app, ["status", "--db", str(bogus)])
    assert result.exit_code == 2
    assert "not a dataflow database" in result.output
    assert bogus.read_text() == "my precious notes\n"


def test_dead_lists_dead_refs_and_requeue_revives_them(tmp_path):
    db, conn = make_run(tmp_path, n=1)
    queue = RefQueue(conn, max_attempts=1)
    (lease,) = queue.lease("c", 1)
    queue.fail(lease.token, "bad sample", retryable=True)
    result = runner.invoke(app, ["dead", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "bad sample" in result.output
    result = runner.invoke(app, ["dead", "--db", str(db), "--requeue"])
    assert "requeued 1 dead refs" in result.output
    assert queue.counts()["pending"] == 1


def fake_command(*options):
    return click.Command("x", params=list(options))


def test_run_routes_each_option_to_the_commands_that_accept_it():
    rollout = fake_command(
        click.Option(["--db"]), click.Option(["--seed"]), click.Option(["--regenerate/--no-regenerate"])
    )
    train = fake_command(click.Option(["--db"]), click.Option(["--seed"]), click.Option(["--lr"]))
    routed = route_options(
        ["--db", "r.sqlite", "--regenerate", "--lr", "3e-4", "--seed=7"], {"rollout": rollout, "train": train}
    )
    assert routed["rollout"] == ["--db", "r.sqlite", "--regenerate", "--seed=7"]
    assert routed["train"] == ["--db", "r.sqlite", "--lr", "3e-4", "--seed=7"]


def test_run_sends_a_role_prefixed_option_to_that_command_only():
    rollout = fake_command(click.Option(["--dtype"]))
    train = fake_command(click.Option(["--dtype"]))
    routed = route_options(["--train-dtype", "bf16", "--rollout-dtype=float32"], {"rollout": rollout, "train": train})
    assert routed == {"rollout": ["--dtype=float32"], "train": ["--dtype", "bf16"]}


def test_run_refuses_an_option_neither_command_knows():
    with pytest.raises(InputError, match="--bogus"):
        route_options(["--bogus", "1"], {"rollout": fake_command(), "train": fake_command()})


def real_commands():
    import typer

    group = typer.main.get_command(app)
    return {role: group.commands[role] for role in ("rollout", "train")}


def test_run_refuses_an_option_that_means_different_things_to_the_two_commands():
    with pytest.raises(InputError, match="--epochs means different things.*--rollout-epochs and/or --train-epochs"):
        route_options(["--epochs", "2"], real_commands())
    assert route_options(["--train-epochs", "2"], real_commands()) == {"rollout": [], "train": ["--epochs", "2"]}


def test_every_option_both_commands_have_is_routed_as_run_help_says():
    from dataflow.run import TO_BOTH, option_arity

    commands = real_commands()
    shared = set(option_arity(commands["rollout"])) & set(option_arity(commands["train"]))
    help_text = " ".join(runner.invoke(app, ["run", "--help"], terminal_width=200).output.split())
    for name in sorted(shared):
        assert "--" + name.removeprefix("--no-").removeprefix("--") in help_text.replace("[no-]", ""), name
        args = [name] if not option_arity(commands["rollout"])[name] else [name, "1"]
        if name in TO_BOTH:
            assert route_options(args, commands) == {"rollout": args, "train": args}
        else:
            with pytest.raises(InputError, match="means different things"):
                route_options(args, commands)


@pytest.mark.parametrize("spelling", ["bf16", "bfloat16", "fp32", "float32", "auto"])
def test_one_dtype_vocabulary_for_both_commands(spelling):
    from dataflow.cli import LONG_DTYPES, train_configs
    from dataflow.rollout.engines.hf import ENGINE_DTYPES

    routed = route_options(["--dtype", spelling], real_commands())
    params = {role: command.make_context(role, routed[role]).params for role, command in real_commands().items()}
    short = {"bfloat16": "bf16", "float32": "fp32"}.get(spelling, spelling)
    assert train_configs(params["train"])[0].dtype == short
    assert LONG_DTYPES.get(params["rollout"]["dtype"], params["rollout"]["dtype"]) in (*ENGINE_DTYPES, "auto")


def test_one_table_turns_a_dtype_name_of_either_spelling_into_torchs():
    import torch

    from dataflow.options import torch_dtype

    assert torch_dtype("bf16") is torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype("fp32") is torch.float32 and torch_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="pick one of float32, bfloat16, float16"):
        torch_dtype("float64")


@pytest.mark.parametrize("text, value", [("4GiB", 4 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000),
                                         ("1073741824", 1 << 30)])
def test_max_inflight_bytes_takes_units(text, value):
    command = real_commands()["rollout"]
    assert command.make_context("rollout", ["--max-inflight-bytes", text]).params["max_inflight_bytes"] == value


def test_every_option_of_every_command_has_help():
    import typer

    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"dataflow {name} {param.opts[0]} has no help"


@pytest.mark.parametrize("command", ["rollout", "train"])
def test_every_rollout_and_train_option_is_in_a_named_help_panel(command):
    params = real_commands()[command].params
    assert [p.name for p in params if p.param_type_name == "option" and not p.rich_help_panel] == []


def test_every_cli_default_equals_its_config_fields_default():
    """One default per option: the typer option and the config dataclass field it fills must agree."""
    import dataclasses

    import typer

    from dataflow.options import parse_bytes
    from dataflow.rollout.config import RolloutConfig
    from dataflow.rollout.engines.hf import HFEngineConfig
    from dataflow.train.config import TrainConfig, TrainOptions

    group = typer.main.get_command(app)
    checked = 0
    for command, configs in {"rollout": (RolloutConfig, HFEngineConfig), "train": (TrainConfig, TrainOptions)}.items():
        cli = {p.name: p.default for p in group.commands[command].params}
        for config in configs:
            for field in dataclasses.fields(config):
                if field.name not in cli or field.default is dataclasses.MISSING:
                    continue
                given = cli[field.name]
                if field.name.endswith("_bytes") and isinstance(given, str):
                    given = parse_bytes(given)
                assert given == field.default, (command, config.__name__, field.name, given, field.default)
                checked += 1
    assert checked > 30  # the comparison really covers the options
