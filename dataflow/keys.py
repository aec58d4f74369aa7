"""Sample keys, shared by the rollout and the trainer: a task's key, and the key of the ref its features
become, is the sample's id in epoch 0 and `<id>#e<epoch>` in a later epoch (written by the rollout's
--epochs, or replayed by the trainer's). Dataset ids may not contain '#' (rollout/data.py refuses them),
so an epoch-0 key never contains the mark."""

EPOCH_MARK = "#e"


def epoch_key(sample_id: str, epoch: int) -> str:
    return sample_id if epoch == 0 else f"{sample_id}{EPOCH_MARK}{epoch}"
