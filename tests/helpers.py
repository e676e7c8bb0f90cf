"""Tiny models, data and a reader of W&B offline run files, shared by the tests."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset

NUM_CLASSES = 3
NUM_FEATURES = 8


class BlobDataset(Dataset):
    """Gaussian blobs, one per class, as dict samples with an id and a path."""

    def __init__(self, num_samples: int, seed: int = 0, flip: int = 0, string_ids: bool = False):
        generator = torch.Generator().manual_seed(seed)
        self.targets = torch.arange(num_samples) % NUM_CLASSES
        centres = torch.eye(NUM_CLASSES, NUM_FEATURES) * 4
        self.x = centres[self.targets] + torch.randn(num_samples, NUM_FEATURES, generator=generator)
        self.labels = self.targets.clone()
        # Flip the first `flip` labels to the next class: known label errors.
        self.labels[:flip] = (self.labels[:flip] + 1) % NUM_CLASSES
        self.string_ids = string_ids

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        sample_id = f"clip-{index:04d}" if self.string_ids else 1000 + index
        return {
            "x": self.x[index],
            "target": self.labels[index],
            "sample_id": sample_id,
            "path": f"audio/{index}.wav",
        }


class ClassifierSteps:
    """backbone -> head; validation_step returns logits/embeddings, or nothing.

    A mixin, so the same model exists for both Lightning packages.
    """

    def __init__(self, return_outputs: bool = True, lr: float = 0.05):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(NUM_FEATURES, 16), nn.ReLU())
        self.head = nn.Linear(16, NUM_CLASSES)
        self.return_outputs = return_outputs
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch["x"]), batch["target"])

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict | None:
        embeddings = self.backbone(batch["x"])
        logits = self.head(embeddings)
        loss = nn.functional.cross_entropy(logits, batch["target"])
        self.log("val_loss", loss, batch_size=len(logits))
        if not self.return_outputs:
            return None
        return {"logits": logits, "embeddings": embeddings}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TinyClassifier(ClassifierSteps, LightningModule):
    """The tiny classifier as a lightning.pytorch module."""


def loaders(num_train: int = 96, num_val: int = 48, **kwargs) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(BlobDataset(num_train, seed=1), batch_size=16, shuffle=True)
    val = DataLoader(BlobDataset(num_val, seed=2, **kwargs), batch_size=16)
    return train, val


def trainer_kwargs(tmp_path: Path, **overrides) -> dict:
    kwargs = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    kwargs.update(overrides)
    return kwargs


# --- W&B offline run files ------------------------------------------------------------
# A .wandb file is a 7-byte header, then 32 KiB blocks of records, each
# crc32 (4 bytes) | length (2, little endian) | type (1 full, 2 first, 3 middle, 4 last) | payload.
_HEADER = 7
_BLOCK = 32 * 1024
_RECORD_HEADER = 7


def finish_wandb() -> None:
    """Finish the current W&B run and wait until the service has written its record log.

    ``wandb.finish()`` returns before the ``.wandb`` file is on disk (wandb 0.31): the
    wandb-core service keeps the run's records in memory and writes them when it closes
    the run's stream, on a message that ``finish()`` sends without waiting for an answer.
    A test that reads the file right after ``finish()`` races the service, and on a busy
    machine it reads a truncated log (often the 7-byte header alone). ``wandb.teardown()``
    waits until the service has closed every stream and exited; the next ``wandb.init``
    starts a fresh service.
    """
    import wandb

    wandb.finish()
    wandb.teardown()


def wandb_records(path: Path) -> Iterator[object]:
    """Every protobuf Record in a run's .wandb file, in order; the log must be complete.

    A complete log ends with the run's exit record. Anything else means the W&B service
    has not written it yet: read it after ``finish_wandb()``, not after ``wandb.finish()``.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    pos, pending, last = _HEADER, b"", None
    while pos + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK  # blocks count from the start of the file
        if left_in_block < _RECORD_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + _RECORD_HEADER])
        if length == 0 and kind == 0:
            pos += left_in_block
            continue
        payload = data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == checksum, f"bad crc at {pos}"
        pos += _RECORD_HEADER + length
        pending += payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            last = record.WhichOneof("record_type")
            yield record
    assert last == "exit", (
        f"{path} is incomplete ({len(data)} bytes, last record {last!r}): the W&B service has"
        " not written the whole run yet; read it after tests.helpers.finish_wandb()"
    )


def run_table_files(run_dir: Path, table: str) -> list[dict[str, Path]]:
    """For each `run_table` artifact W&B logged for the table file ``table`` (e.g.
    ``labelwatch/samples.table.json``), in order: artifact path -> staged local file. That
    artifact holds the table with its media cells and media, as the dashboard reads it."""
    (log_file,) = run_dir.glob("*.wandb")
    found = []
    for record in wandb_records(log_file):
        if record.WhichOneof("record_type") != "artifact" or record.artifact.type != "run_table":
            continue
        files = {e.path: Path(e.local_path) for e in record.artifact.manifest.contents}
        if table in files:
            found.append(files)
    return found


def offline_run_dirs(save_dir: Path, run_id: str | None = None) -> list[Path]:
    """The offline run folders under ``save_dir/wandb`` (of one run id), oldest first.

    One folder per ``wandb.init``: a resumed run gets a new folder, and a second one
    started in the same second gets a ``-1`` suffix (wandb 0.31).
    """
    folders = [
        p.parent
        for p in (save_dir / "wandb").glob("offline-run-*/run-*.wandb")
        if run_id is None or p.stem == f"run-{run_id}"
    ]
    return sorted(folders, key=_start_and_suffix)


def _start_and_suffix(run_dir: Path) -> tuple[str, int]:
    """offline-run-<YYYYmmdd_HHMMSS>-<id>[-<n>] -> (start time, n or 0)."""
    (log_file,) = run_dir.glob("run-*.wandb")
    run_id = log_file.stem.removeprefix("run-")
    _, _, start, rest = run_dir.name.split("-", 3)
    suffix = rest.removeprefix(run_id).removeprefix("-")
    return start, int(suffix or 0)


def offline_run_dir(save_dir: Path) -> Path:
    (run_dir,) = offline_run_dirs(save_dir)
    return run_dir


def gated_projection(embeddings, init):
    """A picklable projection that waits until the file named by $LABELWATCH_TEST_GATE
    exists: the maps of later epochs pile up behind the first."""
    import os
    import time

    gate = Path(os.environ["LABELWATCH_TEST_GATE"])
    while not gate.exists():
        time.sleep(0.02)
    return embeddings[:, :2].astype("float64")


def dying_projection(embeddings, init):
    """A picklable projection whose process is killed, as the kernel's out-of-memory
    killer would kill a map worker."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def slow_projection(embeddings, init):
    """A picklable projection that takes a while: maps land after their epoch ends."""
    import time

    time.sleep(1.5)
    return embeddings[:, :2].astype("float64") + (0 if init is None else 0.0)
