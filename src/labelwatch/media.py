"""Ready-made ``media_fn`` callables: turn a row's file path into W&B media.

``LabelWatch(media_fn=AudioFromPath(root="data/audio"), metadata_keys=["path"])`` puts a
playable ``wandb.Audio`` in the table for every candidate (and for up to
``max_media_rows`` other rows); ``ImageFromPath`` does the same with ``wandb.Image``.
Any callable ``row -> wandb media | None`` works the same way.
"""

from __future__ import annotations

import importlib.util
import os
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
        """The row's file under ``root``; None when missing or when it would escape ``root``.
        The path is normalised as written, symlinks unresolved: a dataset whose files link
        into a blob store (the Hugging Face cache, DVC, git-annex) keeps its names."""
        value = row.get(self.key)
        if not value:
            return None
        root = Path(os.path.abspath(self.root))
        path = Path(os.path.normpath(root / str(value)))
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
    """``row[key]`` is an audio file under ``root``; gives ``wandb.Audio``.

    ``wandb.Audio`` copies a file without decoding it: the header of a file that soundfile
    reads (wav, flac, ogg, mp3, ...; when installed) is read here first, so that an
    unreadable or empty one leaves its cell empty with a warning, not an unplayable clip.
    Other formats (m4a, say) go to W&B as they are."""

    media_type = "Audio"

    def __call__(self, row: Mapping[str, Any]) -> Any:
        path = self.resolve(row)
        if path is not None and path.suffix[1:].upper() in _soundfile_formats():
            import soundfile

            if soundfile.info(str(path)).frames == 0:  # raises when it is not audio
                raise ValueError(f"{path} holds no audio frames")
        return super().__call__(row)


def _soundfile_formats() -> set[str]:
    if importlib.util.find_spec("soundfile") is None:
        return set()
    import soundfile

    return set(soundfile.available_formats())


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
