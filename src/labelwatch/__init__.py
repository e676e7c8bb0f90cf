"""labelwatch: find label errors in your validation set while you train."""

from __future__ import annotations

from labelwatch.callback import LabelWatch
from labelwatch.candidates import load_candidates
from labelwatch.scoring import score_predictions

__all__ = ["LabelWatch", "load_candidates", "score_predictions"]
__version__ = "0.1.0"
