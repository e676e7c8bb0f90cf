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

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from examples.urban_sounds.data import UrbanSoundDataModule
from examples.urban_sounds.model import UrbanSoundClassifier

__all__ = ["UrbanSoundCLI", "main"]


class UrbanSoundCLI(LightningCLI):
    """LightningCLI for the example: the model takes the data's sample rate."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.sample_rate", "model.sample_rate")


def main(args: Sequence[str] | None = None, *, run: bool = True) -> UrbanSoundCLI:
    """Run the CLI with ``args`` (default: the command line) and return it."""
    return UrbanSoundCLI(
        UrbanSoundClassifier,
        UrbanSoundDataModule,
        args=list(args) if args is not None else None,
        run=run,
        # Reruns write into the same logger folder: replace the saved config.yaml.
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
