"""Per-epoch accumulation of what LabelWatch needs from each validation batch.

Batches are kept as detached tensors on the model's device and concatenated once at
epoch end, so capturing adds no host synchronisation to the validation loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["CapturedEpoch", "EpochBuffer", "LayerTap", "find_submodule"]


@dataclass
class CapturedEpoch:
    """One epoch's captured validation data, on the host, logits in float32."""

    logits: torch.Tensor
    targets: torch.Tensor
    sample_ids: list[Any]
    embeddings: np.ndarray | None
    metadata: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.targets)


class EpochBuffer:
    """Collects logits, targets, ids, optional embeddings and metadata batch by batch."""

    def __init__(self) -> None:
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._ids: list[Any] = []
        self._embeddings: list[torch.Tensor] = []
        self._metadata: dict[str, list[Any]] = {}
        self.num_samples = 0

    def add(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        sample_ids: Any | None,
        embeddings: torch.Tensor | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one batch; shapes are checked here, values only at epoch end."""
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(
                f"LabelWatch expects logits of shape (batch, num_classes), got {shape}. Return"
                " the classifier's 2-D output as `logits`, or set `logits_layer` to the head."
            )
        batch_size = logits.shape[0]
        targets = torch.as_tensor(targets)
        if targets.ndim != 1 or targets.dtype.is_floating_point:
            raise ValueError(
                "LabelWatch expects targets as a 1-D tensor of class indices, got dtype"
                f" {targets.dtype} and shape {tuple(targets.shape)}. One-hot or soft targets:"
                " return `target=y.argmax(1)` from validation_step."
            )
        _check_length("targets", len(targets), batch_size)
        if sample_ids is None:
            sample_ids = torch.arange(self.num_samples, self.num_samples + batch_size)
        elif isinstance(sample_ids, torch.Tensor):
            sample_ids = sample_ids.reshape(-1)
        elif isinstance(sample_ids, np.ndarray) or not isinstance(sample_ids, Sequence):
            sample_ids = list(np.asarray(sample_ids).reshape(-1).tolist())
        _check_length("sample ids", len(sample_ids), batch_size)
        self._ids.append(
            sample_ids.detach() if isinstance(sample_ids, torch.Tensor) else sample_ids
        )
        self._logits.append(logits.detach())
        self._targets.append(targets.detach())
        if embeddings is not None:
            _check_length("embeddings", embeddings.shape[0], batch_size)
            self._embeddings.append(embeddings.detach().reshape(batch_size, -1))
        for key, value in (metadata or {}).items():
            _check_length(f"metadata {key!r}", len(value), batch_size)
            self._metadata.setdefault(key, []).append(value)
        self.num_samples += batch_size

    def collect(self) -> CapturedEpoch | None:
        """Concatenate everything once and move it to the host; None when nothing was seen."""
        if not self._logits:
            return None
        logits = torch.cat(self._logits).float().cpu()
        targets = torch.cat([t.to(self._targets[0].device) for t in self._targets]).long().cpu()
        embeddings = None
        if self._embeddings:
            if len(self._embeddings) != len(self._logits):
                raise ValueError(
                    "Embeddings were found for some validation batches but not others; return"
                    " `embeddings` from every validation_step or set `embedding_layer`."
                )
            embeddings = torch.cat(self._embeddings).float().cpu().numpy()
        metadata = {key: _flatten(chunks) for key, chunks in self._metadata.items()}
        return CapturedEpoch(logits, targets, _flatten(self._ids), embeddings, metadata)


class LayerTap:
    """Forward hook that keeps the latest output of one submodule while active."""

    def __init__(self, module: nn.Module) -> None:
        self.output: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, (tuple, list)):
            output = output[0]
        self.output = output.detach() if isinstance(output, torch.Tensor) else None

    def pop(self) -> torch.Tensor | None:
        """Return the output seen since the last call, and forget it."""
        output, self.output = self.output, None
        return output

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
