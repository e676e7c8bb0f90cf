"""Where results go: local files always, W&B when the Trainer has a WandbLogger."""

from __future__ import annotations

from labelwatch.sinks.local import LocalSink
from labelwatch.sinks.wandb import WandbSink, find_wandb_logger

__all__ = ["LocalSink", "WandbSink", "find_wandb_logger"]
