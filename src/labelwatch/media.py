"""Ready-made ``media_fn`` callables: turn a row's file path into W&B media.

``LabelWatch(media_fn=AudioFromPath(root="data/audio"), metadata_keys=["path"])`` puts a
playable ``wandb.Audio`` in the table for every candidate (and for up to
``max_media_rows`` other rows); ``ImageFromPath`` does the same with ``wandb.Image``.
Any callable ``row -> wandb media | None`` works the same way.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["AudioFromPath", "ImageFromPath"]


class _FromPath:
    media_type = ""

    def __init__(self, root: str | Path = ".", key: str = "path") -> None:
        self.root = Path(root)
        self.key = key

    def resolve(self, row: Mapping[str, Any]) -> Path | None:
        """The row's file under ``root``; None when missing or when it would escape ``root``."""
        value = row.get(self.key)
        if not value:
            return None
        root = self.root.resolve()
        path = (root / str(value)).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path

    def caption(self, row: Mapping[str, Any]) -> str:
        given, suggested = row.get("given_name"), row.get("suggested_name")
        caption = f"{row.get('sample_id')}: labelled {given}"
        if suggested is not None and suggested != given:
            # the model's argmax, the neighbours' or a watched class's guess
            caption += f", suggested {suggested}"
        return caption

    def __call__(self, row: Mapping[str, Any]) -> Any:
        path = self.resolve(row)
        if path is None:
            return None
        import wandb

        return getattr(wandb, self.media_type)(str(path), caption=self.caption(row))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, key={self.key!r})"


class AudioFromPath(_FromPath):
    """``row[key]`` is an audio file under ``root``; gives ``wandb.Audio``."""

    media_type = "Audio"


class ImageFromPath(_FromPath):
    """``row[key]`` is an image file under ``root``; gives ``wandb.Image`` (needs Pillow)."""

    media_type = "Image"

    def __init__(self, root: str | Path = ".", key: str = "path") -> None:
        # wandb.Image reads files with Pillow: without it every epoch's table would fail.
        if importlib.util.find_spec("PIL") is None:
            raise ImportError(
                "ImageFromPath needs Pillow to read images: pip install 'labelwatch[images]'"
                " (or pip install pillow)."
            )
        super().__init__(root, key)
