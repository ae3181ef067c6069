"""A dataset whose every item is a user's mistake (a damaged data file): importable, so a DataLoader worker
process (spawned or forked) can unpickle it."""

from torch.utils.data import Dataset


class DamagedData(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        raise ValueError(f"/data/part-{index}.jsonl: line 3 is not JSON; fix or remove it")


class DyingWorker(Dataset):
    """Its first item ends the process reading it with `signal` (a DataLoader worker's death)."""

    def __init__(self, signal: int) -> None:
        self.signal = signal

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        import os

        os.kill(os.getpid(), self.signal)
