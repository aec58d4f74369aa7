"""Rich renderings shared by the CLI commands (status, the combined run view), and their log lines."""

from __future__ import annotations

import logging
import sys

from rich.console import Group
from rich.table import Table

from dataflow.transport.segment import human  # the one byte formatter


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is emitted (test runners and CliRunner swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Plain, timestamped lines on stderr from every `dataflow.*` logger: INFO by default, DEBUG with
    --verbose, warnings only with --quiet. Lines that work without a terminal (nohup, SLURM, log files)."""
    logger = logging.getLogger("dataflow")
    if not logger.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def collect(conn) -> dict:
    """The control plane's snapshot plus the data plane's per-store use (arena size, disk bytes)."""
    from dataflow.control.status import snapshot
    from dataflow.transport.gc import usage

    from dataflow.control.meta import RunMeta
    from dataflow.records import read_target

    snap = snapshot(conn)
    meta = RunMeta(conn)
    target = read_target(meta)
    return {**snap, "stores": usage(conn), "vocab_coverage": vocab_coverage(snap["processes"]),
            "target": target and target.to_meta(), "config": meta.with_prefix("config.")}


def vocab_coverage(processes: list[dict]) -> float | None:
    """Share of the trained tokens the rollouts published that lie inside the draft vocabulary."""
    infos = [p["info"] for p in processes if p["role"] == "rollout" and p["info"].get("trained_tokens")]
    trained = sum(i["trained_tokens"] for i in infos)
    return round(sum(i["trained_in_vocab"] for i in infos) / trained, 5) if trained else None


def store_line(store: dict) -> str:
    if store["kind"] == "shm":
        return f"{human(store['live_bytes'])} of {human(store['capacity'])} in flight"
    return f"{store['files']} files, {human(store['disk_bytes'])} on disk in {store['dir']}"


def draft_line(info: dict) -> str:
    """A trainer heartbeat's training figures; tau-hat is the expected tokens per verification step (on the
    trained samples, and on held-out prompts where --validation-share holds some out)."""
    held_out = (f", held-out tau-hat {info['val_tau_hat']:.2f} ({info['val_samples']:.0f} samples)"
                if "val_tau_hat" in info else "")
    return (f"step {info.get('step', 0)}, loss {info.get('loss', 0.0):.3f}, acc_0 {info.get('acc_0', 0.0):.3f}, "
            f"tau-hat {info['tau_hat']:.2f}{held_out}")


def status_view(snap: dict) -> Group:
    """Counts by state, rates, lag and per-process liveness of one `control.status.snapshot`."""
    run = Table(title=f"run {snap['run_id'][:12]}", show_header=False, box=None)
    refs, tasks = snap["refs"], snap["tasks"]
    run.add_row("prompts", ", ".join(f"{k} {v}" for k, v in tasks.items()))
    run.add_row("refs", ", ".join(f"{k} {v}" for k, v in refs.items()))
    run.add_row("in flight", human(snap["in_flight_bytes"]))
    for store in snap.get("stores", []):
        run.add_row(f"store {store['store']}", store_line(store))
    run.add_row("rates", f"produced {snap['produced_per_s']:.2f}/s, consumed {snap['acked_per_s']:.2f}/s")
    oldest = snap["oldest_pending_age_s"]
    run.add_row("lag", "none pending" if oldest is None else f"oldest pending {oldest:.1f}s")
    run.add_row("eta", "-" if snap["eta_s"] is None else f"{snap['eta_s']:.0f}s")
    run.add_row("dead-letter", str(snap["dead"]) + ("  (see `dataflow dead`)" if snap["dead"] else ""))
    marks = [m for m in ("end_of_stream", "run_finished") if snap[m]]
    run.add_row("marks", ", ".join(marks) or "-")
    if snap.get("vocab_coverage") is not None:
        run.add_row("draft vocab", f"covers {snap['vocab_coverage']:.1%} of the trained tokens produced")
    for p in snap["processes"]:
        if p["role"] == "train" and "tau_hat" in p["info"]:
            run.add_row(f"draft ({p['id']})", draft_line(p["info"]))
    ckpt = snap["last_checkpoint"]
    run.add_row("checkpoint", "-" if ckpt is None else f"step {ckpt['step']} ({ckpt['age_s']:.0f}s ago) {ckpt['path']}")
    procs = Table(title="processes")
    for col in ("id", "role", "pid", "host", "alive", "last seen", "status"):
        procs.add_column(col)
    for p in snap["processes"]:
        alive = "[green]yes[/]" if p["alive"] else "[red]no[/]"
        host = p["host"] + (f" ({p['info']['node']})" if "node" in p["info"] else "")  # Ray mode: the node
        procs.add_row(p["id"], p["role"], str(p["pid"]), host, alive, f"{p['last_seen_s']:.0f}s", p["status"])
    return Group(run, procs)


def recorded_view(snap: dict) -> Table:
    """What the run was started with: the target and each command's recorded config (a joining process must
    match it)."""
    table = Table(title="recorded at the run's start", show_header=False, box=None)
    target = snap.get("target")
    if target:
        table.add_row("target", f"{target['model']} ({target['dtype']}, {target['num_hidden_layers']} layers, "
                                f"aux layers {target['aux_layers']})")
    for section, values in sorted(snap.get("config", {}).items()):
        table.add_row(section, ", ".join(f"{key}={value}" for key, value in values.items()))
    return table
