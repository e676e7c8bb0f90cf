"""Capture buffers: slabs reused across epochs without changing what an epoch captures."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer

from labelwatch import LabelWatch
from labelwatch.capture import CapturedEpoch, EpochBuffer, _deduplicate_and_sort
from tests.helpers import TinyClassifier, loaders, trainer_kwargs


def _fill(buffer: EpochBuffer, seed: int, classes: int = 3, batches: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = [torch.randn(4, classes, generator=generator) for _ in range(batches)]
    for i, batch in enumerate(logits):
        buffer.add(
            batch,
            torch.arange(4) % classes,
            torch.arange(4 * i, 4 * i + 4),
            embeddings=torch.randn(4, 5, generator=generator),
        )
    return logits


def test_a_later_epoch_writes_into_the_earlier_epochs_slabs():
    """Reused slabs hold the new epoch's values, in the same memory."""
    first = EpochBuffer(expected_rows=12)
    _fill(first, seed=0)
    first.collect()
    slabs = first.slabs()
    assert set(slabs) == {"logits", "targets", "embeddings", "ids"}
    second = EpochBuffer(expected_rows=12, reuse=slabs)
    logits = _fill(second, seed=1)
    captured = second.collect()
    assert captured.logits.data_ptr() == slabs["logits"].data_ptr()
    assert captured.embeddings.data_ptr() == slabs["embeddings"].data_ptr()
    torch.testing.assert_close(captured.logits, torch.cat(logits))
    assert captured.sample_ids.tolist() == list(range(12))


def test_float16_logits_stay_float16_on_the_host():
    """logits_dtype=float16 stores half-precision logits and to_host does not widen them;
    without it the model's float32 logits are kept."""
    half, full = EpochBuffer(logits_dtype=torch.float16), EpochBuffer()
    logits = _fill(half, seed=2)
    _fill(full, seed=2)
    captured = half.collect().to_host()
    assert captured.logits.dtype == torch.float16
    assert full.collect().to_host().logits.dtype == torch.float32
    torch.testing.assert_close(captured.logits, torch.cat(logits).half())


def test_slabs_that_do_not_fit_are_not_reused():
    """Another width or too few rows allocate afresh; a short guess offers no slab."""
    first = EpochBuffer(expected_rows=12)
    _fill(first, seed=0)
    first.collect()
    slabs = first.slabs()
    wider = EpochBuffer(expected_rows=12, reuse=slabs)
    logits = _fill(wider, seed=1, classes=4)
    captured = wider.collect()
    assert captured.logits.data_ptr() != slabs["logits"].data_ptr()
    torch.testing.assert_close(captured.logits, torch.cat(logits))
    longer = EpochBuffer(expected_rows=16, reuse=slabs)
    _fill(longer, seed=1, batches=4)
    assert longer.collect().logits.data_ptr() != slabs["logits"].data_ptr()
    short = EpochBuffer(expected_rows=4)
    logits = _fill(short, seed=2)
    torch.testing.assert_close(short.collect().logits, torch.cat(logits))
    assert "logits" not in short.slabs()


class _FreshSlabs(LabelWatch):
    """Captures every epoch into fresh memory."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self._spare_slabs = {}


def test_reusing_slabs_across_epochs_gives_the_same_outputs(tmp_path: Path):
    """Three epochs with reused slabs write what fresh slabs write, epoch by epoch."""
    outputs = {}
    for kind, cls in (("reused", LabelWatch), ("fresh", _FreshSlabs)):
        torch.manual_seed(0)
        train, val = loaders(num_val=40, flip=4)
        callback = cls(projection="pca")
        Trainer(**trainer_kwargs(tmp_path / kind, callbacks=[callback], max_epochs=3)).fit(
            TinyClassifier(), train, val
        )
        assert callback._spare_slabs == {}  # released when fitting ends
        outputs[kind] = [
            pd.read_parquet(tmp_path / kind / f"labelwatch/epoch={e}/samples.parquet")
            for e in range(3)
        ]
    for reused, fresh in zip(outputs["reused"], outputs["fresh"], strict=True):
        pd.testing.assert_frame_equal(reused, fresh)


def test_targets_that_are_not_class_indices_get_the_fix_for_their_kind():
    """Float class indices need .long(), one-hot or soft targets argmax(1)."""
    logits = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"shape \(4,\)\. Class indices stored as floats: .*long"):
        EpochBuffer().add(logits, torch.tensor([0.0, 1.0, 2.0, 0.0]), None)
    with pytest.raises(ValueError, match=r"shape \(4, 3\)\. One-hot or soft targets: .*argmax"):
        EpochBuffer().add(logits, torch.eye(3)[[0, 1, 2, 0]], None)


def test_an_integer_id_beyond_64_bits_is_refused_in_the_batch_that_brings_it():
    """parquet keeps integer ids in 64 bits: a larger one would fail the epoch's files."""
    buffer = EpochBuffer()
    buffer.add(torch.randn(2, 3), torch.tensor([0, 1]), [2**64 - 1, 2**63])  # uint64: fine
    with pytest.raises(ValueError, match=r"sample id 18446744073709551621, which does not fit"):
        buffer.add(torch.randn(2, 3), torch.tensor([0, 1]), [7, 2**64 + 5])


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.tensor([0.0, 0.25]), r"got a torch.float32 tensor \(first id 0.0\).*ids.long\(\)"),
        (torch.tensor([True, False]), r"got a torch.bool tensor"),
        ([0.5, 1.5], r"got the float 0.5; give whole numbers as integers \(int\(i\)\)"),
        (np.array([0.5, 1.5]), r"got the float 0.5; give whole numbers as integers"),
        ([b"a.wav", b"b.wav"], r"got the bytes b'a.wav'; decode it"),
        ([uuid.UUID(int=1), uuid.UUID(int=2)], r"got the UUID .*; give it as a string"),
        ([("a.wav", 0), ("a.wav", 1)], r"got the tuple \(\'a.wav\', 0\); join its parts"),
    ],
    ids=["float-tensor", "bool-tensor", "floats", "numpy-floats", "bytes", "uuids", "tuples"],
)
def test_ids_that_are_not_integers_or_strings_are_refused_in_their_batch(ids, message):
    """Float ids would be cut to integers, and other kinds break the parquet or CSV column
    (or a labels file's match): the batch that brings one is refused, with the fix."""
    buffer = EpochBuffer()
    buffer.add(
        torch.randn(2, 3), torch.tensor([0, 1]), ["x", "y"] if isinstance(ids, list) else None
    )
    with pytest.raises(ValueError, match=message):
        buffer.add(torch.randn(2, 3), torch.tensor([0, 1]), ids)


def test_integers_and_strings_of_numpy_types_are_ids():
    """numpy integers and strings are integers and strings."""
    buffer = EpochBuffer()
    buffer.add(torch.randn(2, 3), torch.tensor([0, 1]), [np.int64(3), np.uint8(4)])
    buffer.add(torch.randn(2, 3), torch.tensor([0, 1]), [np.int32(5), 6])
    assert buffer.collect().sample_ids == [3, 4, 5, 6]
    strings = EpochBuffer()
    strings.add(torch.randn(2, 3), torch.tensor([0, 1]), np.array(["a.wav", "b.wav"]))
    assert strings.collect().sample_ids == ["a.wav", "b.wav"]


class _EmbeddingsAs(TinyClassifier):
    """Returns its embeddings rounded to tenths, as floats, integers or a numpy array."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        out = super().validation_step(batch, batch_idx)
        tenths = (out["embeddings"] * 10).round()
        kinds = {"float": tenths, "int": tenths.to(torch.int32), "numpy": tenths.numpy()}
        return {**out, "embeddings": kinds[self.kind]}


def test_integer_and_numpy_embeddings_are_scored_and_mapped_as_floats(tmp_path: Path):
    """Quantised (integer) embeddings are stored as float32 and a numpy array as a tensor:
    both give what the same values as a float tensor give, neighbours and map included."""
    samples = {}
    for kind in ("float", "int", "numpy"):
        torch.manual_seed(0)
        train, val = loaders(num_val=40, flip=4)
        callback = LabelWatch(projection="pca")
        Trainer(**trainer_kwargs(tmp_path / kind, callbacks=[callback], max_epochs=1)).fit(
            _EmbeddingsAs(kind), train, val
        )
        samples[kind] = pd.read_parquet(tmp_path / kind / "labelwatch/epoch=0/samples.parquet")
    assert samples["float"][["knn_agreement", "x"]].notna().all().all()
    pd.testing.assert_frame_equal(samples["int"], samples["float"])
    pd.testing.assert_frame_equal(samples["numpy"], samples["float"])


def _epoch(ids: list[int], logits: torch.Tensor, targets: list[int]) -> CapturedEpoch:
    return CapturedEpoch(logits, torch.tensor(targets), torch.tensor(ids), None)


def test_ddp_padding_is_dropped_but_two_samples_under_one_id_are_an_error():
    """DistributedSampler repeats whole samples (same target, same logits) to even out the
    ranks: dropped. A repeated id on another sample is the user's duplicate: an error,
    even when there are fewer repeats than ranks."""
    logits = torch.randn(4, 3)
    padded = _epoch([0, 1, 2, 0], torch.cat([logits[:3], logits[:1]]), [0, 1, 2, 0])
    assert _deduplicate_and_sort(padded, world_size=2).sample_ids == [0, 1, 2]
    with pytest.raises(ValueError, match="share the sample id 2 .*not DistributedSampler"):
        _deduplicate_and_sort(_epoch([0, 1, 2, 2], logits, [0, 1, 2, 2]), world_size=2)


def test_the_unsplit_dataloader_hint_needs_every_rank_to_send_the_same_ids():
    """Ids repeated on a split loader (id = index // 2) are not called an unsplit loader."""
    logits = torch.zeros(8, 3)
    unsplit = _epoch([0, 1, 2, 3, 0, 1, 2, 3], logits, [0] * 8)
    with pytest.raises(ValueError, match="not split across ranks"):
        _deduplicate_and_sort(unsplit, world_size=2)
    with pytest.raises(ValueError, match="share a sample id") as err:
        _deduplicate_and_sort(_epoch([0, 1, 2, 3, 0, 0, 1, 1], logits, [0] * 8), world_size=2)
    assert "not split" not in str(err.value)
