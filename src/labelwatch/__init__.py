"""labelwatch: find label errors in your validation set while you train."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labelwatch.callback import LabelWatch
    from labelwatch.candidates import load_candidates
    from labelwatch.scoring import score_predictions

__all__ = ["LabelWatch", "load_candidates", "score_predictions"]
__version__ = "0.1.0"

# Imported on first use: the map worker process imports `labelwatch.projection`, which
# must not pay seconds of CPU for Lightning and W&B while training shares the cores.
_HOMES = {
    "LabelWatch": "labelwatch.callback",
    "load_candidates": "labelwatch.candidates",
    "score_predictions": "labelwatch.scoring",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'labelwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
