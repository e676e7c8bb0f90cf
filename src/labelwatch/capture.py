"""Per-epoch accumulation of what LabelWatch needs from each validation batch.

Batches are kept as detached tensors on the model's device and concatenated once at
epoch end, so capturing adds no host synchronisation to the validation loop.
"""

from __future__ import annotations

import atexit
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "CapturedEpoch",
    "EpochBuffer",
    "LayerTap",
    "destroy_gloo_group_at_exit",
    "find_submodule",
    "merge_ranks",
]


@dataclass
class CapturedEpoch:
    """One epoch's captured validation data: one row per sample, in a canonical order."""

    logits: torch.Tensor
    targets: torch.Tensor
    sample_ids: list[Any]
    embeddings: torch.Tensor | None
    metadata: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.targets)

    def to_host(self) -> CapturedEpoch:
        """Everything on the CPU, logits as float32 unless stored in float16 (scoring
        converts a chunk at a time); embeddings keep their dtype (the map converts them
        when it needs to)."""
        embeddings = self.embeddings.cpu() if self.embeddings is not None else None
        logits = self.logits if self.logits.dtype == torch.float16 else self.logits.float()
        return CapturedEpoch(
            logits.cpu(),
            self.targets.cpu(),
            self.sample_ids,
            embeddings,
            self.metadata,
        )


class _Rows:
    """Batches copied into preallocated slabs, so no per-batch tensor is kept alive.

    The first slab is sized from the expected number of rows (batches x first batch
    size); further slabs, needed only when the guess was short, grow geometrically.
    Copies stay on the device and are asynchronous, like the forward pass itself.

    ``reuse`` is a slab from an earlier epoch: taken as the first slab when it fits, so
    its memory pages are touched once per fit rather than once per epoch (the page
    faults of fresh memory cost about as much as the copies themselves on a CPU).
    """

    def __init__(
        self,
        expected_rows: int | None,
        dtype: torch.dtype | None,
        device: Any,
        reuse: torch.Tensor | None = None,
    ) -> None:
        self._slabs: list[torch.Tensor] = []
        self._used = 0  # rows filled in the last slab
        self._capacity = 0  # rows the last slab holds
        self._expected = expected_rows
        self._dtype = dtype
        self._device = device  # None: the batch's own device
        self._reuse = reuse
        self.first_slab: torch.Tensor | None = None  # whole, for the next epoch to reuse
        self._copied_from: torch.device | None = None  # a GPU copying into pinned memory

    def append(self, batch: torch.Tensor) -> None:
        # shape[0], not len(): a tensor's len() costs microseconds, and this runs per batch
        batch, rows = batch.detach(), batch.shape[0]
        if not self._slabs or self._used + rows > self._capacity:
            self._new_slab(batch)
        self._slabs[-1][self._used : self._used + rows].copy_(batch, non_blocking=True)
        self._used += rows

    def _new_slab(self, batch: torch.Tensor) -> None:
        if self._slabs:
            self._slabs[-1] = self._slabs[-1][: self._used]
            rows = max(len(batch), sum(len(s) for s in self._slabs))
            self.first_slab = None  # the guess was short: concat frees the slabs, keep none
        else:
            rows = max(len(batch), self._expected or 0)
        device = self._device or batch.device
        dtype = self._dtype or batch.dtype
        reuse, self._reuse = self._reuse, None
        if (
            not self._slabs
            and reuse is not None
            and reuse.dtype == dtype
            and reuse.device == torch.device(device)
            and reuse.shape[1:] == batch.shape[1:]
            and len(reuse) >= rows
        ):
            slab = reuse
        else:
            pin = torch.device(device) == torch.device("cpu") and batch.device.type == "cuda"
            shape = (rows, *batch.shape[1:])
            slab = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
        if slab.device.type == "cpu" and batch.device.type == "cuda":
            self._copied_from = batch.device
        if not self._slabs:
            self.first_slab = slab
        self._slabs.append(slab)
        self._used, self._capacity = 0, slab.shape[0]

    def concat(self) -> torch.Tensor:
        if self._copied_from is not None:  # the non-blocking copies to the host must land
            torch.cuda.synchronize(self._copied_from)
        self._slabs[-1] = self._slabs[-1][: self._used]
        if len(self._slabs) == 1:
            return self._slabs.pop()
        return _cat_and_free(self._slabs)


class EpochBuffer:
    """Collects logits, targets, ids, optional embeddings and metadata batch by batch.

    Args:
        expected_rows: rows this epoch will probably bring (sizes the first allocation).
        embeddings_dtype: store embeddings in this dtype (float16 halves their memory).
        logits_dtype: store logits in this dtype; None keeps the model's.
        offload_to_cpu: copy each batch to (pinned) host memory as it arrives, so the
            accelerator keeps no copy; scoring happens on the host either way.
        reuse: the ``slabs()`` of an earlier epoch's buffer, whose tensors that epoch no
            longer uses: they are written over when they fit.
    """

    def __init__(
        self,
        *,
        expected_rows: int | None = None,
        embeddings_dtype: torch.dtype | None = None,
        logits_dtype: torch.dtype | None = None,
        offload_to_cpu: bool = False,
        reuse: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        device = torch.device("cpu") if offload_to_cpu else None
        reuse = reuse or {}
        self._logits = _Rows(expected_rows, logits_dtype, device, reuse.get("logits"))
        self._targets = _Rows(expected_rows, torch.long, device, reuse.get("targets"))
        self._embeddings = _Rows(expected_rows, embeddings_dtype, device, reuse.get("embeddings"))
        self._tensor_ids = _Rows(expected_rows, torch.long, device, reuse.get("ids"))
        self._ids: list[Any] = []  # ids that are not tensors (strings, lists)
        self._metadata: dict[str, list[Any]] = {}
        self._num_embedded = 0
        self._embedding_width: int | None = None  # the first batch's: every batch needs it
        self.num_batches = 0
        self.num_samples = 0

    def add(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        sample_ids: Any | None,
        embeddings: torch.Tensor | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one batch; shapes and kinds are checked here, values at epoch end.

        Embeddings may be a numpy array; integer ones (quantised, say) are stored as
        float32, which the map and the neighbours need.
        """
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            fix = (
                "A binary classifier with one logit z a sample: return"
                " `torch.stack([torch.zeros_like(z), z], 1)` as `logits`."
                if isinstance(logits, torch.Tensor) and logits.ndim == 1
                else "Return the classifier's 2-D output as `logits`, or set `logits_layer`"
                " to the head."
            )
            raise ValueError(
                f"LabelWatch expects logits of shape (batch, num_classes), got {shape}. {fix}"
            )
        batch_size = logits.shape[0]
        targets = torch.as_tensor(targets, device=logits.device)
        if targets.ndim != 1 or targets.dtype.is_floating_point:
            fix = (
                "Class indices stored as floats: return `target=y.long()`"
                if targets.ndim == 1
                else "One-hot or soft targets: return `target=y.argmax(1)`"
            )
            raise ValueError(
                "LabelWatch expects targets as a 1-D tensor of class indices, got dtype"
                f" {targets.dtype} and shape {tuple(targets.shape)}. {fix} from validation_step."
            )
        _check_length("targets", targets.shape[0], batch_size)
        if sample_ids is None:
            sample_ids = torch.arange(self.num_samples, self.num_samples + batch_size)
        if isinstance(sample_ids, torch.Tensor):
            sample_ids = sample_ids.reshape(-1)
            _check_id_dtype(sample_ids)
        elif isinstance(sample_ids, np.ndarray) or not isinstance(sample_ids, Sequence):
            sample_ids = list(np.asarray(sample_ids).reshape(-1).tolist())
        if _rows(sample_ids) != batch_size and _collated_parts(sample_ids, batch_size):
            raise ValueError(
                f"LabelWatch got {len(sample_ids)} sample ids for {batch_size} samples, each a"
                f" sequence of {batch_size}: per-sample tuple ids, which the default collate"
                " turns into one list per part. Give each sample one integer or string id,"
                ' e.g. f"{file}#{chunk}" in the dataset\'s __getitem__.'
            )
        _check_length("sample ids", _rows(sample_ids), batch_size)
        if isinstance(sample_ids, torch.Tensor) and not self._ids:
            self._tensor_ids.append(sample_ids)
        else:
            if self._tensor_ids._slabs:  # ids switched from tensors to lists: keep one kind
                self._ids = _flatten([self._tensor_ids.concat()])
                self._tensor_ids = _Rows(None, torch.long, None)
            ids = _flatten([sample_ids])
            for sample_id in ids:  # plain str and int by identity: this runs for every id
                kind = type(sample_id)
                if not (kind is str or (kind is int and _INT_MIN <= sample_id < _UINT_END)):
                    _check_id(sample_id)
            self._ids.extend(ids)
        self._logits.append(logits)
        self._targets.append(targets)
        if embeddings is not None:
            self._embeddings.append(self._embeddings_of(embeddings, logits.device, batch_size))
            self._num_embedded += 1
        for key, value in (metadata or {}).items():
            _check_length(f"metadata {key!r}", _rows(value), batch_size)
            if getattr(value, "ndim", 1) != 1:
                raise ValueError(
                    f"LabelWatch expects metadata {key!r} to hold one number or string per"
                    f" sample, got shape {tuple(value.shape)}. Keep per-sample arrays out of"
                    " `metadata_keys`; pass an index or a file path that leads to them."
                )
            self._metadata.setdefault(key, []).append(value)
        self.num_batches += 1
        self.num_samples += batch_size

    def _embeddings_of(
        self, embeddings: Any, device: torch.device, batch_size: int
    ) -> torch.Tensor:
        """(batch, D) floating-point embeddings, D the same in every batch of the epoch."""
        if not isinstance(embeddings, torch.Tensor):  # a numpy array, say
            embeddings = torch.as_tensor(embeddings, device=device)
        _check_length("embeddings", embeddings.shape[0], batch_size)
        if not embeddings.dtype.is_floating_point:  # cosine similarity and PCA need floats
            embeddings = embeddings.float()
        embeddings = embeddings.reshape(batch_size, -1)
        width = embeddings.shape[1]
        if self._embedding_width is None:
            self._embedding_width = width
        elif width != self._embedding_width:  # caught here, not by the concat at epoch end
            raise ValueError(
                f"LabelWatch got embeddings of {width} values per sample in validation batch"
                f" {self.num_batches} but {self._embedding_width} in the first; every batch needs"
                " the same width. A feature map whose size follows the input (clips of"
                " different lengths, say) flattens to a different width: pool it to a fixed"
                " size (a mean over time, say) before returning it, or hook a pooled layer."
            )
        return embeddings

    def slabs(self) -> dict[str, torch.Tensor]:
        """The first slab of each column, whole: what a later epoch's buffer can reuse.

        Only once this epoch's captured tensors are no longer used (they are views of them).
        """
        rows = {
            "logits": self._logits,
            "targets": self._targets,
            "embeddings": self._embeddings,
            "ids": self._tensor_ids,
        }
        return {k: r.first_slab for k, r in rows.items() if r.first_slab is not None}

    def collect(self) -> CapturedEpoch | None:
        """The epoch's rows, on the device they were captured on; None when empty."""
        if not self.num_batches:
            return None
        embeddings = None
        if self._num_embedded:
            if self._num_embedded != self.num_batches:
                raise ValueError(
                    "Embeddings were found for some validation batches but not others; return"
                    " `embeddings` from every validation_step or set `embedding_layer`."
                )
            embeddings = self._embeddings.concat()
        logits = self._logits.concat()
        ids = self._ids if self._ids else self._tensor_ids.concat().to(logits.device)
        return CapturedEpoch(
            logits=logits,
            targets=self._targets.concat().to(logits.device),
            sample_ids=ids,
            embeddings=embeddings,
            metadata={key: _flatten(chunks) for key, chunks in self._metadata.items()},
        )


_destroy_registered = False


def destroy_gloo_group_at_exit() -> None:
    """Destroy this process's gloo process group when Python exits, before it finalizes.

    Left to finalization, a gloo worker thread can release the last reference to a
    tensor whose Python object is already gone, and take the GIL of an interpreter being
    torn down: the rank aborts ("terminate called without an active exception",
    pytorch/pytorch#190489), and ddp_spawn then kills the other ranks, rank zero's
    unfinished epoch-end writes included. Lightning destroys NCCL groups at exit, not
    gloo ones. Registered once per process.
    """
    global _destroy_registered
    if _destroy_registered or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        atexit.register(_destroy_process_group)
        _destroy_registered = True


def _destroy_process_group() -> None:
    if dist.is_initialized():  # the script may have destroyed it already
        dist.destroy_process_group()


def merge_ranks(local: CapturedEpoch | None) -> CapturedEpoch | None:
    """All ranks' samples on rank zero (None elsewhere), de-duplicated and sorted by id.

    Called on every rank. Without a process group this only canonicalises ``local``.
    Tensors travel in one fused, padded gather to rank zero (ranks may hold different
    counts), after an all_gather of their shapes; string ids and metadata in one object
    gather. DistributedSampler repeats samples to
    even out ranks: repeats are dropped by id, keeping the first copy.
    """
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world_size > 1:
        local = _gather(local, world_size)
    if local is None or len(local) == 0:
        return None
    return _deduplicate_and_sort(local, world_size)


def _gather(local: CapturedEpoch | None, world_size: int) -> CapturedEpoch | None:
    device = local.logits.device if local is not None else _default_device()
    # 1) shapes: rows, classes, embedding width, embedding dtype code, integer ids, bytes
    #    per logit (float16 logits travel as float16 when every rank has them)
    shape = torch.tensor(_shape_of(local), device=device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    _check_widths_agree(shapes)
    rows = [int(s[0]) for s in shapes]
    num_classes = max(int(s[1]) for s in shapes)
    width = max(int(s[2]) for s in shapes)
    emb_dtype = _gathered_embeddings_dtype({int(s[3]) for s in shapes if s[0] > 0})
    int_ids = bool(min(int(s[4]) for s in shapes if s[0] > 0)) if sum(rows) else True
    logits_dtype = torch.float16 if max(int(s[5]) for s in shapes) == 2 else torch.float32
    # 2) one fused gather of every number, as raw bytes, padded to the largest rank
    columns = _numeric_columns(local, num_classes, width, emb_dtype, logits_dtype, int_ids, device)
    packed = torch.cat([c.contiguous().view(torch.uint8) for c in columns], dim=1)
    padded = torch.zeros(max(rows), packed.shape[1], dtype=torch.uint8, device=device)
    padded[: len(packed)] = packed
    # Gathered to rank zero only: the other ranks never hold the whole epoch.
    zero = dist.get_rank() == 0
    gathered = [torch.empty_like(padded) for _ in range(world_size)] if zero else None
    dist.gather(padded, gathered, dst=0)
    # 3) strings and metadata, once
    objects = {"metadata": local.metadata if local is not None else {}}
    if not int_ids:
        ids = local.sample_ids if local is not None else []
        # integers that are a tensor here and a list on another rank: as Python ints
        objects["ids"] = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    received: list[Any] | None = [None] * world_size if zero else None
    dist.gather_object(objects, received, dst=0)
    if not zero:
        return None
    all_rows = torch.cat([g[:n] for g, n in zip(gathered, rows, strict=True)])
    out = _split_columns(all_rows, columns)
    metadata: dict[str, list[Any]] = {}
    for part in received:
        for key, values in part["metadata"].items():
            metadata.setdefault(key, []).extend(values)
    ids = out[3].reshape(-1) if int_ids else [i for part in received for i in part["ids"]]
    return CapturedEpoch(
        logits=out[0],
        targets=out[1].reshape(-1),
        sample_ids=ids,
        embeddings=out[2] if emb_dtype is not None else None,
        metadata=metadata,
    )


def _check_widths_agree(shapes: list[torch.Tensor]) -> None:
    """Each rank checked its own batches; the ranks must agree too, or the gather, padded
    to the widest, reads a narrower rank's bytes at the wrong offsets. Every rank holds
    the shapes, so all of them raise, and none waits in a collective."""
    with_rows = [(rank, shape) for rank, shape in enumerate(shapes) if shape[0] > 0]
    for column, what in ((1, "logits"), (2, "embeddings")):
        if len({int(shape[column]) for _, shape in with_rows}) > 1:
            widths = ", ".join(f"rank {rank}: {int(shape[column])}" for rank, shape in with_rows)
            raise ValueError(
                f"LabelWatch: the ranks' validation batches give {what} of different widths"
                f" per sample ({widths}); every rank must give the same number (pool or pad"
                " features whose size follows the input to one size)."
            )


def _shape_of(local: CapturedEpoch | None) -> list[int]:
    if local is None:
        return [0, 0, 0, 0, 1, 2]
    emb = local.embeddings
    return [
        len(local),
        local.logits.shape[1],
        emb.shape[1] if emb is not None else 0,
        _EMBEDDINGS_CODES.get(emb.dtype, 4) if emb is not None else 0,
        int(isinstance(local.sample_ids, torch.Tensor)),
        2 if local.logits.dtype == torch.float16 else 4,
    ]


# Embeddings travel in their own dtype when every rank has the same 16-bit one (bfloat16
# as float16 would overflow above 65504); any other mix travels as float32.
_EMBEDDINGS_CODES = {torch.float16: 2, torch.bfloat16: 3, torch.float32: 4}


def _gathered_embeddings_dtype(codes: set[int]) -> torch.dtype | None:
    codes = codes - {0}  # 0: a rank without embeddings (or without rows)
    if len(codes) != 1:
        return torch.float32 if codes else None
    return {2: torch.float16, 3: torch.bfloat16}.get(codes.pop(), torch.float32)


def _numeric_columns(
    local: CapturedEpoch | None,
    num_classes: int,
    width: int,
    emb_dtype: torch.dtype | None,
    logits_dtype: torch.dtype,
    int_ids: bool,
    device: torch.device,
) -> list[torch.Tensor]:
    """[logits, targets i64, embeddings, ids i64] as 2-D tensors of this rank's rows."""
    n = len(local) if local is not None else 0
    logits = local.logits if local is not None else torch.zeros(n, num_classes)
    targets = local.targets.reshape(n, 1) if local is not None else torch.zeros(n, 1)
    embeddings = torch.zeros(
        n, width if emb_dtype is not None else 0, dtype=emb_dtype or torch.float32
    )
    if local is not None and local.embeddings is not None:
        embeddings = local.embeddings.to(emb_dtype)
    ids = torch.zeros(n, 1 if int_ids else 0, dtype=torch.long)
    if int_ids and local is not None:
        ids = local.sample_ids.reshape(n, 1)
    return [
        logits.to(device, logits_dtype),
        targets.to(device, torch.long),
        embeddings.to(device),
        ids.to(device, torch.long),
    ]


def _split_columns(rows: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for column in like:
        nbytes = column.shape[1] * column.element_size()
        if nbytes == 0:  # an absent column (no embeddings, string ids)
            out.append(torch.empty(len(rows), 0, dtype=column.dtype, device=rows.device))
            continue
        # clone: a fresh buffer at offset 0, which a view as a wider dtype requires
        chunk = rows[:, start : start + nbytes].clone(memory_format=torch.contiguous_format)
        out.append(chunk.view(column.dtype).reshape(len(rows), column.shape[1]))
        start += nbytes
    return out


def _deduplicate_and_sort(captured: CapturedEpoch, world_size: int) -> CapturedEpoch:
    ids = captured.sample_ids
    id_list = ids.cpu().tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if world_size > 1:  # ranks may bring ids of different kinds, which sort nowhere
        from labelwatch.scoring import _check_id_kinds

        _check_id_kinds(id_list)
    first: dict[Any, int] = {}
    for position, sample_id in enumerate(id_list):
        first.setdefault(sample_id, position)
    if world_size > 1 and len(first) < len(id_list):
        # Only the sampler's padding may repeat an id; anything more is a user error.
        repeats = len(id_list) - len(first)
        unique = len(first)
        if repeats >= world_size:
            hint = ""
            shards = [id_list[k * unique : (k + 1) * unique] for k in range(world_size)]
            if len(id_list) == world_size * unique and all(s == shards[0] for s in shards):
                hint = (
                    f" Each of the {world_size} ranks sent every id: the validation dataloader"
                    " is not split across ranks (Trainer(use_distributed_sampler=False)?). Let"
                    " Lightning add its DistributedSampler, or shard the data yourself."
                )
            raise ValueError(
                f"{repeats} validation samples share a sample id with another sample; ids must be"
                " unique within an epoch (DistributedSampler repeats at most world_size - 1)."
                + hint
            )
        _check_repeats_are_copies(captured, id_list, first)
    keep = sorted(first.values(), key=id_list.__getitem__) if world_size > 1 else None
    if keep is None:  # one process: keep the loader's order and let scoring report duplicates
        return CapturedEpoch(
            captured.logits, captured.targets, id_list, captured.embeddings, captured.metadata
        )
    index = torch.tensor(keep, dtype=torch.long, device=captured.logits.device)
    embeddings = captured.embeddings[index] if captured.embeddings is not None else None
    return CapturedEpoch(
        logits=captured.logits[index],
        targets=captured.targets[index],
        sample_ids=[id_list[i] for i in keep],
        embeddings=embeddings,
        metadata={k: [v[i] for i in keep] for k, v in captured.metadata.items()},
    )


def _check_repeats_are_copies(
    captured: CapturedEpoch, id_list: list[Any], first: dict[Any, int]
) -> None:
    """DistributedSampler pads by repeating whole samples: a repeated id whose target or
    logits differ from its first row's is two samples under one id, not padding."""
    for position, sample_id in enumerate(id_list):
        kept = first[sample_id]
        if kept == position:
            continue
        same = bool(captured.targets[kept] == captured.targets[position]) and torch.allclose(
            captured.logits[kept].float(), captured.logits[position].float(), rtol=1e-3, atol=1e-3
        )
        if not same:
            raise ValueError(
                f"Two validation samples share the sample id {sample_id!r} (their targets or"
                " logits differ, so this is not DistributedSampler's padding); ids must be"
                " unique within an epoch."
            )


def _default_device() -> torch.device:
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class LayerTap:
    """Forward hook that keeps the latest output of one submodule while active, and counts
    its calls (a layer run twice in a step, as in test-time augmentation, keeps only the
    last output)."""

    def __init__(self, module: nn.Module) -> None:
        self.output: torch.Tensor | None = None
        self.calls = 0  # since the last pop
        self.other: str | None = None  # the type of the last output that was no tensor
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.calls += 1
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        is_tensor = isinstance(output, torch.Tensor)
        self.output = output.detach() if is_tensor else None
        self.other = None if is_tensor else type(output).__name__

    def pop(self) -> tuple[torch.Tensor | None, int, str | None]:
        """The output seen since the last call, the calls since then, and the type of the
        last output when it was no tensor; then forget them."""
        taken = self.output, self.calls, self.other
        self.output, self.calls, self.other = None, 0, None
        return taken

    def remove(self) -> None:
        self._handle.remove()


def find_submodule(model: nn.Module, name: str, argument: str) -> nn.Module:
    """The submodule called `name`, or an error listing the names that exist."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"`{argument}`={name!r} is not a submodule of {type(model).__name__}; choose one of"
            f" {names[:30]}{' ...' if len(names) > 30 else ''}."
        ) from None


def _cat_and_free(chunks: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat that releases each batch once copied, so the epoch never exists twice."""
    first = chunks[0]
    out = first.new_empty((sum(len(c) for c in chunks), *first.shape[1:]))
    start = 0
    for i, chunk in enumerate(chunks):
        out[start : start + len(chunk)] = chunk
        start += len(chunk)
        chunks[i] = None  # type: ignore[call-overload]
    chunks.clear()
    return out


_INT_MIN, _UINT_END = -(2**63), 2**64  # integer ids parquet can hold (int64 or uint64)


def _rows(values: Any) -> int:
    return values.shape[0] if isinstance(values, torch.Tensor) else len(values)


def _check_id_dtype(sample_ids: torch.Tensor) -> None:
    """Integer ids only: the id slab is int64, which would cut 1.5 to 1 (and make 0.25
    and 0.5 one id). Whole-number floats are refused too: telling them apart takes a pass
    over every id, and `.long()` is the user's one call."""
    dtype = sample_ids.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        first = sample_ids[:1].tolist()
        raise ValueError(
            f"LabelWatch expects sample ids that are integers or strings, got a {dtype} tensor"
            f"{f' (first id {first[0]!r})' if first else ''}; ids are kept as 64-bit integers,"
            " which would cut 1.5 to 1. Return whole-number ids as integers (`ids.long()`)"
            " and others as strings ([str(i) for i in ids.tolist()])."
        )


def _check_id(sample_id: Any) -> None:
    """An id that is not a plain str or int: integers of other types (numpy's) pass when
    parquet can hold them; anything but an integer or a string is refused, in its batch:
    a tuple fails the parquet write at epoch end, a UUID the W&B table, and bytes are
    written to the CSV as b'...', which no labels file matches."""
    if isinstance(sample_id, str):
        return
    if isinstance(sample_id, numbers.Integral) and not isinstance(sample_id, bool):
        if _INT_MIN <= int(sample_id) < _UINT_END:
            return
        raise ValueError(
            f"LabelWatch got the sample id {sample_id}, which does not fit in 64 bits; give"
            " such ids as strings (str(id))."
        )
    if isinstance(sample_id, (tuple, list)):
        fix = 'join its parts into one string, e.g. f"{file}#{chunk}"'
    elif isinstance(sample_id, (float, np.floating)):
        fix = "give whole numbers as integers (int(i)) and other ids as strings (str(i))"
    elif isinstance(sample_id, bytes):
        fix = "decode it (sample_id.decode())"
    else:  # a UUID, None, ...
        fix = "give it as a string (str(sample_id))"
    raise ValueError(
        "LabelWatch expects each sample id to be an integer or a string (one parquet and CSV"
        f" column holds them), got the {type(sample_id).__name__} {sample_id!r}; {fix}."
    )


def _collated_parts(ids: Any, batch_size: int) -> bool:
    """Whether ``ids`` are per-sample tuples after the default collate: one sequence (or
    1-D tensor) of ``batch_size`` per part."""

    def is_part(part: Any) -> bool:
        sequence = isinstance(part, (list, tuple)) or getattr(part, "ndim", 0) == 1
        return sequence and _rows(part) == batch_size

    return isinstance(ids, (list, tuple)) and len(ids) > 0 and all(map(is_part, ids))


def _check_length(what: str, length: int, batch_size: int) -> None:
    if length != batch_size:
        raise ValueError(
            f"LabelWatch got {batch_size} logits but {length} {what} in a validation batch;"
            " each sample needs exactly one of each."
        )


def _flatten(chunks: list[Any]) -> list[Any]:
    """One flat Python list from per-batch tensors, arrays or lists."""
    out: list[Any] = []
    for chunk in chunks:
        if isinstance(chunk, torch.Tensor):
            out.extend(chunk.cpu().reshape(-1).tolist())
        elif isinstance(chunk, np.ndarray):
            out.extend(chunk.reshape(-1).tolist())
        else:
            out.extend(chunk)
    return out
