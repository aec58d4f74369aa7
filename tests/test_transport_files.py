import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_transport_support import matches, sample

from safetensors.torch import save_file

from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefItem, RefQueue
from dataflow.errors import FeaturesLost, InputError, StoreError
from dataflow.transport import open_reader, open_writer, sweep, usage
from dataflow.transport.files_dir import LOCK_FILE, store_id


def files_writer(conn, tmp_path, **kw):
    kw = {"max_inflight_bytes": 1 << 20, **kw}
    return open_writer(conn, store="files", producer_id="p0", store_dir=tmp_path / "features", **kw)


def put(queue, handle, nbytes):
    queue.put(RefItem(handle["key"], handle, nbytes, handle["store"]))


def test_a_sample_file_comes_back_bit_exact_and_survives_the_ack_for_later_epochs(conn, tmp_path):
    queue, writer, reader = RefQueue(conn), files_writer(conn, tmp_path), open_reader(conn)
    for dtype in (torch.float32, torch.bfloat16):
        handle, nbytes = writer.write(f"s-{dtype}", sample(f"s-{dtype}", dtype=dtype))
        put(queue, handle, nbytes)
        lease = queue.lease("t")[0]
        views = reader.open(lease.handle)
        assert matches(f"s-{dtype}", views, dtype=dtype)
        views["aux_hidden"].zero_()  # views are private copy-on-write pages: the file is untouched
        assert not queue.ack([lease.token])
        assert reader.retained(lease.handle)
        assert matches(f"s-{dtype}", reader.open(lease.handle), dtype=dtype)
    writer.close()


def test_in_flight_bytes_are_bounded_by_the_watermark(conn, tmp_path):
    queue = RefQueue(conn)
    nbytes = files_writer(conn, tmp_path / "probe").write("probe", sample("probe"))[1]
    writer = files_writer(conn, tmp_path, max_inflight_bytes=2 * nbytes + 16)
    for key in ("a", "b"):
        put(queue, *writer.write(key, sample(key)))

    def trainer_acks(waited):
        leases = queue.lease("t", n=10)
        queue.ack([lease.token for lease in leases])

    handle, _ = writer.write("c", sample("c"), on_wait=trainer_acks)
    assert queue.live_bytes(handle["store"]) == 0
    writer.close()


def test_a_disk_cap_is_a_clear_error_naming_the_option(conn, tmp_path):
    writer = files_writer(conn, tmp_path, max_disk_bytes=5000)
    writer.write("a", sample("a"))
    with pytest.raises(StoreError, match="--max-disk-bytes"):
        writer.write("b", sample("b"))
    writer.close()


def test_a_missing_or_foreign_file_is_reported_as_lost_features(conn, tmp_path):
    writer, reader = files_writer(conn, tmp_path), open_reader(conn)
    a, _ = writer.write("a", sample("a"))
    b, _ = writer.write("b", sample("b"))
    with pytest.raises(FeaturesLost, match="holds sample 'b'"):
        reader.open({**a, "name": b["name"]})
    writer.abandon(a)
    with pytest.raises(FeaturesLost, match="gone"):
        reader.open(a)
    assert not reader.retained(a)
    writer.close()


def test_files_store_needs_a_directory(conn):
    with pytest.raises(InputError, match="--store-dir"):
        open_writer(conn, store="files", producer_id="p0", max_inflight_bytes=1 << 20)


def test_gc_removes_uncommitted_and_lost_files_but_keeps_those_later_epochs_need(conn, tmp_path):
    queue = RefQueue(conn)
    writer = files_writer(conn, tmp_path)
    kept, _ = writer.write("kept", sample("kept"))
    put(queue, kept, kept["nbytes"])
    lost, _ = writer.write("lost", sample("lost"))
    put(queue, lost, lost["nbytes"])
    orphan, _ = writer.write("orphan", sample("orphan"))  # never committed
    for lease in queue.lease("t", n=2):
        if lease.key == "lost":
            queue.mark_lost(lease.token, "test")
        else:
            queue.ack([lease.token])
    report = sweep(conn)
    assert report.removed_files == 1  # the lost one; the orphan may still be committed by its live writer
    writer.close()
    assert sweep(conn).removed_files == 1  # the writer is gone: its uncommitted file is an orphan
    [store] = usage(conn)
    assert store["kind"] == "files" and store["files"] == 1 and store["disk_bytes"] == kept["nbytes"]
    assert open_reader(conn).retained(kept)


def test_gc_touches_no_directory_a_crafted_store_record_names(conn, tmp_path):
    run12 = RunMeta(conn).run_id[:12]
    victims = [tmp_path / "victim", tmp_path / "elsewhere" / f"files-{run12}-p9"]  # misnamed; named but not ours
    for directory in victims:
        directory.mkdir(parents=True)
        (directory / f"{'0' * 16}.safetensors").write_bytes(b"precious")
    RunMeta(conn).set(f"files_store.files-{run12}-evil", str(victims[0]))
    RunMeta(conn).set(f"files_store.files-{run12}-p9", str(victims[1]))
    report = sweep(conn)
    assert report.removed_files == 0 and all((d / f"{'0' * 16}.safetensors").exists() for d in victims)
    assert any("not a store of this run" in note for note in report.notes)
    assert any(f"skipped files store {victims[1]}" in note for note in report.notes)


def test_a_crafted_handle_reads_nothing_outside_its_store(conn, tmp_path):
    writer, reader = files_writer(conn, tmp_path), open_reader(conn)
    a, _ = writer.write("a", sample("a"))
    for name in ("../../etc/passwd", "/etc/passwd", f"../{a['name']}", ".owner"):
        with pytest.raises(FeaturesLost, match="not a sample file"):
            reader.open({**a, "name": name})
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    save_file({"input_ids": torch.zeros(3, dtype=torch.int64)}, decoy / a["name"], metadata={"key": "a"})
    legacy = {k: v for k, v in a.items() if k != "name"} | {"path": str(decoy / a["name"])}  # an old full path
    assert matches("a", reader.open(legacy))  # only its file name counts: the store's own file is read
    with pytest.raises(FeaturesLost, match="not one of this run's"):
        reader.open({**a, "store": "files-000000000000-p0"})
    writer.close()


HOLD_THE_WRITER_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))  # how long it holds the lock (gc deciding: a moment; a live producer: long)
"""


def hold_writer_lock(directory: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the files store's writer lock, for `seconds`."""
    directory.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_WRITER_LOCK, str(directory / LOCK_FILE), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_files_writer_waits_out_a_momentary_holder_of_its_lock_and_refuses_a_lasting_one(conn, tmp_path):
    directory = tmp_path / "features" / store_id(RunMeta(conn).run_id, "p0")
    holder = hold_writer_lock(directory, 0.5)  # well under LOCK_WAIT_S
    files_writer(conn, tmp_path).close()
    assert holder.wait(timeout=30) == 0
    holder = hold_writer_lock(directory, 60.0)
    try:
        with pytest.raises(StoreError, match="another producer is writing this files store"):
            files_writer(conn, tmp_path)
    finally:
        holder.kill()
        holder.wait()
    files_writer(conn, tmp_path).close()  # the kernel dropped the dead holder's lock
