"""The README's quickstart runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_written(tmp_path: Path):
    """The first Python block under '## Quickstart' trains and writes candidates."""
    section = README.read_text().split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # A fresh process as a user would start it: no W&B settings left by earlier tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DATA_DIR=str(tmp_path / "data"))
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (epoch_dir,) = tmp_path.glob("quickstart/*/labelwatch/epoch=1")
    samples = pd.read_parquet(epoch_dir / "samples.parquet")
    assert len(samples) == 512 and samples["x"].notna().all()
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
