"""The W&B tables LabelWatch builds: the same column types and rows as wandb.Table's own."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import wandb

from labelwatch.sinks.wandb import _table


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": [3, 1, 2, 0],
            "given_label": ["dog_bark", "siren", "siren", "dog_bark"],
            "entropy": [0.1, np.nan, 0.3, 0.4],  # a missing float in the middle
            "is_candidate": [False, True, False, True],
            "x": [np.nan, np.nan, 0.5, -1.0],  # missing first, then present
            "path": ["a.wav", None, "c.wav", "d.wav"],
        }
    )


def test_types_and_rows_equal_those_of_wandb_table():
    """Types learnt from a few example rows equal those wandb infers row by row."""
    frame = _frame()
    audio = wandb.Audio(np.zeros(1600, dtype=np.float32), sample_rate=16000)
    media = {1: audio, 0: audio}  # rows 0 and 2 have none
    fast = _table(frame, media)
    rows = [list(row) for row in fast.data]
    reference = wandb.Table(columns=fast.columns, data=rows)
    assert fast.columns == [*frame.columns, "media"]
    assert repr(fast._column_types) == repr(reference._column_types)
    assert "Audio" in repr(fast._column_types) and "Number" in repr(fast._column_types)
    assert fast.data == reference.data and len(fast.data) == len(frame)
    assert fast.data[1][2] is None and fast.data[1][-1] is audio and fast.data[0][-1] is None


def test_a_column_of_mixed_types_is_refused_as_wandb_refuses_it():
    frame = _frame().assign(path=["a.wav", 7, "c.wav", "d.wav"])
    with pytest.raises(TypeError, match="incompatible types"):
        _table(frame, None)
