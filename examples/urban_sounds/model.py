"""A small log-mel CNN for UrbanSound8K that trains on a CPU in a few minutes.

waveform -> log-mel spectrogram (torchaudio, on the module's device, normalised per
clip) -> four conv blocks -> global pooling -> ``embedding`` (the penultimate layer,
``(B, embedding_dim)``) -> ``classifier`` (logits). ``validation_step`` returns
``{"logits", "embeddings"}`` for LabelWatch; batches are the dicts of
:mod:`examples.urban_sounds.data`.
"""

from __future__ import annotations

from typing import Any

import torch
import torchaudio
from lightning.pytorch import LightningModule
from torch import nn
from torch.nn import functional as F

__all__ = ["LogMel", "UrbanSoundClassifier"]


class LogMel(nn.Module):
    """``(B, T)`` waveforms -> ``(B, 1, n_mels, frames)`` log-mel, zero mean / unit std per clip."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> None:
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels
        )
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80.0)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        spec = self.to_db(self.mel(waveform)).unsqueeze(1)
        mean = spec.mean(dim=(2, 3), keepdim=True)
        std = spec.std(dim=(2, 3), keepdim=True)
        return (spec - mean) / (std + 1e-5)


def _block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class UrbanSoundClassifier(LightningModule):
    """Log-mel CNN classifier; ``embedding`` is the layer LabelWatch maps.

    Args:
        num_classes: number of classes (10 for UrbanSound8K).
        sample_rate: sample rate of the input waveforms in Hz.
        n_fft, hop_length, n_mels: log-mel settings.
        channels: output channels of the conv blocks (each halves time and frequency).
        embedding_dim: width of the penultimate layer (the embeddings).
        dropout: dropout before the classifier.
        lr, weight_decay: AdamW settings; the learning rate follows a one-cycle schedule.
        augment: random gain and time shift on training batches.
    """

    def __init__(
        self,
        num_classes: int = 10,
        sample_rate: int = 16000,
        n_fft: int = 1024,
        hop_length: int = 512,
        n_mels: int = 64,
        channels: list[int] = [16, 32, 64, 128],  # noqa: B006 - shown as the default by LightningCLI
        embedding_dim: int = 96,
        dropout: float = 0.2,
        lr: float = 3e-3,
        weight_decay: float = 1e-2,
        augment: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = LogMel(sample_rate, n_fft, hop_length, n_mels)
        widths = zip([1, *channels[:-1]], channels, strict=True)
        self.encoder = nn.Sequential(*(_block(a, b) for a, b in widths))
        self.embedding = nn.Sequential(nn.Linear(2 * channels[-1], embedding_dim), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` waveforms -> ``(B, embedding_dim)`` embeddings."""
        hidden = self.encoder(self.features(waveform))
        # Mean and max over frequency and time: steady sounds and short events.
        pooled = torch.cat([hidden.mean(dim=(2, 3)), hidden.amax(dim=(2, 3))], dim=1)
        return self.embedding(pooled)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.embed(waveform)))

    def _augment(self, waveform: torch.Tensor) -> torch.Tensor:
        batch, length = waveform.shape
        gain_db = torch.empty(batch, 1, device=waveform.device).uniform_(-6.0, 6.0)
        waveform = waveform * 10 ** (gain_db / 20)
        # A random circular shift of up to half the clip, the same for the whole batch.
        shift = int(torch.randint(-length // 2, length // 2 + 1, ()).item())
        return torch.roll(waveform, shifts=shift, dims=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        waveform = batch["waveform"]
        if self.hparams.augment:
            waveform = self._augment(waveform)
        logits = self(waveform)
        loss = F.cross_entropy(logits, batch["target"])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        embeddings = self.embed(batch["waveform"])
        logits = self.classifier(embeddings)
        target = batch["target"]
        size = len(logits)
        self.log("val_loss", F.cross_entropy(logits, target), prog_bar=True, batch_size=size)
        accuracy = (logits.argmax(dim=1) == target).float().mean()
        self.log("val_acc", accuracy, prog_bar=True, batch_size=size)
        return {"logits": logits, "embeddings": embeddings}

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=self.hparams.lr,
            # each phase needs steps of its own: a run of a few batches (--num-clips 200
            # --max-epochs 1) gets a schedule longer than it, which it stops partway through
            total_steps=max(int(self.trainer.estimated_stepping_batches), 10),
            pct_start=0.2,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
