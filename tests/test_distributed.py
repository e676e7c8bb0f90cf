"""DDP with 2 CPU processes gives the same rows, scores and candidates as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from labelwatch import LabelWatch
from tests.helpers import BlobDataset, TinyClassifier, trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
NUM_VAL = 45  # odd: DistributedSampler pads one repeated sample onto rank 1


def _fit(
    out: Path, string_ids: bool, callback_args: dict | None = None, **trainer_overrides
) -> None:
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.0)  # weights stay put: every run scores the same model
    train = DataLoader(BlobDataset(32, seed=1), batch_size=16)
    val = DataLoader(BlobDataset(NUM_VAL, seed=2, flip=6, string_ids=string_ids), batch_size=8)
    callback = LabelWatch(
        dirpath=out, projection="none", metadata_keys=["path"], **(callback_args or {})
    )
    kwargs = trainer_kwargs(out, callbacks=[callback], max_epochs=1, **trainer_overrides)
    Trainer(**kwargs).fit(model, train, val)


def _assert_same_results(single: Path, distributed: Path) -> None:
    a = pd.read_parquet(single / "epoch=0/samples.parquet").sort_values("sample_id")
    b = pd.read_parquet(distributed / "epoch=0/samples.parquet").sort_values("sample_id")
    assert len(b) == NUM_VAL and b["sample_id"].is_unique
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    exact = ["sample_id", "given_label", "predicted_label", "is_confident_mismatch", "path"]
    pd.testing.assert_frame_equal(a[exact], b[exact])
    for column in ("confidence", "self_confidence", "margin", "entropy", "label_quality"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-5, atol=1e-6)
    ca = pd.read_parquet(single / "epoch=0/candidates.parquet")
    cb = pd.read_parquet(distributed / "epoch=0/candidates.parquet")
    assert len(ca) > 0
    assert sorted(ca["sample_id"]) == sorted(cb["sample_id"])


SCRIPT = """
import json
import sys
from pathlib import Path
from tests.test_distributed import _fit

if __name__ == "__main__":  # ddp_spawn's workers import this script again
    out, string_ids, callback_args, strategy = sys.argv[1:]
    _fit(Path(out), string_ids=string_ids == "1", callback_args=json.loads(callback_args),
         strategy=strategy, devices=2)
"""


def _fit_in_a_script(
    tmp_path: Path, out: Path, strategy: str, string_ids: bool, callback_args: dict
) -> None:
    """Run `_fit` with 2 processes from a fresh Python script, as users launch DDP. A fresh
    process also keeps the ranks clear of state that earlier tests leave in pytest's: with
    ddp_spawn from inside pytest, a rank aborted at exit now and then (C++ "terminate
    called without an active exception") after the whole suite, never when run alone."""
    script = tmp_path / "train_ddp.py"
    script.write_text(textwrap.dedent(SCRIPT))
    # Keep the caller's PYTHONPATH after the repository root: it may pick the labelwatch
    # under test (a checkout other than the installed one).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    arguments = [str(out), "1" if string_ids else "0", json.dumps(callback_args), strategy]
    result = subprocess.run(
        [sys.executable, str(script), *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "callback_args", [{}, {"logits_dtype": "float16", "embeddings_dtype": "float16"}]
)
def test_ddp_spawn_equals_a_single_process(tmp_path: Path, callback_args: dict):
    """ddp_spawn on 2 CPU processes: same samples (padding dropped), scores and candidates;
    float16 logits and embeddings are gathered as float16."""
    _fit(tmp_path / "single", string_ids=False, callback_args=callback_args)
    _fit_in_a_script(tmp_path, tmp_path / "ddp", "ddp_spawn", False, callback_args)
    _assert_same_results(tmp_path / "single", tmp_path / "ddp")


def test_ddp_launched_from_a_script_equals_a_single_process(tmp_path: Path):
    """strategy='ddp' from a script (Lightning re-launches it): string ids, same results."""
    _fit_in_a_script(tmp_path, tmp_path / "ddp", "ddp", True, {})
    _fit(tmp_path / "single", string_ids=True)
    _assert_same_results(tmp_path / "single", tmp_path / "ddp")


class NoIds(BlobDataset):
    """Blobs without a sample_id (module level, so ddp_spawn can pickle it)."""

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        del item["sample_id"]
        return item


def test_ddp_without_sample_ids_is_a_clear_error(tmp_path: Path):
    """Under DDP the running position is meaningless: missing ids stop the run."""

    torch.manual_seed(0)
    val = DataLoader(NoIds(20), batch_size=8)
    train = DataLoader(BlobDataset(16), batch_size=8)
    trainer = Trainer(
        **trainer_kwargs(
            tmp_path,
            callbacks=[LabelWatch(projection="none")],
            max_epochs=1,
            strategy="ddp_spawn",
            devices=2,
        )
    )
    with pytest.raises(Exception, match="needs sample ids under DDP"):
        trainer.fit(TinyClassifier(), train, val)
