"""The Ray-object feature store with a real ledger actor: round trip, the byte watermark freed by the
ledger, and a dead rollout's samples reported lost (not hung)."""

import sys

import pytest
import torch
from conftest import wait_until

ray = pytest.importorskip("ray")

from dataflow.cluster.ledger import Ledger, Remote  # noqa: E402
from dataflow.control.queue import RefItem  # noqa: E402
from dataflow.errors import FeaturesLost  # noqa: E402
from dataflow.transport import open_reader  # noqa: E402
from dataflow.transport.arena import plan_layout  # noqa: E402
from dataflow.transport.ray_store import RayWriter  # noqa: E402

NAMESPACE = "dataflow-test-store"
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module


class WaitedTooLong(Exception):
    pass


class RolloutSide:
    """The rollout actor's part of the store: a RayWriter on the ledger, serving its objects."""

    def __init__(self, ledger, name: str, capacity: int):
        self.writer = RayWriter(Remote(ledger, "refs"), store="ray-test", actor=name, namespace=NAMESPACE,
                                max_inflight_bytes=capacity)

    def write(self, key: str, tensors: dict, give_up_after_s: float = 30.0) -> dict:
        def on_wait(waited: float) -> None:
            if waited > give_up_after_s:
                raise WaitedTooLong(key)

        return self.writer.write(key, tensors, on_wait=on_wait)[0]

    def object_of(self, key: str, gen: int) -> list:
        return self.writer.object_of(key, gen)


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE)
    yield
    ray.shutdown()


@pytest.fixture
def ledger(cluster, tmp_path):
    actor = ray.remote(Ledger).options(num_cpus=0).remote(str(tmp_path / "run.sqlite"))
    yield actor
    ray.kill(actor)


def sample(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 1000, (40,), generator=g),
        "loss_mask": torch.rand(40, generator=g) > 0.5,
        "aux_hidden": torch.randn(40, 96, generator=g).to(torch.bfloat16),
        "target_hidden": torch.randn(40, 32, generator=g),
    }


def rollout(ledger, name: str, capacity: int):
    return ray.remote(RolloutSide).options(name=name, num_cpus=0).remote(ledger, name, capacity)


def commit(refs, handle: dict) -> None:
    refs.put_many([RefItem(handle["key"], handle, handle["nbytes"], handle["store"])])


def test_a_trainer_reads_back_what_a_rollout_wrote_and_the_watermark_frees_only_what_the_ledger_freed(ledger):
    refs, reader = Remote(ledger, "refs"), open_reader(None)
    one_sample = plan_layout(sample(0))[1]
    producer = rollout(ledger, "rollout-a", capacity=one_sample * 3 // 2)  # room for one sample, not two
    first = ray.get(producer.write.remote("a", sample(0)), timeout=60)
    commit(refs, first)
    views = reader.open(first)
    for name, tensor in sample(0).items():
        assert torch.equal(views[name], tensor), name

    # The first is still PENDING: a second write must wait for it rather than drop it.
    with pytest.raises(WaitedTooLong):
        ray.get(producer.write.remote("b", sample(1), give_up_after_s=1.0), timeout=60)
    assert torch.equal(reader.open(first)["target_hidden"], sample(0)["target_hidden"])

    [lease] = refs.lease("trainer", n=1)
    assert refs.ack([lease.token]) == []  # acked: the writer may free it now
    second = ray.get(producer.write.remote("b", sample(1), give_up_after_s=10.0), timeout=60)
    assert torch.equal(reader.open(second)["aux_hidden"], sample(1)["aux_hidden"])
    with pytest.raises(FeaturesLost, match="no longer holds it"):
        reader.open(first)


def is_dead(actor) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=10)
    except ray.exceptions.RayActorError:
        return True
    return False


def test_the_samples_of_a_rollout_that_died_are_lost_at_once(ledger):
    reader = open_reader(None)
    producer = rollout(ledger, "rollout-b", capacity=1 << 20)
    handle = ray.get(producer.write.remote("c", sample(2)), timeout=60)
    assert torch.equal(reader.open(handle)["input_ids"], sample(2)["input_ids"])
    ray.kill(producer)
    wait_until(lambda: is_dead(producer), "the killed rollout actor is dead")  # ray.kill returns before it is
    with pytest.raises(FeaturesLost, match="rollout-b holding its features is gone"):
        reader.open(handle)
