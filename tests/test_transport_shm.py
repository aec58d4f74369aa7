import os
import stat

import pytest
import torch
from conftest import leftover_segments
from test_transport_support import matches, sample

from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefItem, RefQueue
from dataflow.errors import FeaturesLost, InputError, StoreError
from dataflow.transport import open_reader, open_writer, sweep
from dataflow.transport.arena import align_up, plan_layout
from dataflow.transport.segment import HEADER_BYTES, check_shm_space

SAMPLE_BYTES = plan_layout(sample("x"))[1]


def put(queue, handle, nbytes):
    queue.put(RefItem(handle["key"], handle, nbytes, handle["store"]))


def consume_all(queue):
    leases = queue.lease("trainer", n=1000)
    assert not queue.ack([lease.token for lease in leases])
    return leases


def test_a_sample_comes_back_bit_exact_in_every_dtype_as_zero_copy_views(conn):
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 20)
    reader = open_reader(conn)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        handle, _ = writer.write(f"s-{dtype}", sample(f"s-{dtype}", dtype=dtype))
        views = reader.open(handle)
        assert matches(f"s-{dtype}", views, dtype=dtype)
        again = reader.open(handle)
        assert views["aux_hidden"].data_ptr() == again["aux_hidden"].data_ptr()  # same mapped bytes, no copy
    handle, _ = writer.write("empty", {"input_ids": torch.zeros(0, dtype=torch.int64)})
    assert reader.open(handle)["input_ids"].shape == (0,)
    reader.close()
    writer.close()


def test_the_arena_is_named_after_the_run_and_readable_only_by_its_owner(conn):
    writer = open_writer(conn, store="shm", producer_id="rollout-3", max_inflight_bytes=1 << 16)
    assert writer.path.name == f"dataflow-{RunMeta(conn).run_id[:12]}-rollout-3"
    assert stat.S_IMODE(os.stat(writer.path).st_mode) == 0o600
    writer.close()


def test_a_handle_whose_bytes_were_reused_is_refused(conn):
    queue = RefQueue(conn)
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=4 * SAMPLE_BYTES)
    reader = open_reader(conn)
    first, nbytes = writer.write("s0", sample("s0"))
    put(queue, first, nbytes)
    views = reader.open(first)
    consume_all(queue)
    for i in range(1, 6):  # wraps around over s0's range
        handle, nbytes = writer.write(f"s{i}", sample(f"s{i}"))
        put(queue, handle, nbytes)
        consume_all(queue)
    with pytest.raises(FeaturesLost, match="reused"):
        reader.open(first)
    with pytest.raises(FeaturesLost, match="reused"):
        reader.check(first)  # a consumer re-checking after reading its views learns the same
    del views
    reader.close()
    writer.close()


def test_writes_whose_ref_is_not_committed_yet_are_never_overwritten(conn):
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=2 * SAMPLE_BYTES)
    reader = open_reader(conn)
    a, _ = writer.write("a", sample("a"))
    writer.write("b", sample("b"))

    def give_up(waited):
        raise TimeoutError("full")

    with pytest.raises(TimeoutError):
        writer.write("c", sample("c"), on_wait=give_up)
    assert matches("a", reader.open(a))
    writer.abandon(a)  # the producer will not commit it after all: its range is free again
    writer.write("c", sample("c"), on_wait=give_up)
    reader.close()
    writer.close()


def test_a_full_arena_makes_the_producer_wait_until_the_trainer_acks(conn):
    queue = RefQueue(conn)
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=2 * SAMPLE_BYTES)
    for key in ("a", "b"):
        put(queue, *writer.write(key, sample(key)))
    waits = []

    def trainer_acks_while_we_wait(waited):
        waits.append(waited)
        consume_all(queue)

    handle, _ = writer.write("c", sample("c"), on_wait=trainer_acks_while_we_wait)
    assert len(waits) == 1 and handle["key"] == "c"
    put(queue, handle, handle["nbytes"])
    consume_all(queue)
    writer.close()


def test_a_sample_larger_than_the_arena_is_a_clear_error_not_a_hang(conn):
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=SAMPLE_BYTES // 2)
    with pytest.raises(StoreError, match="--max-inflight-bytes"):
        writer.write("big", sample("big"))
    writer.close()
    with pytest.raises(StoreError, match="largest sample"):
        open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 12, max_sample_bytes=1 << 20)


def test_a_dev_shm_too_small_for_the_arena_says_what_to_do():
    with pytest.raises(StoreError, match="--shm-size=.*--ipc=host.*--max-inflight-bytes"):
        check_shm_space(1 << 60)


def test_a_restarted_producer_reattaches_its_arena_and_keeps_pending_samples_readable(conn):
    queue = RefQueue(conn)
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=4 * SAMPLE_BYTES)
    handles = [writer.write(k, sample(k))[0] for k in ("a", "b", "c")]
    for h in handles[:2]:
        put(queue, h, h["nbytes"])  # "c" was written but never committed: its range is free after restart
    writer.close()
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=4 * SAMPLE_BYTES)
    assert writer.used_bytes == 2 * handles[0]["nbytes"]
    fresh = [writer.write(k, sample(k))[0] for k in ("d", "e")]
    assert min(h["gen"] for h in fresh) > max(h["gen"] for h in handles)  # generations survive restarts
    reader = open_reader(conn)
    assert matches("a", reader.open(handles[0])) and matches("b", reader.open(handles[1]))
    with pytest.raises(FeaturesLost):
        reader.open(handles[2])  # its bytes went to "d" or "e"
    consume_all(queue)
    reader.close()
    writer.close()


def test_a_second_producer_with_the_same_id_is_refused(conn):
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    with pytest.raises(StoreError, match="--producer-id"):
        open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    writer.close()


def test_closing_the_reader_under_live_views_keeps_them_valid(conn):
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    handle, _ = writer.write("a", sample("a"))
    reader = open_reader(conn)
    views = reader.open(handle)
    reader.close()
    writer.abandon(handle)
    writer.close()  # nothing live: the segment is unlinked, the mapping lives on under the views
    assert not leftover_segments(RunMeta(conn).run_id)
    assert matches("a", views)


def test_a_clean_finish_leaves_nothing_in_dev_shm_and_an_unfinished_one_keeps_pending_samples(conn):
    queue = RefQueue(conn)
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    put(queue, *writer.write("a", sample("a")))
    writer.close()
    assert leftover_segments(RunMeta(conn).run_id)  # the trainer still needs "a"
    reader = open_reader(conn)
    lease = queue.lease("t")[0]
    assert matches("a", reader.open(lease.handle))
    reader.close()
    assert not queue.ack([lease.token])
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    writer.close()
    assert not leftover_segments(RunMeta(conn).run_id)


def test_a_handle_into_an_arena_that_was_re_created_is_refused(conn):
    queue = RefQueue(conn)
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    old, nbytes = writer.write("a", sample("a"))
    put(queue, old, nbytes)
    reader = open_reader(conn)
    assert matches("a", reader.open(old))  # the reader now has the old arena mapped
    writer.close()
    writer.path.unlink()  # e.g. the host rebooted, or someone removed it by hand
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    fresh, _ = writer.write("b", sample("b"))
    assert (fresh["offset"], fresh["gen"]) == (old["offset"], old["gen"])  # same place, same generation...
    assert matches("b", reader.open(fresh))  # ...the reader re-maps the new arena...
    with pytest.raises(FeaturesLost, match="re-created"):
        reader.open(old)  # ...and refuses the old handle by the arena's nonce
    consume_all(queue)
    reader.close()
    writer.close()


def test_a_stopping_producer_keeps_its_arena_while_live_refs_point_into_it_even_in_a_finished_run(conn):
    queue = RefQueue(conn)
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    put(queue, *writer.write("a", sample("a")))
    RunMeta(conn).set_run_finished()  # whatever marks the run: a PENDING ref's bytes stay
    writer.close()
    [lease] = queue.lease("t")
    assert matches("a", open_reader(conn).open(lease.handle))
    queue.ack([lease.token])
    assert len(sweep(conn).removed_segments) == 1 and not leftover_segments(RunMeta(conn).run_id)


def test_an_arena_larger_than_dev_shm_is_refused_at_start_and_leaves_nothing_behind(conn):
    with pytest.raises(StoreError, match="--shm-size"):
        open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 50)
    assert not leftover_segments(RunMeta(conn).run_id)


def test_names_that_could_point_outside_dev_shm_are_refused(conn):
    with pytest.raises(InputError, match="producer id"):
        open_writer(conn, store="shm", producer_id="../etc", max_inflight_bytes=1 << 16)
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    handle, _ = writer.write("a", sample("a"))
    with pytest.raises(FeaturesLost, match="not an arena name"):
        open_reader(conn).open({**handle, "store": "../../tmp/x"})
    writer.close()


def test_a_large_arena_takes_only_the_memory_its_samples_use(conn):
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 30)
    handle, nbytes = writer.write("a", sample("a"))
    RefQueue(conn).put(RefItem("a", handle, nbytes, handle["store"]))
    reader = open_reader(conn)
    assert matches("a", reader.open(handle))
    st = writer.path.stat()
    assert st.st_size == HEADER_BYTES + (1 << 30) and st.st_blocks * 512 <= HEADER_BYTES + align_up(nbytes, 4096)
    reader.close()
    RefQueue(conn).ack([lease.token for lease in RefQueue(conn).lease("t")])
    writer.close()


def test_an_arena_keeps_its_database_path_where_earlier_versions_gc_reads_it(conn, run_db):
    """Earlier dataflow versions sharing /dev/shm remove an arena whose recorded database path does not
    exist: the path stays at their offset (the owner record lives further on)."""
    import struct

    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    raw = writer.path.read_bytes()[:HEADER_BYTES]
    (n,) = struct.unpack_from("<H", raw, 64)
    assert raw[66 : 66 + n].decode() == str(run_db)
    writer.close()
