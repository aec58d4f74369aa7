"""The `dataflow` command. Thin: parse options, build objects, call into the packages.

Commands that need torch import it inside their body so `dataflow status` stays fast.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
from pathlib import Path
from typing import Literal

import typer

from dataflow.errors import FULL_DISK, DatabaseError, DataflowError, StoreError, disk_full, sqlite_problem
from dataflow.options import LONG_DTYPES, SHORT_DTYPES, Dtype, OneLineUsageErrors, check_device, help_panels, parse_bytes

log = logging.getLogger(__name__)
app = typer.Typer(
    cls=OneLineUsageErrors,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Online, disaggregated training of EAGLE3 draft models: `rollout` and `train` share one SQLite file.",
)


def print_version(value: bool) -> None:
    if value:
        from dataflow import __version__

        typer.echo(f"dataflow {__version__}")
        raise typer.Exit()


DbOption = typer.Option(Path("run.sqlite"), "--db", help="The run's SQLite file (created on first use).")
AllowNetworkFs = typer.Option(
    False, "--allow-network-fs", help="Use a database on a network filesystem anyway (WAL may corrupt it)."
)
DeviceOption = typer.Option(
    "auto", "--device", callback=check_device, metavar="<auto|cpu|cuda|cuda:N>",
    help="auto: cuda if one is visible, else cpu.",
)
VerboseOption = typer.Option(False, "--verbose", "-v", help="Debug log lines too.")
QuietOption = typer.Option(False, "--quiet", "-q", help="Only warnings and errors in the log.")


def one_line_errors(fn):
    """Map DataflowError to one line on stderr and a non-zero exit (traceback with DATAFLOW_DEBUG=1).
    SQLite failures (corrupt, read-only, full disk) and a full disk under a store become one too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            except sqlite3.Error as e:
                raise DatabaseError(sqlite_problem(kwargs.get("db"), e)) from e
            except OSError as e:
                if e.errno not in FULL_DISK:
                    raise
                raise StoreError(disk_full(e)) from e
        except DataflowError as e:
            if os.environ.get("DATAFLOW_DEBUG") == "1":
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            typer.echo("interrupted; the run is resumable", err=True)
            raise typer.Exit(130)

    return wrapper


def file_defaults(ctx: typer.Context, path: Path) -> dict:
    """The --config file as click's default_map for the whole `dataflow` group (checked in full)."""
    from dataflow.config_file import CONFIG_KEY, group_defaults

    ctx.meta[CONFIG_KEY] = path  # ctx.meta is shared by every context: `dataflow run` hands the file on
    return group_defaults(path, typer.main.get_command(app).commands)


@one_line_errors
def use_config_file(ctx: typer.Context, path: Path | None) -> Path | None:
    """`COMMAND --config FILE`: the file's [COMMAND] section becomes this command's option defaults. Eager,
    so it runs before the other options take their defaults; flags given on the command line still win."""
    if path is not None:
        ctx.default_map = {**(ctx.default_map or {}), **file_defaults(ctx, path).get(ctx.info_name, {})}
    return path


ConfigOption = typer.Option(
    None, "--config", metavar="FILE.toml", is_eager=True, callback=use_config_file,
    help="Option defaults from this TOML file's \\[rollout], \\[train], \\[eval] or \\[run] section; flags win.",
)


@app.callback()
@one_line_errors
def root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=print_version, is_eager=True, help="Print the version and exit."
    ),
    config: Path = typer.Option(
        None, "--config", metavar="FILE.toml",
        help="Option defaults for every command from this TOML file (\\[rollout], \\[train], \\[eval], \\[run]); flags win.",
    ),
) -> None:
    """Online, disaggregated training of EAGLE3 draft models: `rollout` and `train` share one SQLite file."""
    if config is not None:
        ctx.default_map = file_defaults(ctx, config)


RUN_PANEL = ("db", "config", "verbose", "allow_network_fs")
HARDWARE_PANEL = ("device", "dtype", "threads")


def open_run(db: Path, allow_network_fs: bool = False):
    from dataflow.control.db import connect

    return connect(db, allow_network_fs=allow_network_fs)


def require_run(db: Path) -> Path:
    """Observer commands never create a run: a missing file is a typo, and an empty one is not a run (a
    run's database is never empty once created), so neither becomes a new run."""
    if not db.exists():
        raise DataflowError(f"{db}: no such run database; pass the --db of a run started with `dataflow rollout`")
    if db.is_file() and db.stat().st_size == 0:
        raise DataflowError(f"{db}: an empty file, not a run database; pass the --db of a run started with "
                            "`dataflow rollout`")
    return db


@app.command()
@one_line_errors
def status(
    db: Path = DbOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    watch: bool = typer.Option(False, "--watch", help="Refresh until Ctrl-C."),
    interval: float = typer.Option(1.0, help="Seconds between refreshes with --watch."),
    allow_network_fs: bool = AllowNetworkFs,
) -> None:
    """Counts by state, rates, lag, dead-letter and live producers/consumers of a run."""
    import json
    import time

    from rich.console import Console
    from rich.live import Live

    from dataflow.ui import collect, recorded_view, status_view

    conn = open_run(require_run(db), allow_network_fs)
    if as_json and not watch:
        typer.echo(json.dumps(collect(conn)))
        return
    console = Console()
    if not watch:
        snap = collect(conn)
        console.print(status_view(snap), recorded_view(snap))
        return
    with Live(status_view(collect(conn)), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            snap = collect(conn)
            if as_json:
                console.print_json(json.dumps(snap))
            else:
                live.update(status_view(snap), refresh=True)


def dead_table(title: str, rows: list):
    """Dead refs or dead tasks (both have id, key, attempts, last_error) as a rich table."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("id", "key", "attempts", "last error"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r.id), r.key, str(r.attempts), r.last_error or "")
    return table


@app.command()
@one_line_errors
def dead(
    db: Path = DbOption,
    requeue: bool = typer.Option(False, "--requeue", help="Give every dead ref and prompt task a fresh set of attempts."),
    limit: int = typer.Option(50, help="How many dead refs and tasks to list."),
    allow_network_fs: bool = AllowNetworkFs,
) -> None:
    """List dead refs and dead prompt tasks (attempts used up) with their last error; --requeue puts them back."""
    from rich.console import Console

    from dataflow.control.queue import RefQueue
    from dataflow.control.tasks import TaskQueue

    conn = open_run(require_run(db), allow_network_fs)
    refs, tasks = RefQueue(conn), TaskQueue(conn)
    console = Console()
    console.print(dead_table(f"dead refs ({refs.counts()['dead']})", refs.dead(limit)))
    console.print(dead_table(f"dead prompt tasks ({tasks.counts()['dead']})", tasks.dead(limit)))
    if requeue:
        typer.echo(f"requeued {refs.requeue_dead()} dead refs and {tasks.requeue_dead()} dead prompt tasks")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@one_line_errors
def run(
    ctx: typer.Context,
    db: Path = DbOption,
    config: Path = ConfigOption,
    ray_address: str = typer.Option(None, "--ray", help="Run on Ray: a cluster ADDRESS, auto, or local (throwaway)."),
    rollouts: int = typer.Option(1, "--rollouts", help="With --ray: rollout actors."),
    trainers: int = typer.Option(1, "--trainers", help="With --ray: trainer actors (one torch.distributed group)."),
    cpus_per_rollout: float = typer.Option(1.0, "--cpus-per-rollout", help="With --ray: CPUs each rollout reserves."),
    gpus_per_rollout: float = typer.Option(0.0, "--gpus-per-rollout", help="With --ray: GPUs each rollout reserves."),
    cpus_per_trainer: float = typer.Option(1.0, "--cpus-per-trainer", help="With --ray: CPUs each trainer reserves."),
    gpus_per_trainer: float = typer.Option(0.0, "--gpus-per-trainer", help="With --ray: GPUs each trainer reserves."),
) -> None:
    """Run `dataflow rollout` and `dataflow train` as two child processes on one DB, with one live view.

    Each option goes to the command that has it (see `dataflow rollout -h`, `dataflow train -h`).
    These go to both: --db --config --device --threads --seed --dtype --lease-ttl --verbose --\\[no-]progress
    --allow-network-fs. --epochs means dataset passes to one and feature replays to the other: name it
    --rollout-epochs or --train-epochs. --rollout-X / --train-X sends any X to that command only.

    Ctrl-C stops both cleanly (the run resumes later); exits non-zero if either fails. Logs go to
    DB-stem.logs/. With --ray, the rollouts and trainers are Ray actors on a cluster and the database stays
    on this node.
    """
    from dataflow.config_file import CONFIG_KEY
    from dataflow.run import ROLES, route_options, run_pair

    group = typer.main.get_command(app)
    file_args = ["--config", str(ctx.meta[CONFIG_KEY])] if CONFIG_KEY in ctx.meta else []  # [rollout], [train]
    routed = route_options(["--db", str(db), *file_args, *ctx.args], {role: group.commands[role] for role in ROLES})
    if ray_address is None:
        if (rollouts, trainers) != (1, 1) or cpus_per_rollout != 1 or cpus_per_trainer != 1 or gpus_per_rollout or gpus_per_trainer:
            raise DataflowError("dataflow run: --rollouts, --trainers and --cpus/gpus-per-* need --ray ADDRESS|auto|local")
        run_pair(db, routed, log_dir=db.parent / f"{db.stem}.logs")
        return
    from dataflow.cluster.driver import ClusterConfig, run_on_ray

    params = {role: group.commands[role].make_context(role, list(routed[role])).params for role in ROLES}
    try:
        cluster = ClusterConfig(address=ray_address, rollouts=rollouts, trainers=trainers, engine=params["rollout"]["engine"],
                                cpus_per_rollout=cpus_per_rollout, gpus_per_rollout=gpus_per_rollout,
                                cpus_per_trainer=cpus_per_trainer, gpus_per_trainer=gpus_per_trainer)
    except ValueError as e:
        raise DataflowError(f"dataflow run: {e}") from None
    run_on_ray(db, cluster, rollout_configs(params["rollout"]), train_configs(params["train"]),
               threads=params["train"]["threads"], allow_network_fs=params["train"]["allow_network_fs"])


@app.command()
@help_panels({
    "Run": (*RUN_PANEL, "producer_id", "wait_for_trainer", "progress"),
    "Target": ("target_model", "engine", "aux_layers", "chat_template"),
    "Hardware": HARDWARE_PANEL,
    "Data": ("dataset", "on_bad_row", "num_samples", "held_out", "epochs", "seed", "max_length", "train_only_last_turn",
             "draft_vocab_size"),
    "Regeneration": ("regenerate", "max_new_tokens", "temperature", "vocab_warmup", "self_prompts",
                     "prompt_temperature", "samples_per_prompt", "greedy_first_reply"),
    "Throughput and memory": ("token_budget", "tasks_per_lease", "lease_ttl", "store", "store_dir", "max_inflight_bytes"),
})
@one_line_errors
def rollout(
    db: Path = DbOption,
    config: Path = ConfigOption,
    target_model: str = typer.Option(None, help="HF model dir (safetensors) or .gguf file; default: bundled SmolLM2-135M-Instruct."),
    dataset: Path = typer.Option(None, help="jsonl of conversations (native, ShareGPT or text rows); default: bundled."),
    on_bad_row: Literal["skip", "fail"] = typer.Option("fail", help="What to do with malformed dataset rows."),
    num_samples: int = typer.Option(None, help="Use only the first N dataset rows (held-out rows excluded)."),
    held_out: int = typer.Option(16, help="N conversation rows spread through the dataset: never trained on, eval's prompts."),
    self_prompts: int = typer.Option(0, help="Prompts the target writes itself (Magpie), added to the dataset's."),
    prompt_temperature: float = typer.Option(0.8, help="Sampling temperature of the self-written prompts."),
    samples_per_prompt: int = typer.Option(1, help="Sampled replies per prompt (--regenerate, --temperature > 0)."),
    greedy_first_reply: bool = typer.Option(False, help="With --samples-per-prompt > 1: each prompt's first reply greedy, the others sampled."),
    vocab_warmup: int = typer.Option(256, help="With --regenerate: samples regenerated first to count the vocabulary."),
    epochs: int = typer.Option(1, help="Passes over the dataset (one target forward per sample per epoch)."),
    seed: int = typer.Option(0, help="Seeds each epoch's shuffle and sampled regeneration."),
    max_length: int = typer.Option(2048, help="Tokens per sample; longer ones are truncated with their mask."),
    train_only_last_turn: bool = typer.Option(False, help="Mask only the last assistant reply."),
    chat_template: str = typer.Option(None, help="Jinja chat template (file or string) replacing the tokenizer's."),
    draft_vocab_size: int = typer.Option(None, help="Draft vocabulary size (default min(32000, target vocab))."),
    regenerate: bool = typer.Option(False, help="Let the target write the assistant replies first."),
    max_new_tokens: int = typer.Option(256, help="Reply length limit with --regenerate."),
    temperature: float = typer.Option(0.0, help="0 = greedy regeneration, > 0 samples."),
    aux_layers: str = typer.Option(None, help="Three HF hidden_states indices, e.g. 2,15,27 (default 2,N//2,N-3)."),
    engine: str = typer.Option("hf", help="Target engine: hf (transformers) or vllm (needs the vllm extra)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show the engine's own log (vLLM's is hidden otherwise)."),
    device: str = DeviceOption,
    dtype: Dtype = typer.Option("auto", help="The target's: auto is bf16 on CUDA and on CPUs with native bf16, else fp32."),
    threads: int = typer.Option(None, help="torch CPU threads."),
    token_budget: int = typer.Option(4096, help="Padded tokens per forward batch."),
    tasks_per_lease: int = typer.Option(32, help="Prompt tasks leased at once."),
    lease_ttl: float = typer.Option(60.0, help="Seconds before a dead rollout's tasks go to others."),
    store: Literal["shm", "files"] = typer.Option("shm", help="Feature store: shared memory, or files in --store-dir."),
    store_dir: Path = typer.Option(None, help="Directory of the files store."),
    max_inflight_bytes: int = typer.Option(
        "1GiB", parser=parse_bytes, metavar="BYTES", help="Watermark of features not yet consumed, e.g. 4GiB, 512MiB."
    ),
    wait_for_trainer: bool = typer.Option(
        False, "--wait-for-trainer", help="After the dataset, stay until the trainer finishes and regenerate lost prompts."
    ),
    producer_id: str = typer.Option(None, help="This rollout's id (arena, heartbeat); default: lowest free r<i>."),
    progress: bool = typer.Option(True, help="Show live progress."),
    allow_network_fs: bool = AllowNetworkFs,
) -> None:
    """Run the target model over the dataset and stream EAGLE3 features into the run."""
    from dataflow.rollout.data import load_dataset, split_held_out
    from dataflow.rollout.engines import open_engine
    from dataflow.rollout.producer import run_rollout
    from dataflow.rollout.ui import RolloutView

    # A refused start creates nothing and costs seconds, not a target load: options and dataset are checked
    # first, and the database is created only once the target has loaded (an existing one is opened first,
    # so a wrong --db fails fast too).
    config, engine_config = rollout_configs(locals())
    split_held_out(load_dataset(config.dataset, config.on_bad_row).samples, config.held_out)
    conn = open_run(db, allow_network_fs) if db.exists() else None
    target = open_engine(engine, engine_config, max_model_len=config.max_request_tokens, verbose=verbose)
    conn = conn or open_run(db, allow_network_fs)
    with RolloutView(enabled=progress) as view:
        stats = run_rollout(conn, config, target, view)
    typer.echo(f"rollout: {stats.summary()}")


def rollout_configs(p: dict):
    """`dataflow rollout`'s options (by parameter name) -> (RolloutConfig, HFEngineConfig)."""
    from dataflow.errors import InputError
    from dataflow.rollout.config import RolloutConfig
    from dataflow.rollout.engines.hf import HFEngineConfig
    from dataflow.target import resolve_target

    try:
        aux_layers = p["aux_layers"]
        config = RolloutConfig(**{name: p[name] for name in (
            "dataset", "on_bad_row", "num_samples", "epochs", "seed", "held_out", "self_prompts",
            "prompt_temperature", "samples_per_prompt", "greedy_first_reply", "vocab_warmup", "max_length", "train_only_last_turn",
            "draft_vocab_size", "regenerate", "max_new_tokens", "temperature", "token_budget", "tasks_per_lease",
            "lease_ttl", "store", "store_dir", "max_inflight_bytes", "producer_id", "wait_for_trainer")})
        engine_config = HFEngineConfig(
            model_dir=resolve_target(p["target_model"]), device=p["device"], threads=p["threads"],
            dtype=LONG_DTYPES.get(p["dtype"], p["dtype"]),
            aux_layers=tuple(int(a) for a in aux_layers.split(",")) if aux_layers else None,
            chat_template=p["chat_template"],
        )
    except ValueError as e:
        raise InputError(f"rollout options: {e}") from None
    return config, engine_config


@app.command()
@help_panels({
    "Run": (*RUN_PANEL, "out", "quiet", "progress", "log_every", "report_to", "wait_for_rollout", "exit_when_idle"),
    "Hardware": (*HARDWARE_PANEL, "compile"),
    "Optimiser": ("lr", "warmup", "warmup_steps", "decay", "min_lr_ratio", "weight_decay", "grad_clip", "grad_accum",
                  "batch_tokens", "seed"),
    "Draft": ("ttt_length", "draft_init", "draft_config", "export_embed_tokens"),
    "Length and checkpoints": ("max_steps", "epochs", "save_every", "keep", "lease_ttl", "fill_wait"),
    "Held-out acceptance": ("validation_share", "validate_every", "validation_tokens"),
})
@one_line_errors
def train(
    db: Path = DbOption,
    config: Path = ConfigOption,
    out: Path = typer.Option(
        None, "--out", help="Checkpoints, metrics.jsonl, TensorBoard (default: DB-stem.train/ beside the DB)."
    ),
    lr: float = typer.Option(1e-4, "--lr", help="Peak AdamW learning rate."),
    warmup: float = typer.Option(0.03, "--warmup", help="Warmup as a fraction of the known total (samples or steps)."),
    warmup_steps: int = typer.Option(50, "--warmup-steps", help="Warmup steps when the stream is open-ended."),
    decay: Literal["cosine", "linear", "none"] = typer.Option("cosine", "--decay", help="lr decay over the known total."),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="The decay's floor, as a fraction of --lr."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    grad_clip: float = typer.Option(0.5, "--grad-clip", help="Clip the gradient norm to this (> 0)."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimiser step."),
    batch_tokens: int = typer.Option(4096, "--batch-tokens", help="Token budget of a micro-batch, padding included."),
    ttt_length: int = typer.Option(7, "--ttt-length", help="Unrolled training-time-test steps."),
    dtype: Dtype = typer.Option("auto", "--dtype", help="Compute: auto (bf16 where fast), bf16 (fp32 master weights), fp32."),
    seed: int = typer.Option(0, "--seed", help="Seeds the draft's initial weights."),
    draft_init: Literal["random", "target"] = typer.Option(
        "random", "--draft-init", help="Start the draft random (seeded) or from the target's last layer and head."
    ),
    draft_config: Path = typer.Option(None, "--draft-config", help="JSON of draft shape fields to override."),
    export_embed_tokens: bool = typer.Option(False, "--export-embed-tokens", help="Also export embed_tokens."),
    validation_share: float = typer.Option(
        0.0, "--validation-share", help="Share of prompts never trained on (by hash); the draft's accuracies and "
        "tau-hat on them go to metrics.jsonl as val_* (0: none).",
    ),
    validate_every: int = typer.Option(50, "--validate-every", help="Steps between held-out measurements (--validation-share)."),
    validation_tokens: int = typer.Option(65536, "--validation-tokens", help="Held-out tokens kept in memory to measure on."),
    max_steps: int = typer.Option(0, "--max-steps", help="Pause after this many steps (run again to go on; 0: until the stream drains)."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over a files-store run (later ones replay its features)."),
    save_every: int = typer.Option(500, "--save-every", help="Steps between checkpoints."),
    keep: int = typer.Option(2, "--keep", help="Step checkpoints kept on disk."),
    exit_when_idle: float = typer.Option(0.0, "--exit-when-idle", help="Stop after SECONDS idle with no live rollout."),
    wait_for_rollout: float = typer.Option(
        0.0, "--wait-for-rollout", metavar="SECONDS",
        help="Exit 2 if no rollout has prepared the run after SECONDS (0: wait until Ctrl-C, saying so at once).",
    ),
    lease_ttl: float = typer.Option(60.0, "--lease-ttl", help="Seconds a leased ref stays ours without extension."),
    fill_wait: float = typer.Option(2.0, "--fill-wait", help="Seconds to wait for a full step while streaming."),
    device: str = DeviceOption,
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    log_every: int = typer.Option(
        10, "--log-every", help="Steps per metrics row (and per log line without a terminal or with --no-progress)."
    ),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="torch.compile the TTT step and the loss (eager on failure)."),
    report_to: str = typer.Option(
        "tensorboard", "--report-to", help="Trackers beside metrics.jsonl: tensorboard, wandb (pip install wandb), "
        "comma-separated, or none.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="A live status line on a terminal."),
    verbose: bool = VerboseOption,
    quiet: bool = QuietOption,
    allow_network_fs: bool = AllowNetworkFs,
) -> None:
    """Train the EAGLE3 draft on the run's refs (beside a live rollout or after it); resumable."""
    from dataflow.ui import configure_logging

    configure_logging(verbose, quiet)
    if not db.exists():  # said before torch loads (seconds): a mistyped --db must not look like a hang
        log.info(f"{db}: no such run yet; the trainer creates it, then waits for `dataflow rollout --db {db}`")
    from dataflow.train.trainer import train as run_training

    config, options = train_configs(locals())
    if threads:
        import torch

        torch.set_num_threads(threads)
    run_training(db, config, options, allow_network_fs=allow_network_fs)


def train_configs(p: dict):
    """`dataflow train`'s options (by parameter name) -> (TrainConfig, TrainOptions)."""
    import json

    from dataflow.errors import InputError
    from dataflow.train.config import TrainConfig, TrainOptions

    try:
        draft_config = p["draft_config"]
        config = TrainConfig(
            draft_overrides=json.loads(draft_config.read_text()) if draft_config else {},
            **{name: p[name] for name in ("lr", "warmup", "warmup_steps", "decay", "min_lr_ratio", "weight_decay",
                                          "grad_clip", "grad_accum", "batch_tokens", "ttt_length", "seed",
                                          "draft_init", "export_embed_tokens", "validation_share")},
            dtype=SHORT_DTYPES.get(p["dtype"], p["dtype"]),
        )
        options = TrainOptions(
            out=p["out"] or p["db"].parent / f"{p['db'].stem}.train",
            **{name: p[name] for name in ("max_steps", "epochs", "save_every", "keep", "exit_when_idle",
                                          "wait_for_rollout", "lease_ttl", "fill_wait", "device", "log_every", "compile", "progress",
                                          "report_to", "validate_every", "validation_tokens")},
        )
    except (OSError, ValueError) as e:
        raise InputError(f"dataflow train: {e}") from None
    return config, options


@app.command()
@one_line_errors
def plot(
    run_dir: Path = typer.Argument(..., help="The trainer's --out dir."),
    out: Path = typer.Option(None, "--out", help="PNG path (default: RUN_DIR/metrics.png)."),
) -> None:
    """Write a PNG of the loss and acc_k curves from RUN_DIR/metrics.jsonl."""
    from dataflow.train.plot import plot_metrics

    typer.echo(str(plot_metrics(run_dir, out)))


@app.command("eval")
@one_line_errors
def eval_draft(
    draft: Path = typer.Option(..., "--draft", help="Checkpoint dir to evaluate, e.g. OUT/final."),
    config: Path = ConfigOption,
    target_model: str = typer.Option(None, "--target-model", help="HF dir or .gguf; default SmolLM2-135M-Instruct."),
    data: Path = typer.Option(None, "--data", help="jsonl conversations; default the bundled dataset."),
    num_prompts: int = typer.Option(8, help="Prompts from the held-out rows (spread through the dataset)."),
    held_out: int = typer.Option(16, "--held-out", help="The rollout's --held-out (rows no rollout trains on)."),
    run: Path = typer.Option(None, "--run", help="A run's --db: prompt with the prompts its trainer held out "
                             "(--validation-share), like the ones it trained on, instead of the dataset's held-out rows."),
    num_draft_tokens: int = typer.Option(7, "--num-draft-tokens", "-k", help="Guesses per verification step."),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per prompt."),
    aux_layers: str = typer.Option(None, help="Comma-separated HF hidden_states indices (default 2,N//2,N-3)."),
    threads: int = typer.Option(None, help="torch CPU threads."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline",
                                  help="Also measure an untrained draft (tau_untrained; hf engine): a third of the time."),
    engine: str = typer.Option("hf", help="hf: our chain decoding with the HF target; vllm: vLLM serves target + draft."),
    verbose: bool = typer.Option(False, "--verbose", help="Show vLLM's own log (hidden otherwise)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Speculative decoding on held-out prompts: acceptance length τ, per-position acceptance, speed, exactness."""
    import json

    from rich.console import Console

    from dataflow.eval.report import EvalConfig, evaluate
    from dataflow.rollout.engines import check_engine

    from dataflow.errors import InputError

    check_engine(engine)
    try:
        config = EvalConfig(
            draft=draft, target_model=target_model, data=data, num_prompts=num_prompts, held_out=held_out,
            run=run and require_run(run),
            num_draft_tokens=num_draft_tokens, max_new_tokens=max_new_tokens, threads=threads, baseline=baseline,
            aux_layers=tuple(int(a) for a in aux_layers.split(",")) if aux_layers else None,
        )
    except ValueError as e:
        raise InputError(f"dataflow eval: {e}") from None
    console = Console(stderr=True)
    if engine == "vllm":
        from dataflow.eval.vllm import evaluate_vllm

        result = evaluate_vllm(config, verbose=verbose, on_phase=console.log)
    else:
        result = evaluate(config, on_prompt=lambda i, n: console.log(f"prompt {i + 1}/{n}"))
    if as_json:
        typer.echo(json.dumps(result))
        return
    console = Console()
    untrained = f" (untrained {result['tau_untrained']:.2f})" if "tau_untrained" in result else ""
    steps = result.get("verify_steps", result.get("num_drafts"))
    console.print(f"{engine} draft {result['draft']}: τ = {result['tau']:.2f}{untrained}, "
                  f"K = {result['num_draft_tokens']}, {result['prompts']} prompts ({result['prompts_from']}), {steps} steps")
    console.print("accepted per position: " + " ".join(f"{a:.2f}" for a in result["accept_rate_per_position"]))
    console.print(f"tokens/s: greedy {result['tokens_per_s_greedy']}, speculative {result['tokens_per_s_speculative']}")
    verdict = "[green]identical to greedy decoding[/]" if result["exact_match"] else "[red]DIFFERS from greedy decoding[/]"
    console.print(f"output: {verdict}")
    if not result["exact_match"]:
        raise typer.Exit(1)


@app.command("gc")
@one_line_errors
def gc_command(
    db: Path = DbOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed; remove nothing."),
    all_orphans: bool = typer.Option(
        False, "--all-orphans", help="Also remove other runs' arenas that no producer holds, finished or not."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    allow_network_fs: bool = AllowNetworkFs,
) -> None:
    """Compact this run's trained refs to bare keys, remove its orphaned shared-memory arenas and feature files
    (rollout and train do it at start), and other runs' arenas once those runs are finished for good (or all
    of them with --all-orphans)."""
    import dataclasses
    import json

    from dataflow.transport.gc import sweep

    report = sweep(open_run(require_run(db), allow_network_fs), dry_run=dry_run, all_orphans=all_orphans)
    typer.echo(json.dumps(dataclasses.asdict(report)) if as_json else ("dry run: " if dry_run else "") + report.summary())
