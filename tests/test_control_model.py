"""The ref queue against a plain in-memory model, driven by hypothesis through random operation sequences.

Time is modelled without a clock: a lease is taken (or extended) with a ttl of +1000 s (never expires in
a test) or -1 s (already past its deadline, so the next lease() of another owner or reclaim() takes it back;
its own owner's next lease() renews it instead).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, multiple, precondition, rule

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefItem, RefQueue, RefState, shard_of

KEYS = [f"k{i}" for i in range(8)]
MAX_ATTEMPTS = 2
LIVE, EXPIRED = 1000.0, -1.0


@dataclass
class ModelRef:
    id: int
    key: str
    handle: dict
    state: RefState = RefState.PENDING
    attempts: int = 0
    token: str | None = None
    owner: str | None = None
    expired: bool = False


class RefQueueModel(RuleBasedStateMachine):
    tokens = Bundle("tokens")

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="dataflow-model-"))
        self.conn = connect(self.dir / "run.sqlite")
        self.queue = RefQueue(self.conn, max_attempts=MAX_ATTEMPTS)
        self.refs: dict[str, ModelRef] = {}
        self.puts = 0

    def teardown(self):
        self.conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def held(self, token: str) -> ModelRef | None:
        return next((r for r in self.refs.values() if r.state == RefState.LEASED and r.token == token), None)

    def settle(self, tokens: list[str], change) -> list[str]:
        """`change` each ref a token still holds; the tokens that hold none, sorted: what the queue refuses."""
        stale = set()
        for token in dict.fromkeys(tokens):
            ref = self.held(token)
            if ref is None:
                stale.add(token)
            else:
                change(ref)
        return sorted(stale)

    def model_reclaim(self, except_owner: str | None = None) -> int:
        expired = [r for r in self.refs.values() if r.state == RefState.LEASED and r.expired and r.owner != except_owner]
        for r in expired:
            r.state, r.token = RefState.PENDING, None  # a lapsed lease is no failure: attempts unchanged
        return len(expired)

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4))
    def put(self, keys):
        self.puts += 1
        expected = []
        for i, key in enumerate(keys):
            ref = self.refs.get(key)
            # new, or LOST revived by the new handle (same row id, fresh attempts); a repeat in one batch is not
            is_new = key not in keys[:i] and (ref is None or ref.state == RefState.LOST)
            if is_new:
                self.refs[key] = ModelRef(
                    id=ref.id if ref else len(self.refs) + 1, key=key, handle={"key": key, "put": self.puts}
                )
            expected.append(is_new)
        items = [RefItem(key=k, handle={"key": k, "put": self.puts}, nbytes=1, store="s") for k in keys]
        assert self.queue.put_many(items) == expected

    @rule(
        target=tokens,
        n=st.integers(1, 4),
        ttl=st.sampled_from([LIVE, EXPIRED]),
        rank=st.integers(0, 2),
        world=st.integers(1, 3),
        owner=st.sampled_from(["a", "b"]),
    )
    def lease(self, n, ttl, rank, world, owner):
        rank = rank % world
        for r in self.refs.values():
            if r.state == RefState.LEASED and r.owner == owner:
                r.expired = ttl < 0  # renewed with this call's ttl
        self.model_reclaim(except_owner=owner)
        pending = sorted((r for r in self.refs.values() if r.state == RefState.PENDING), key=lambda r: r.id)
        own = [r for r in pending if shard_of(r.key) % world == rank] if world > 1 else []
        chosen = own[:n] + [r for r in pending if r not in own[:n]][: n - len(own[:n])]
        leases = self.queue.lease(owner, n=n, ttl=ttl, partition=(rank, world))
        assert [lease.key for lease in leases] == [r.key for r in chosen]
        for lease, ref in zip(leases, chosen):
            ref.state, ref.token, ref.owner, ref.expired = RefState.LEASED, lease.token, owner, ttl < 0
            assert (lease.attempts, lease.handle) == (ref.attempts, ref.handle)
        return multiple(*[lease.token for lease in leases])

    @rule(tokens=st.lists(tokens, max_size=3), bogus=st.booleans())
    def ack(self, tokens, bogus):
        tokens = tokens + ["never-issued"] * bogus

        def acked(ref):
            ref.state, ref.token = RefState.ACKED, None

        expected = self.settle(tokens, acked)
        assert self.queue.ack(tokens) == expected

    @rule(token=tokens, retryable=st.booleans())
    def fail(self, token, retryable):
        ref = self.held(token)
        assert self.queue.fail(token, "error", retryable) == (ref is not None)
        if ref is not None:
            ref.attempts += 1
            ref.state = RefState.PENDING if retryable and ref.attempts < MAX_ATTEMPTS else RefState.DEAD
            ref.token = None

    @rule(tokens=st.lists(tokens, min_size=1, max_size=3), ttl=st.sampled_from([LIVE, EXPIRED]))
    def extend(self, tokens, ttl):
        def extended(ref):
            ref.expired = ttl < 0

        expected = self.settle(tokens, extended)
        assert self.queue.extend(tokens, ttl) == expected

    @rule(tokens=st.lists(tokens, min_size=1, max_size=3))
    def release(self, tokens):
        def released(ref):
            ref.state, ref.token = RefState.PENDING, None

        expected = self.settle(tokens, released)
        assert self.queue.release(tokens, "stopping") == expected

    @rule(token=tokens)
    def mark_lost(self, token):
        ref = self.held(token)
        assert self.queue.mark_lost(token, "features gone") == (ref is not None)
        if ref is not None:
            ref.state, ref.token = RefState.LOST, None

    @rule()
    def reclaim(self):
        assert self.queue.reclaim() == self.model_reclaim()

    @rule(retained=st.sets(st.sampled_from(KEYS)))
    def put_back_acked(self, retained):
        acked = [r for r in self.refs.values() if r.state == RefState.ACKED]
        for r in acked:
            r.state = RefState.PENDING if r.key in retained else RefState.LOST
            if r.key in retained:
                r.attempts = 0  # it trained fine; only the checkpoint holding it was lost
        expected = (sum(r.key in retained for r in acked), sum(r.key not in retained for r in acked))
        listed = self.queue.acked()
        assert [a.handle["key"] for a in listed] == [r.key for r in sorted(acked, key=lambda r: r.id)]
        kept = [a.id for a in listed if a.handle["key"] in retained]
        assert self.queue.put_back(kept, [a.id for a in listed if a.id not in kept]) == expected

    @rule(keys=st.sets(st.sampled_from(KEYS)))
    def checkpoint(self, keys):
        ids = [r.id for r in self.refs.values() if r.key in keys]
        for r in self.refs.values():
            if r.key in keys and r.state == RefState.ACKED:
                r.state = RefState.TRAINED
        RunMeta(self.conn).record_checkpoint(step=self.puts, path="ckpt", ref_ids=ids)

    @precondition(lambda self: any(r.state == RefState.DEAD for r in self.refs.values()))
    @rule()
    def requeue_dead(self):
        dead = [r for r in self.refs.values() if r.state == RefState.DEAD]
        for r in dead:
            r.state, r.attempts = RefState.PENDING, 0
        assert self.queue.requeue_dead() == len(dead)

    @invariant()
    def counts_match(self):
        expected = {s.name.lower(): 0 for s in RefState}
        for r in self.refs.values():
            expected[r.state.name.lower()] += 1
        assert self.queue.counts() == expected
        assert self.queue.depth() == expected["pending"] and self.queue.in_flight() == expected["leased"]
        tokens = self.conn.execute("SELECT count(*) FROM refs WHERE lease_token IS NOT NULL").fetchone()[0]
        assert tokens == expected["leased"]  # only live leases hold a token


TestRefQueueAgainstModel = RefQueueModel.TestCase
TestRefQueueAgainstModel.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
