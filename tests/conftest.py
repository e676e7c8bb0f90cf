"""Shared fixtures: W&B offline, writing only under the test session's temporary folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _wandb_offline(tmp_path_factory: pytest.TempPathFactory):
    """Keep W&B offline and its caches and artifact staging out of the home folder."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "WANDB_DATA_DIR": str(home / "data"),
            "WANDB_CACHE_DIR": str(home / "cache"),
            "WANDB_CONFIG_DIR": str(home / "config"),
            "WANDB_ARTIFACT_DIR": str(home / "artifacts"),
        }.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(autouse=True)
def _finish_wandb_run():
    """Close any W&B run a test opened, so the next test starts clean."""
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()
