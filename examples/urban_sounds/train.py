"""Train the urban-sounds classifier with LabelWatch, configured by a LightningCLI YAML file.

Usage::

    python -m examples.urban_sounds.train fit --config configs/urban_sounds.yaml
    python -m examples.urban_sounds.train fit --config configs/urban_sounds.yaml \\
        --trainer.max_epochs 3 --data.root data/urban_sounds

The data module's ``sample_rate`` is linked to the model's, so it is set once, under
``data``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from examples.urban_sounds.data import UrbanSoundDataModule
from examples.urban_sounds.model import UrbanSoundClassifier

__all__ = ["UrbanSoundCLI", "main"]


class UrbanSoundCLI(LightningCLI):
    """LightningCLI for the example: the model takes the data's sample rate."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.sample_rate", "model.sample_rate")


class SaveConfigWithTheRun(SaveConfigCallback):
    """Also save config.yaml in the W&B run's own folder (beside its labelwatch/ outputs):
    every run shares the logger's save_dir, where each rerun replaces the file."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = trainer.logger
        if isinstance(logger, WandbLogger):
            folder = Path(logger.save_dir or trainer.default_root_dir, logger.name, logger.version)
            folder.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config, folder / self.config_filename, skip_none=False, overwrite=True
            )


def main(args: Sequence[str] | None = None, *, run: bool = True) -> UrbanSoundCLI:
    """Run the CLI with ``args`` (default: the command line) and return it."""
    return UrbanSoundCLI(
        UrbanSoundClassifier,
        UrbanSoundDataModule,
        args=list(args) if args is not None else None,
        run=run,
        # Reruns share the logger's save_dir: replace its config.yaml there, and keep each
        # run's own in the run's folder.
        save_config_callback=SaveConfigWithTheRun,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
