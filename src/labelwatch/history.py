"""Per-sample history across validation epochs: a snapshot ensemble and flag streaks.

One epoch's predictions are noisy: a sample near a decision boundary flips between
classes from epoch to epoch. :class:`EpochHistory` keeps, for every ``sample_id``, the
probability vectors of its last ``window`` scored epochs (their mean is a snapshot
ensemble, steadier than any single epoch) and its *flag streak*, the number of consecutive
scored epochs in which it was flagged (for example a confident mismatch).

Memory and precision: the history stores the *past* of each window, ``window - 1``
vectors per sample; the current epoch's vectors are the caller's, averaged in a chunk of
rows at a time (:meth:`EpochHistory.begin`) and only then written over the oldest, so no
N x C array beyond the history is made. A running sum over the window would need the
same storage, since the oldest vector must be subtracted when it leaves the window; only
an exponential moving average avoids it, at the price of never forgetting early, poorly
trained epochs, so it is not offered. Two options shrink it:

- ``top_k``: a past vector keeps its ``top_k`` most probable classes and spreads the
  rest of its probability evenly over the other classes (exact while C <= ``top_k``).
  For 100k samples, 1000 classes and ``window=3`` the past takes 0.8 GB in full and
  17 MB with ``top_k=10``. The probabilities a model gives beyond its top 10 classes are
  small and nearly even, so little changes: on 20k synthetic samples with C = 1000 and
  flat predictions (the top 10 classes hold only a seventh of the probability) the 2,000
  lowest averaged self-confidences were the same samples but 3, and confident-learning
  flags agreed on 99.99% of the samples (``python benchmarks/history_top_k.py``).
  Choosing the top classes costs a ``torch.topk`` per epoch, which on a CPU is slower from
  ``k = 16`` on: one epoch's averaging of 100k x 1000 took 0.54 s with ``top_k=10``,
  0.98 s with 16 and 0.61 s with whole vectors on 2 cores (``--samples 100000 --top-k
  10 15 16 32``).
- ``dtype=torch.float16`` halves the stored probabilities; float16 keeps about 3
  significant digits, which moves a self-confidence by at most ~5e-4 and does not change
  rankings measurably.

Samples missing from an epoch (NaN logits that epoch, a sample that left the validation
set) are *skipped*, not reset: their window and streak stay as they were and continue when
they come back, so ``window`` counts a sample's own scored epochs. A new ``sample_id``
starts with an empty window and a streak of 0.

Resume: the state is saved as one Arrow IPC file (sample ids, streaks, epochs seen and the
last ``window - 1`` probability vectors as fixed-size lists: whole, or the top classes'
probabilities, their classes and the rest per class; no pickle), written atomically with
:meth:`EpochHistory.save` and read back, memory-mapped, with :meth:`EpochHistory.load`.
Arrow rather than parquet: the file is rewritten every epoch and is mostly incompressible
probabilities, which Arrow writes at disk speed (100k x 1000 x 3 floats: 1.4 s against
6 s for parquet on 2 cores).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from labelwatch.scoring import describe
from labelwatch.sinks.local import write_atomic

__all__ = ["EpochHistory", "EpochStep", "HISTORY_FILE"]

HISTORY_FILE = "history.arrow"
_FORMAT_VERSION = 4
_DENSE_FORMAT_VERSION = 3  # before top_k: read as a history that keeps whole vectors
_DTYPES = {torch.float32: "float32", torch.float16: "float16"}
# Rows are averaged this many values at a time: no N x C temporary.
_CHUNK_VALUES = 1 << 22


class _TopClasses(NamedTuple):
    """Past vectors kept as their top classes: the values are in ``_past``; here are their
    classes ``(slots, rows, k)`` and, ``(slots, rows)``, the probability of every other
    class (the rest spread evenly)."""

    classes: torch.Tensor
    rest: torch.Tensor


class EpochHistory:
    """The probability vectors of the last ``window`` epochs and the flag streak of every
    sample id.

    Args:
        window: epochs averaged per sample, ``>= 1`` (1 = the current epoch only).
        dtype: storage of the probability vectors, ``torch.float32`` or ``torch.float16``.
        top_k: keep only each past vector's ``top_k`` most probable classes (and the mean
            of the rest); None keeps whole vectors. Exact while C <= ``top_k``.

    Raises:
        ValueError: for ``window``, ``dtype`` or ``top_k`` outside their allowed values.

    Example::

        history = EpochHistory(window=3)
        averaged, streak = history.update(epoch, sample_ids, probs, flags)
        # or, for N x C too large to hold twice, a chunk of rows at a time:
        step = history.begin(epoch, sample_ids, flags, num_classes)
        for rows in step.chunks():
            averaged_rows = step.average(rows, probs_of(rows))
        history.save(out_dir / "history.arrow")
        history = EpochHistory.load(out_dir / "history.arrow")  # after a resume
    """

    def __init__(
        self, window: int = 3, *, dtype: torch.dtype = torch.float32, top_k: int | None = None
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"`window` must be an integer >= 1, got {window!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of torch.float32, torch.float16, got {dtype!r}")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise ValueError(f"`top_k` must be None or an integer >= 1, got {top_k!r}")
        self.window = window
        self.dtype = dtype
        self.top_k = top_k
        self.num_classes: int | None = None
        self.last_epoch: int | None = None
        # Row r of the arrays below belongs to sample id _ids[r]: a pandas Index (a hash
        # table in C), a tenth of a dict's memory at 100k ids.
        self._ids = pd.Index([])
        # (window - 1, rows, width): the past of each row's window, a ring per row, slot-major
        # so each slot is one contiguous block. A slot a row has not reached yet holds zeros,
        # so a window's sum needs no mask. Width C; or, when top_k < C, the top_k largest
        # probabilities, their classes and the rest in _past_top.
        self._past = torch.empty(window - 1, 0, 0, dtype=dtype)
        self._past_top: _TopClasses | None = None
        self._count = torch.empty(0, dtype=torch.long)  # scored epochs seen (all of them)
        self._streak = torch.empty(0, dtype=torch.long)
        self._seen_epoch = torch.empty(0, dtype=torch.long)  # last epoch the id was scored

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def keeps_top_k(self) -> bool:
        """Whether past vectors are kept as their top classes (``top_k`` < C)."""
        return self._past_top is not None

    def stores_like(self, top_k: int | None) -> bool:
        """Whether a history with this ``top_k`` keeps past vectors as this one does (any
        ``top_k`` >= C keeps whole vectors, as None does)."""
        whole = self.num_classes
        return whole is None or min(top_k or whole, whole) == min(self.top_k or whole, whole)

    def update(
        self,
        epoch: int,
        sample_ids: Sequence[Any],
        probs: torch.Tensor,
        flags: torch.Tensor,
        *,
        from_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one epoch and return each sample's averaged probabilities and flag streak.

        Args:
            epoch: the validation epoch; must increase from call to call.
            sample_ids: ``N`` unique ids (ints or strings), in the order of ``probs``.
            probs: ``(N, C)`` probabilities of this epoch (any device; stored on the CPU),
                or logits with ``from_logits=True``.
            flags: ``(N,)`` booleans, this epoch's flag per sample (e.g. confident mismatch).
            from_logits: ``probs`` holds logits: their softmax (in float32) is used.

        Returns:
            ``(averaged, streak)``: ``(N, C)`` float32, the mean of the sample's last
            ``window`` scored epochs' probabilities, this one included, and ``(N,)`` int64,
            the number of consecutive scored epochs up to this one in which it was flagged
            (0 when not flagged now); both aligned with ``sample_ids``, on ``probs``' device.

        Raises:
            ValueError: for inconsistent shapes, duplicate ids, a different number of
                classes than before, or an epoch that does not increase.
        """
        if not isinstance(probs, torch.Tensor) or probs.ndim != 2:
            raise ValueError(
                f"`probs` must be a 2-D tensor (N samples x C classes), got {describe(probs)}"
            )
        ids = sample_ids.tolist() if hasattr(sample_ids, "tolist") else list(sample_ids)
        if len(ids) != len(probs):
            raise ValueError(
                f"`sample_ids` has {len(ids)} entries but `probs` has {len(probs)} rows"
            )
        step = self.begin(epoch, ids, flags, probs.shape[1])
        averaged = torch.empty(probs.shape, dtype=torch.float32)
        for rows in step.chunks():
            chunk = probs[rows].detach().float()
            chunk = torch.softmax(chunk, dim=1) if from_logits else chunk
            averaged[rows] = step.average(rows, chunk.cpu())
        return averaged.to(probs.device), step.streak.to(probs.device)

    def begin(
        self, epoch: int, sample_ids: Sequence[Any], flags: torch.Tensor, num_classes: int
    ) -> EpochStep:
        """Start adding one epoch; its vectors are then given a chunk of rows at a time to
        :meth:`EpochStep.average`, which must see every row once.

        Args:
            epoch, sample_ids, flags: as in :meth:`update`.
            num_classes: ``C``, the length of every probability vector.

        Raises:
            ValueError: as :meth:`update`.
        """
        ids = sample_ids.tolist() if hasattr(sample_ids, "tolist") else list(sample_ids)
        if not isinstance(flags, torch.Tensor) or flags.shape != (len(ids),):
            raise ValueError(
                f"`flags` must be a tensor of shape ({len(ids)},), got {describe(flags)}"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("`sample_ids` must be unique within an epoch")
        if self.num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"`probs` has {num_classes} classes but the history holds {self.num_classes}"
            )
        if self.last_epoch is not None and epoch <= self.last_epoch:
            raise ValueError(
                f"`epoch` must increase from update to update: got {epoch} after {self.last_epoch}"
            )
        self.num_classes = num_classes
        self.last_epoch = epoch
        rows = self._rows_for(ids)
        count = self._count[rows]
        self._count[rows] += 1
        flagged = flags.detach().to("cpu", torch.bool)
        self._streak[rows] = torch.where(flagged, self._streak[rows] + 1, 0)
        self._seen_epoch[rows] = epoch
        return EpochStep(self, rows, count, self._streak[rows])

    def filled(self, sample_ids: Sequence[Any]) -> torch.Tensor:
        """``(N,)`` int64 number of epochs in each id's window (``1..window``; must be known)."""
        return self._count[self._known_rows(sample_ids)].clamp(max=self.window)

    def streak(self, sample_ids: Sequence[Any]) -> torch.Tensor:
        """``(N,)`` int64 flag streak of each id (must be known)."""
        return self._streak[self._known_rows(sample_ids)].clone()

    def to(self, dtype: torch.dtype) -> EpochHistory:
        """Store the probability vectors in ``dtype`` from now on; returns ``self``."""
        if dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of torch.float32, torch.float16, got {dtype!r}")
        self._past, self.dtype = self._past.to(dtype), dtype
        return self

    def _add_past(self, slot: int, index: torch.Tensor | slice, total: torch.Tensor) -> None:
        """Add the vectors past slot ``slot`` holds for ``index`` to ``total`` (rows x C
        float32), in place: the rest everywhere, then the kept classes' difference."""
        top = self._past_top
        if top is None:
            total += self._past[slot, index]
            return
        rest = top.rest[slot, index, None]
        total += rest
        kept = self._past[slot, index].float() - rest
        total.scatter_add_(1, top.classes[slot, index].long(), kept)

    def _add_past_at(
        self, slot: int, rows: torch.Tensor, columns: torch.Tensor, total: torch.Tensor
    ) -> None:
        """:meth:`_add_past` at one class per row (``columns``), with the same arithmetic,
        so that the result is exactly the same."""
        top = self._past_top
        if top is None:
            total += self._past[slot, rows, columns]
            return
        rest = top.rest[slot, rows]
        total += rest
        match = top.classes[slot, rows] == columns[:, None].to(torch.int32)
        total += ((self._past[slot, rows].float() - rest[:, None]) * match).sum(dim=1)

    def _store(
        self, slots: torch.Tensor | int, index: torch.Tensor | slice, current: torch.Tensor
    ) -> None:
        """Write this epoch's vectors (float32, rows x C) over past ``slots`` of ``index``."""
        top = self._past_top
        if top is None:
            self._past[slots, index] = current.to(self.dtype)
            return
        k = self._past.shape[2]
        values, classes = current.topk(k, dim=1, sorted=False)
        rest = (1.0 - values.sum(dim=1)).clamp_(min=0.0) / ((self.num_classes or k) - k)
        self._past[slots, index] = values.to(self.dtype)
        top.classes[slots, index] = classes.to(torch.int32)
        top.rest[slots, index] = rest

    # ------------------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the whole state to one Arrow IPC file, atomically; returns the path."""
        import pyarrow as pa
        import pyarrow.feather as feather

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        num_classes = self.num_classes or 0
        columns: dict[str, Any] = {
            "sample_id": pa.array(self._ids.tolist()),
            "count": pa.array(self._count.numpy()),
            "streak": pa.array(self._streak.numpy()),
            "last_seen_epoch": pa.array(self._seen_epoch.numpy()),
        }
        width = max(self._past.shape[2], 1)
        for s in range(self.window - 1 if num_classes else 0):  # no vectors while empty
            # each slot is contiguous: handed to Arrow as it is
            columns[f"probs_{s}"] = _fixed_size_lists(self._past[s], width)
            if self._past_top is not None:
                columns[f"classes_{s}"] = _fixed_size_lists(self._past_top.classes[s], width)
                columns[f"rest_{s}"] = pa.array(self._past_top.rest[s].numpy())
        meta = {
            "version": _FORMAT_VERSION,
            "window": self.window,
            "dtype": _DTYPES[self.dtype],
            "top_k": self.top_k,
            "num_classes": self.num_classes,
            "last_epoch": self.last_epoch,
        }
        table = pa.table(columns).replace_schema_metadata({"labelwatch": json.dumps(meta)})
        write_atomic(
            path, lambda tmp: feather.write_feather(table, tmp, compression="uncompressed")
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> EpochHistory:
        """Rebuild a history written by :meth:`save`."""
        import pyarrow as pa
        import pyarrow.feather as feather

        try:
            table = feather.read_table(Path(path).absolute(), memory_map=True)  # not a URI
        except pa.ArrowInvalid as err:
            raise ValueError(f"{path} is not a labelwatch history file ({err})") from err
        raw = (table.schema.metadata or {}).get(b"labelwatch")
        if raw is None:
            raise ValueError(f"{path} is not a labelwatch history file (no 'labelwatch' metadata)")
        meta = json.loads(raw)
        if meta.get("version") not in (_FORMAT_VERSION, _DENSE_FORMAT_VERSION):
            raise ValueError(
                f"{path} has history format {meta.get('version')!r}, expected {_FORMAT_VERSION}"
            )
        dtype = {name: dt for dt, name in _DTYPES.items()}[meta["dtype"]]
        history = cls(window=int(meta["window"]), dtype=dtype, top_k=meta.get("top_k"))
        history.num_classes = meta.get("num_classes")
        history.last_epoch = meta.get("last_epoch")
        ids = table.column("sample_id").to_pylist()
        history._ids = pd.Index(ids)
        history._count = torch.from_numpy(table.column("count").to_numpy().astype(np.int64))
        history._streak = torch.from_numpy(table.column("streak").to_numpy().astype(np.int64))
        seen = table.column("last_seen_epoch").to_numpy().astype(np.int64)
        history._seen_epoch = torch.from_numpy(seen)
        num_classes = history.num_classes or 0
        slots = history.window - 1 if num_classes else 0
        history._allocate(len(ids))
        for s in range(slots):  # copied out of the mapped file
            history._past[s].numpy()[:] = _from_fixed_size_lists(table, f"probs_{s}", len(ids))
            if history._past_top is not None:
                classes = _from_fixed_size_lists(table, f"classes_{s}", len(ids))
                history._past_top.classes[s].numpy()[:] = classes
                history._past_top.rest[s].numpy()[:] = table.column(f"rest_{s}").to_numpy()
        return history

    # ---------------------------------------------------------------------------- helpers
    def _rows_for(self, ids: list[Any]) -> torch.Tensor:
        """Rows of the ids, appending rows (empty window, streak 0) for new ones."""
        rows = self._ids.get_indexer(ids)
        new = np.flatnonzero(rows < 0)
        if len(new):
            start, grow = len(self._ids), len(new)
            added_ids = pd.Index([ids[i] for i in new])
            # the first ids become the Index itself: appending to the empty (object) Index
            # goes through Python objects, 0.5 s at 100k ids
            self._ids = self._ids.append(added_ids) if start else added_ids
            rows[new] = np.arange(start, start + grow)
            if self._past.shape[2] == 0:  # the first update fixes C
                self._allocate(start + grow)
            else:
                self._past = _grow(self._past, grow)
                if self._past_top is not None:
                    self._past_top = _TopClasses(*(_grow(t, grow) for t in self._past_top))
            zeros = torch.zeros(grow, dtype=torch.long)
            self._count = torch.cat([self._count, zeros])
            self._streak = torch.cat([self._streak, zeros])
            self._seen_epoch = torch.cat([self._seen_epoch, zeros - 1])
        return torch.from_numpy(rows.astype(np.int64))

    def _allocate(self, rows: int) -> None:
        """Zeroed past slots for ``rows`` rows, once C is known: whole vectors, or the top
        ``top_k`` classes when that is fewer than C."""
        num_classes, slots = self.num_classes or 0, self.window - 1
        keep = self.top_k is not None and self.top_k < num_classes
        width = self.top_k if keep and self.top_k is not None else num_classes
        self._past = torch.zeros(slots, rows, width, dtype=self.dtype)
        self._past_top = (
            _TopClasses(
                torch.zeros(slots, rows, width, dtype=torch.int32), torch.zeros(slots, rows)
            )
            if keep
            else None
        )

    def _known_rows(self, sample_ids: Sequence[Any]) -> torch.Tensor:
        ids = sample_ids.tolist() if hasattr(sample_ids, "tolist") else list(sample_ids)
        rows = self._ids.get_indexer(ids)
        if (rows < 0).any():
            unknown = [ids[i] for i in np.flatnonzero(rows < 0)[:10]]
            raise ValueError(f"unknown `sample_ids` (never passed to update): {unknown}")
        return torch.from_numpy(rows.astype(np.int64))


class EpochStep:
    """One epoch being added to an :class:`EpochHistory` (from :meth:`EpochHistory.begin`).

    Attributes:
        streak: ``(N,)`` int64 flag streak of each sample, this epoch included.
        divisor: ``(N,)`` int64 epochs in each sample's average (``1..window``).
    """

    def __init__(
        self, history: EpochHistory, rows: torch.Tensor, count: torch.Tensor, streak: torch.Tensor
    ) -> None:
        self._history = history
        self._rows = rows
        slots = history.window - 1
        self._slot = count % slots if slots else count  # the oldest, replaced by this epoch
        self.divisor = count.clamp(max=slots) + 1
        self.streak = streak
        # the usual case: every known id, in row order, at the same point of its window
        self._in_place = 0 < len(rows) == len(history) and bool(
            (rows == torch.arange(len(rows))).all() and (self._slot == self._slot[0]).all()
        )
        self._averaged = False

    def chunks(self) -> list[slice]:
        """Row slices of about 4M values each, in order."""
        step = max(1, _CHUNK_VALUES // max(self._history.num_classes or 1, 1))
        return [slice(start, start + step) for start in range(0, len(self._rows), step)]

    def mean_at(self, columns: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32: the window mean at one class per sample (``columns``, e.g. the
        given labels), this epoch's values there being ``current``; exactly the values
        :meth:`average` gives at those classes. Call it before :meth:`average`."""
        if self._averaged:
            raise RuntimeError("mean_at() reads the past epochs: call it before average()")
        total = current.detach().to("cpu", torch.float32).clone()
        columns = columns.to("cpu", torch.long)
        for slot in range(len(self._history._past)):  # unreached slots are zeros
            self._history._add_past_at(slot, self._rows, columns, total)
        return total / self.divisor.float()

    def average(self, rows: slice, current: torch.Tensor) -> torch.Tensor:
        """The window mean of ``rows`` (one of :meth:`chunks`), whose vectors this epoch
        are ``current`` (float32 on the CPU); then ``current`` replaces their oldest."""
        self._averaged = True
        history, index = self._history, self._rows[rows]
        where = rows if self._in_place else index
        total = current.clone()
        for slot in range(len(history._past)):  # unreached slots are zeros
            history._add_past(slot, where, total)
        if len(history._past):
            history._store(
                int(self._slot[0]) if self._in_place else self._slot[rows], where, current
            )
        return total.div_(self.divisor[rows, None].float())


def _grow(past: torch.Tensor, rows: int) -> torch.Tensor:
    """``past`` (slots, rows, ...) with ``rows`` more rows of zeros."""
    return torch.cat([past, past.new_zeros((past.shape[0], rows, *past.shape[2:]))], dim=1)


def _fixed_size_lists(values: torch.Tensor, width: int) -> Any:
    """``(rows, width)`` -> an Arrow fixed-size list array, without a copy."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(values.numpy().reshape(-1)), width)


def _from_fixed_size_lists(table: Any, column: str, rows: int) -> np.ndarray:
    """A fixed-size list column as a read-only ``(rows, width)`` view of the mapped file."""
    lists = table.column(column).combine_chunks()
    return lists.values.to_numpy().reshape(rows, lists.type.list_size)
