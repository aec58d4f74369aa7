"""Sample keys, shared by the rollout and the trainer: a task's key, and the key of the ref its features
become, is the sample's id in epoch 0 and `<id>#e<epoch>` in a later epoch (written by the rollout's
--epochs, or replayed by the trainer's). A prompt's k-th extra reply (--samples-per-prompt) is the sample
`<id>@<k>`. Dataset ids may not contain '#' or '@' (rollout/data.py refuses them), so an epoch-0 key never
contains the epoch mark and a dataset row's key never contains the copy mark."""

EPOCH_MARK = "#e"
COPY_MARK = "@"


def epoch_key(sample_id: str, epoch: int) -> str:
    return sample_id if epoch == 0 else f"{sample_id}{EPOCH_MARK}{epoch}"


def copy_id(sample_id: str, copy: int) -> str:
    return sample_id if copy == 0 else f"{sample_id}{COPY_MARK}{copy}"


def prompt_of(key: str) -> str:
    """The prompt a ref's sample answers: its key without epoch and copy suffixes ("@self7@1#e2" -> "@self7";
    self-written prompt ids start with the copy mark, so only a mark after the first character counts)."""
    sample = key.split(EPOCH_MARK, 1)[0]
    head, mark, copy = sample.rpartition(COPY_MARK)
    return head if mark and head and copy.isdigit() else sample
