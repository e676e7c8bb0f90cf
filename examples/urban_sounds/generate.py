"""Deterministic synthetic stand-in for UrbanSound8K, with known label errors.

Nothing can be downloaded where the examples run, so the urban-sounds example makes its
own data: the ten UrbanSound8K classes synthesised with numpy and written in the
UrbanSound8K layout::

    ROOT/audio/fold<k>/<fsID>-<classID>-0-<slice>.wav   mono PCM_16, 16 kHz by default
    ROOT/metadata/UrbanSound8K.csv                      the annotated labels
    ROOT/metadata/ground_truth.csv                      true labels, corruption, sirens

A share ``noise_rate`` of the clips carries a corrupted annotation, mostly a flip to a
class that sounds alike (drilling and jackhammer, car horn and siren, ...). Another
share ``mixture_rate`` holds a quieter background event of another class and is labelled
only with the foreground class, as annotators often do; sirens under dog barks are
common among them. ``classID``/``class`` in ``UrbanSound8K.csv`` (and the class ID in the
file name) are the annotated labels; ``ground_truth.csv`` says what is really in each
clip. The same arguments give byte-identical files, with or without worker processes.

Usage::

    python -m examples.urban_sounds.generate data/urban_sounds --num-clips 3000 --seed 0
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

__all__ = [
    "CLASS_NAMES",
    "CONFUSABLE",
    "GROUND_TRUTH_COLUMNS",
    "METADATA_COLUMNS",
    "SIREN",
    "generate",
    "main",
]

# UrbanSound8K class IDs are the positions in this list.
CLASS_NAMES = [
    "air_conditioner",
    "car_horn",
    "children_playing",
    "dog_bark",
    "drilling",
    "engine_idling",
    "gun_shot",
    "jackhammer",
    "siren",
    "street_music",
]
NUM_CLASSES = len(CLASS_NAMES)
SIREN = CLASS_NAMES.index("siren")
DOG_BARK = CLASS_NAMES.index("dog_bark")

# Pairs that people (and models) confuse; most corrupted labels flip within a pair.
_PAIRS = [
    ("drilling", "jackhammer"),
    ("engine_idling", "air_conditioner"),
    ("car_horn", "siren"),
    ("children_playing", "street_music"),
    ("dog_bark", "gun_shot"),
]
CONFUSABLE = {CLASS_NAMES.index(a): CLASS_NAMES.index(b) for a, b in _PAIRS} | {
    CLASS_NAMES.index(b): CLASS_NAMES.index(a) for a, b in _PAIRS
}

METADATA_COLUMNS = [
    "slice_file_name",
    "fsID",
    "start",
    "end",
    "salience",
    "fold",
    "classID",
    "class",
]
GROUND_TRUTH_COLUMNS = [
    "slice_file_name",
    "true_classID",
    "true_class",
    "annotated_classID",
    "annotated_class",
    "is_corrupted",
    "contains_siren",
    "background_classID",
]

_CONFUSABLE_SHARE = 0.75  # of corrupted labels; the rest flip uniformly
_SIREN_UNDER_DOG_SHARE = 0.5  # of the dog_bark clips that get a background event
_SALIENCE_SNR_DB = 10.0  # below this SNR the labelled event counts as background (2)
_MARKER = ".labelwatch-synthetic"


# --------------------------------------------------------------------------- public API


def generate(
    root: str | Path,
    *,
    num_clips: int = 3000,
    seed: int = 0,
    noise_rate: float = 0.08,
    clip_seconds: float = 2.0,
    sample_rate: int = 16000,
    folds: int = 10,
    mixture_rate: float = 0.15,
    workers: int = 1,
) -> Path:
    """Write a synthetic UrbanSound8K-like data set under ``root`` and return its path.

    Args:
        root: output folder; created if missing. A folder this function made before is
            replaced; one holding other audio is refused.
        num_clips: number of clips, at least one per class; classes are balanced.
        seed: non-negative integer; the same arguments give byte-identical files.
        noise_rate: share of clips whose annotated label is corrupted, in [0, 1).
        clip_seconds: length of every WAV file in seconds, in [0.25, 30]; the labelled
            event may be shorter and is padded with background noise.
        sample_rate: samples per second, in [8000, 48000].
        folds: number of cross-validation folds, in [1, num_clips]; assigned
            round-robin within each class so folds stay balanced.
        mixture_rate: share of clips (per class) with a quieter background event of
            another class, in [0, 1].
        workers: processes that render the audio; the output does not depend on it.
            More than one starts processes with ``spawn`` (safe after torch started
            threads), so the calling script needs an ``if __name__ == "__main__":`` guard.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        ValueError: an argument is out of range.
        FileExistsError: ``root/audio`` holds files this function did not write.
    """
    _validate(num_clips, seed, noise_rate, clip_seconds, sample_rate, folds, mixture_rate)
    if _not_int(workers) or workers < 1:
        raise ValueError(f"`workers` must be an integer >= 1, got {workers!r}")
    root = Path(root)
    _prepare_root(root)

    # One stream plans the data set; every clip gets its own child seed, so clips render
    # identically in any process and any order.
    seq = np.random.SeedSequence(seed)
    plan_seq, clips_seq = seq.spawn(2)
    plan = _plan(
        np.random.default_rng(plan_seq),
        num_clips=num_clips,
        noise_rate=noise_rate,
        clip_seconds=clip_seconds,
        sample_rate=sample_rate,
        folds=folds,
        mixture_rate=mixture_rate,
    )
    jobs = [
        _Job(
            path=str(root / "audio" / f"fold{fold}" / name),
            true_class=int(true_class),
            background_class=int(background),
            event_samples=int(samples),
            snr_db=float(snr),
            clip_samples=round(clip_seconds * sample_rate),
            sample_rate=sample_rate,
            seed=child,
        )
        for name, fold, true_class, background, samples, snr, child in zip(
            plan["slice_file_name"],
            plan["fold"],
            plan["true_classID"],
            plan["background_classID"],
            plan["event_samples"],
            plan["snr_db"],
            clips_seq.spawn(num_clips),
            strict=True,
        )
    ]
    for fold in range(1, folds + 1):
        (root / "audio" / f"fold{fold}").mkdir(parents=True, exist_ok=True)
    if workers == 1:
        for job in jobs:
            _render(job)
    else:
        # spawn, not fork: callers may have started threads (torch) before calling us.
        chunk = max(1, min(64, len(jobs) // (4 * workers)))
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for _ in pool.map(_render, jobs, chunksize=chunk):
                pass

    # The metadata goes last so that its presence means the audio is complete.
    plan = plan.sort_values(["fsID", "slice"], kind="stable").reset_index(drop=True)
    _write_csv(plan[GROUND_TRUTH_COLUMNS], root / "metadata" / "ground_truth.csv")
    _write_csv(plan[METADATA_COLUMNS], root / "metadata" / "UrbanSound8K.csv")
    return root


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m examples.urban_sounds.generate ROOT [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.urban_sounds.generate",
        description="Write a synthetic UrbanSound8K-like data set with known label errors.",
    )
    parser.add_argument("root", type=Path, help="output folder")
    parser.add_argument("--num-clips", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-rate", type=float, default=0.08)
    parser.add_argument("--mixture-rate", type=float, default=0.15)
    parser.add_argument("--clip-seconds", type=float, default=2.0)
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="default: %(default)s"
    )
    args = parser.parse_args(argv)
    began = time.perf_counter()
    try:
        root = generate(
            args.root,
            num_clips=args.num_clips,
            seed=args.seed,
            noise_rate=args.noise_rate,
            clip_seconds=args.clip_seconds,
            sample_rate=args.sample_rate,
            folds=args.folds,
            mixture_rate=args.mixture_rate,
            workers=args.workers,
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    truth = pd.read_csv(root / "metadata" / "ground_truth.csv")
    print(
        f"wrote {len(truth)} clips to {root} in {time.perf_counter() - began:.1f} s: "
        f"{int(truth['is_corrupted'].sum())} corrupted labels, "
        f"{int((truth['background_classID'] >= 0).sum())} mixtures, "
        f"{int(truth['contains_siren'].sum())} clips with a siren"
    )


# --------------------------------------------------------------------- checks and files


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, np.integer))


def _not_number(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))


def _validate(
    num_clips: int,
    seed: int,
    noise_rate: float,
    clip_seconds: float,
    sample_rate: int,
    folds: int,
    mixture_rate: float,
) -> None:
    if _not_int(num_clips) or num_clips < NUM_CLASSES:
        raise ValueError(
            f"`num_clips` must be an integer >= {NUM_CLASSES} (one clip per class), "
            f"got {num_clips!r}"
        )
    if _not_int(seed) or seed < 0:
        raise ValueError(f"`seed` must be an integer >= 0, got {seed!r}")
    if _not_number(noise_rate) or not 0.0 <= noise_rate < 1.0:
        raise ValueError(f"`noise_rate` must be a number in [0, 1), got {noise_rate!r}")
    if _not_number(mixture_rate) or not 0.0 <= mixture_rate <= 1.0:
        raise ValueError(f"`mixture_rate` must be a number in [0, 1], got {mixture_rate!r}")
    if _not_number(clip_seconds) or not 0.25 <= clip_seconds <= 30.0:
        raise ValueError(f"`clip_seconds` must be a number in [0.25, 30], got {clip_seconds!r}")
    if _not_int(sample_rate) or not 8000 <= sample_rate <= 48000:
        raise ValueError(f"`sample_rate` must be an integer in [8000, 48000], got {sample_rate!r}")
    if _not_int(folds) or not 1 <= folds <= num_clips:
        raise ValueError(f"`folds` must be an integer in [1, num_clips={num_clips}], got {folds!r}")


def _prepare_root(root: Path) -> None:
    """Make ``root`` ready for a fresh data set without deleting anyone else's audio."""
    audio = root / "audio"
    ours = (root / _MARKER).exists()
    if audio.exists() and not ours and any(audio.iterdir()):
        raise FileExistsError(
            f"{audio} already holds files that this generator did not write; choose an empty `root`"
        )
    # Metadata first: its presence must never describe audio that is half replaced.
    for name in ("UrbanSound8K.csv", "ground_truth.csv"):
        (root / "metadata" / name).unlink(missing_ok=True)
    if ours:
        shutil.rmtree(audio, ignore_errors=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    (root / _MARKER).write_text("written by examples.urban_sounds.generate\n")


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ planning


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _plan(
    rng: np.random.Generator,
    *,
    num_clips: int,
    noise_rate: float,
    clip_seconds: float,
    sample_rate: int,
    folds: int,
    mixture_rate: float,
) -> pd.DataFrame:
    """Decide labels, folds, names, durations and mixtures of every clip (no audio)."""
    per_class = [
        num_clips // NUM_CLASSES + (c < num_clips % NUM_CLASSES) for c in range(NUM_CLASSES)
    ]
    true = np.repeat(np.arange(NUM_CLASSES), per_class)
    # Round-robin over the class-sorted clips: within a class consecutive clips go to
    # consecutive folds, and fold sizes differ by at most one overall.
    fold = np.arange(num_clips) % folds + 1

    background = np.full(num_clips, -1)
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(true == c)
        chosen = rng.permutation(members)[: _round_half_up(mixture_rate * len(members))]
        others = np.array([o for o in range(NUM_CLASSES) if o != c])
        if c == DOG_BARK:
            # The founding story: a siren behind a dog bark, labelled only dog_bark.
            sirens = math.ceil(_SIREN_UNDER_DOG_SHARE * len(chosen))
            background[chosen[:sirens]] = SIREN
            rest = others[others != SIREN]
            background[chosen[sirens:]] = rng.choice(rest, len(chosen) - sirens)
        else:
            background[chosen] = rng.choice(others, len(chosen))

    annotated = true.copy()
    corrupted = rng.permutation(num_clips)[: _round_half_up(noise_rate * num_clips)]
    for i in np.sort(corrupted):
        if rng.random() < _CONFUSABLE_SHARE:
            annotated[i] = CONFUSABLE[int(true[i])]
        else:
            annotated[i] = rng.choice([o for o in range(NUM_CLASSES) if o != true[i]])

    # Short events (a horn, a bark, a shot) often leave most of the clip to background.
    clip_samples = round(clip_seconds * sample_rate)
    impulsive = np.isin(true, [CLASS_NAMES.index(n) for n in ("car_horn", "dog_bark", "gun_shot")])
    share = np.where(impulsive, rng.uniform(0.3, 1.0, num_clips), rng.uniform(0.4, 1.0, num_clips))
    share = np.where(~impulsive & (rng.random(num_clips) < 0.5), 1.0, share)
    event_samples = np.maximum(np.round(share * clip_samples).astype(int), 1)
    snr_db = np.round(rng.uniform(3.0, 30.0, num_clips), 2)

    # Slices of one freesound recording share its fsID and (as in UrbanSound8K) a fold.
    fs_id = np.zeros(num_clips, dtype=int)
    slice_id = np.zeros(num_clips, dtype=int)
    start = np.zeros(num_clips)
    recordings: list[np.ndarray] = []
    for c in range(NUM_CLASSES):
        for k in range(1, folds + 1):
            members = np.flatnonzero((true == c) & (fold == k))
            while len(members):
                take = int(rng.integers(1, 5))
                recordings.append(members[:take])
                members = members[take:]
    ids = 1000 + rng.choice(max(200_000, 10 * num_clips), len(recordings), replace=False)
    for rec_id, members in zip(ids, recordings, strict=True):
        cursor = float(rng.uniform(0.0, 60.0))
        for position, i in enumerate(members):
            fs_id[i], slice_id[i], start[i] = rec_id, position, round(cursor, 3)
            cursor = start[i] + event_samples[i] / sample_rate + float(rng.uniform(0.0, 3.0))
    end = np.round(start + event_samples / sample_rate, 6)

    names = [f"{f}-{a}-0-{s}.wav" for f, a, s in zip(fs_id, annotated, slice_id, strict=True)]
    return pd.DataFrame(
        {
            "slice_file_name": names,
            "fsID": fs_id,
            "start": start,
            "end": end,
            "salience": np.where(snr_db >= _SALIENCE_SNR_DB, 1, 2),
            "fold": fold,
            "classID": annotated,
            "class": [CLASS_NAMES[a] for a in annotated],
            "true_classID": true,
            "true_class": [CLASS_NAMES[t] for t in true],
            "annotated_classID": annotated,
            "annotated_class": [CLASS_NAMES[a] for a in annotated],
            "is_corrupted": annotated != true,
            "contains_siren": (true == SIREN) | (background == SIREN),
            "background_classID": background,
            "slice": slice_id,
            "event_samples": event_samples,
            "snr_db": snr_db,
        }
    )


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Job:
    path: str
    true_class: int
    background_class: int
    event_samples: int
    snr_db: float
    clip_samples: int
    sample_rate: int
    seed: np.random.SeedSequence


def _render(job: _Job) -> None:
    """Synthesise one clip from its own seed and write it as a PCM_16 WAV."""
    rng = np.random.default_rng(job.seed)
    sr, n = job.sample_rate, job.clip_samples
    clip = np.zeros(n)

    event = _fade(_SYNTHS[job.true_class](rng, job.event_samples, sr), sr)
    onset = int(rng.integers(0, n - len(event) + 1))
    clip[onset : onset + len(event)] += event / _level(event, sr)

    if job.background_class >= 0:
        length = max(int(n * rng.uniform(0.4, 1.0)), 1)
        other = _fade(_SYNTHS[job.background_class](rng, length, sr), sr)
        gain = 10 ** (-rng.uniform(4.0, 12.0) / 20) / _level(other, sr)
        at = int(rng.integers(0, n - length + 1))
        clip[at : at + length] += gain * other

    clip += 10 ** (-job.snr_db / 20) * _ambience(rng, n, sr)
    # Peak-normalised (never clips), at a random loudness.
    clip *= rng.uniform(0.3, 0.95) / max(float(np.max(np.abs(clip))), 1e-12)
    sf.write(job.path, clip, sr, subtype="PCM_16", format="WAV")


# ------------------------------------------------------------------------ signal helpers


def _time(n: int, sr: int) -> np.ndarray:
    return np.arange(n) / sr


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x))) + 1e-12


def _level(x: np.ndarray, sr: int) -> float:
    """RMS of the loudest quarter of 20 ms frames, so sparse events are not underrated."""
    frame = max(int(0.02 * sr), 1)
    usable = len(x) // frame * frame
    if usable == 0:
        return _rms(x)
    power = np.mean(x[:usable].reshape(-1, frame) ** 2, axis=1)
    top = np.sort(power)[-max(len(power) // 4, 1) :]
    return float(np.sqrt(np.mean(top))) + 1e-12


def _fade(x: np.ndarray, sr: int, seconds: float = 0.005) -> np.ndarray:
    """Raised-cosine ramps at both ends so events do not click in and out."""
    m = min(int(seconds * sr), len(x) // 2)
    if m > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(m) / m)
        x = x.copy()
        x[:m] *= ramp
        x[-m:] *= ramp[::-1]
    return x


def _noise(
    rng: np.random.Generator,
    n: int,
    sr: int,
    *,
    alpha: float = 0.0,
    lo: float | None = None,
    hi: float | None = None,
) -> np.ndarray:
    """Unit-RMS noise with a 1/f**alpha spectrum (0 white, 1 pink, 2 brown), band-limited."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    gain = np.maximum(f, 20.0) ** (-alpha / 2)
    if lo is not None:
        gain /= np.sqrt(1.0 + (lo / np.maximum(f, 1e-3)) ** 4)
    if hi is not None:
        gain /= np.sqrt(1.0 + (f / hi) ** 4)
    x = np.fft.irfft(spectrum * gain, n)
    return x / _rms(x)


def _harmonics(f0: np.ndarray, sr: int, amps: np.ndarray) -> np.ndarray:
    """A harmonic tone on a time-varying fundamental ``f0`` (Hz per sample)."""
    phase = 2 * np.pi * np.cumsum(f0) / sr
    k = np.arange(1, len(amps) + 1)[:, None]
    # Harmonics near Nyquist are dropped rather than aliased.
    weights = np.asarray(amps)[:, None] * (k * f0[None, :] < 0.45 * sr)
    return np.sum(weights * np.sin(k * phase[None, :]), axis=0)


def _rolloff(rng: np.random.Generator, count: int, low: float, high: float) -> np.ndarray:
    return 1.0 / np.arange(1, count + 1) ** rng.uniform(low, high)


def _add(out: np.ndarray, x: np.ndarray, at: int) -> None:
    """Add ``x`` into ``out`` from index ``at``, cut at the end of ``out``."""
    if 0 <= at < len(out):
        m = min(len(x), len(out) - at)
        out[at : at + m] += x[:m]


def _pulses(n: int, sr: int, times: np.ndarray, amps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """A train of ``kernel`` copies at ``times`` (seconds), by FFT convolution."""
    impulses = np.zeros(n)
    idx = np.round(times * sr).astype(int)
    keep = (idx >= 0) & (idx < n)
    np.add.at(impulses, idx[keep], amps[keep])
    size = 1 << int(np.ceil(np.log2(n + len(kernel))))
    out = np.fft.irfft(np.fft.rfft(impulses, size) * np.fft.rfft(kernel, size), size)
    return out[:n]


def _periodic_times(
    rng: np.random.Generator, n: int, sr: int, rate: float, jitter: float
) -> np.ndarray:
    """Onset times (seconds) of a roughly periodic train at ``rate`` per second."""
    count = int(n / sr * rate) + 2
    gaps = np.maximum(1.0 / rate * (1.0 + jitter * rng.standard_normal(count)), 0.2 / rate)
    return rng.uniform(0.0, 1.0 / rate) + np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def _ambience(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """City background: coloured noise between white and brown, slowly swelling."""
    x = _noise(rng, n, sr, alpha=rng.uniform(0.0, 2.0), hi=rng.uniform(1500.0, 0.45 * sr))
    swell = 1.0 + rng.uniform(0.0, 0.5) * _noise(rng, n, sr, hi=rng.uniform(0.3, 2.0))
    return x * np.clip(swell, 0.2, None)


# ------------------------------------------------------------------------ class synths
# Each takes (rng, n, sr) and returns n samples of the event at an arbitrary level.


def _air_conditioner(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = _time(n, sr)
    hum = _noise(rng, n, sr, alpha=rng.uniform(0.5, 1.5), hi=rng.uniform(300.0, 1500.0))
    blade = rng.uniform(40.0, 150.0) * (
        1 + 0.004 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 2 * np.pi))
    )
    fan = _harmonics(blade, sr, _rolloff(rng, int(rng.integers(3, 8)), 0.5, 1.5))
    wobble = 1 + rng.uniform(0.0, 0.15) * np.sin(2 * np.pi * rng.uniform(0.1, 1.0) * t)
    return (hum + rng.uniform(0.2, 1.0) * fan / _rms(fan)) * wobble


def _engine_idling(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    firing = rng.uniform(20.0, 60.0)
    times = _periodic_times(rng, n, sr, firing, jitter=0.03)
    cylinders = int(rng.integers(3, 7))
    # Cylinders differ a little, which gives the idle its lumpy sub-rhythm.
    strength = rng.uniform(0.6, 1.0, cylinders)[np.arange(len(times)) % cylinders]
    tk = _time(int(0.08 * sr), sr)
    kernel = np.sin(2 * np.pi * rng.uniform(60.0, 250.0) * tk) * np.exp(
        -tk / rng.uniform(0.004, 0.015)
    )
    thump = _pulses(n, sr, times, strength, kernel)
    envelope = _pulses(n, sr, times, strength, np.exp(-tk / 0.01))
    combustion = envelope * _noise(rng, n, sr, alpha=1.0, hi=rng.uniform(800.0, 2500.0))
    rumble = _noise(rng, n, sr, alpha=2.0, hi=rng.uniform(150.0, 400.0))
    return (
        thump / _rms(thump)
        + rng.uniform(0.1, 0.4) * combustion / _rms(combustion)
        + rng.uniform(0.2, 0.6) * rumble
    )


def _car_horn(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    low = rng.uniform(350.0, 520.0)
    tones = [low, low * rng.uniform(1.18, 1.32)] if rng.random() < 0.7 else [low]
    amps = _rolloff(rng, int(rng.integers(6, 12)), 0.6, 1.2)
    at = 0
    for _ in range(int(rng.integers(1, 4))):
        length = min(int(rng.uniform(0.2, 1.2) * sr), n - at)
        if length < int(0.02 * sr):
            break
        t = _time(length, sr)
        honk = sum(_harmonics(np.full(length, f), sr, amps) for f in tones)
        envelope = np.minimum(1.0, t / 0.015) * np.minimum(1.0, (t[-1] - t) / 0.04 + 1e-3)
        _add(out, honk * envelope, at)
        at += length + int(rng.uniform(0.06, 0.3) * sr)
    return out


def _children_playing(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    out = 0.1 * rng.uniform(0.3, 1.5) * _noise(rng, n, sr, lo=300.0, hi=3000.0)  # crowd
    for _ in range(max(1, int(rng.poisson(rng.uniform(4.0, 12.0) * n / sr)))):
        length = int(rng.uniform(0.08, 0.5) * sr)
        t = _time(length, sr)
        glide = 1 + rng.uniform(-0.3, 0.4) * t / max(t[-1], 1e-3)
        vibrato = 1 + rng.uniform(0.01, 0.05) * np.sin(2 * np.pi * rng.uniform(4.0, 8.0) * t)
        f0 = rng.uniform(250.0, 650.0) * glide * vibrato
        voice = _harmonics(f0, sr, _rolloff(rng, 6, 0.5, 1.5)) * np.hanning(length)
        _add(out, rng.uniform(0.2, 1.0) * voice, int(rng.integers(0, max(1, n - length // 2))))
    return out


def _dog_bark(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    size = rng.uniform(350.0, 900.0)  # small dogs bark higher
    amps = _rolloff(rng, int(rng.integers(6, 11)), 0.6, 1.2)
    at = 0
    for _ in range(int(rng.integers(1, 5))):
        length = min(int(rng.uniform(0.08, 0.25) * sr), n - at)
        if length < int(0.02 * sr):
            break
        t = _time(length, sr)
        f0 = size * rng.uniform(0.9, 1.1) * (1 - rng.uniform(0.15, 0.4) * t / t[-1])
        tone = _harmonics(f0, sr, amps)
        rasp = _noise(rng, length, sr, lo=400.0, hi=rng.uniform(3000.0, 6000.0))
        envelope = np.minimum(1.0, t / 0.005) * np.exp(-t / (t[-1] / rng.uniform(2.0, 4.0)))
        _add(out, (tone / _rms(tone) + rng.uniform(0.2, 0.8) * rasp) * envelope, at)
        at += length + int(rng.uniform(0.1, 0.45) * sr)
    return out


def _drilling(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = _time(n, sr)
    spin_up = 1 - rng.uniform(0.0, 0.4) * np.exp(-t / rng.uniform(0.05, 0.3))
    spin_up = spin_up if rng.random() < 0.5 else np.ones(n)
    load = 1 + 0.02 * _noise(rng, n, sr, hi=rng.uniform(1.0, 4.0))
    whine = _harmonics(
        rng.uniform(200.0, 700.0) * spin_up * load,
        sr,
        _rolloff(rng, int(rng.integers(5, 10)), 0.3, 0.9),
    )
    hiss = _noise(rng, n, sr, lo=rng.uniform(1500.0, 3000.0), hi=rng.uniform(0.3, 0.47) * sr)
    depth = rng.uniform(0.1, 0.6)
    hammer = 1 - depth * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(8.0, 30.0) * t))
    return (whine / _rms(whine) + rng.uniform(0.1, 0.5) * hiss) * hammer


def _gun_shot(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    at = 0
    for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))):
        length = min(int(0.5 * sr), n - at)
        if length < int(0.02 * sr):
            break
        t = _time(length, sr)
        attack = np.minimum(1.0, t / 0.001)
        burst = _noise(rng, length, sr, alpha=rng.uniform(0.0, 1.0), hi=rng.uniform(2000.0, 7000.0))
        boom = rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * rng.uniform(50.0, 150.0) * t)
        tail = rng.uniform(0.05, 0.2) * _noise(
            rng, length, sr, alpha=1.0, hi=rng.uniform(1000.0, 3000.0)
        )
        shot = attack * (
            burst * np.exp(-t / rng.uniform(0.008, 0.05))
            + boom * np.exp(-t / rng.uniform(0.03, 0.12))
            + tail * np.exp(-t / rng.uniform(0.08, 0.3))
        )
        _add(out, shot, at)
        # Echoes off buildings: later, quieter and duller.
        dull = np.fft.irfft(
            np.fft.rfft(shot) / np.sqrt(1 + (np.fft.rfftfreq(length, 1 / sr) / 1500.0) ** 4), length
        )
        for _ in range(int(rng.integers(1, 4))):
            _add(out, rng.uniform(0.15, 0.5) * dull, at + int(rng.uniform(0.05, 0.4) * sr))
        at += int(rng.uniform(0.15, 0.6) * sr)
    return out


def _jackhammer(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    times = _periodic_times(rng, n, sr, rng.uniform(10.0, 25.0), jitter=0.04)
    strength = rng.uniform(0.6, 1.0, len(times))
    tk = _time(int(0.06 * sr), sr)
    decay = np.minimum(1.0, tk / 0.001) * np.exp(-tk / rng.uniform(0.004, 0.02))
    envelope = _pulses(n, sr, times, strength, decay)
    hits = envelope * _noise(
        rng, n, sr, alpha=rng.uniform(0.2, 1.2), hi=rng.uniform(1500.0, 6000.0)
    )
    ring_kernel = np.sin(2 * np.pi * rng.uniform(800.0, 2500.0) * tk) * np.exp(
        -tk / rng.uniform(0.01, 0.03)
    )
    ring = _pulses(n, sr, times, strength, ring_kernel)
    compressor = _noise(rng, n, sr, alpha=1.5, hi=300.0)
    return (
        hits / _rms(hits)
        + rng.uniform(0.1, 0.5) * ring / _rms(ring)
        + rng.uniform(0.05, 0.3) * compressor
    )


def _siren(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = _time(n, sr)
    low, high = rng.uniform(500.0, 800.0), rng.uniform(1000.0, 1500.0)
    phase = rng.uniform(0.0, 1.0)
    mode = rng.random()
    if mode < 0.55:  # wail: slow rise and fall
        sweep = 0.5 - 0.5 * np.cos(2 * np.pi * (t / rng.uniform(1.5, 5.0) + phase))
    elif mode < 0.9:  # yelp: fast rising sweeps
        sweep = ((t / rng.uniform(0.12, 0.35) + phase) % 1.0) ** rng.uniform(0.5, 1.0)
    else:  # hi-lo: two alternating tones
        sweep = (((t / rng.uniform(0.8, 1.6)) + phase) % 1.0 < 0.5).astype(float)
    doppler = 1 + rng.uniform(-0.03, 0.03) * (t / max(t[-1], 1e-3) - 0.5)
    tone = _harmonics(
        (low + (high - low) * sweep) * doppler, sr, _rolloff(rng, int(rng.integers(2, 6)), 1.0, 2.0)
    )
    return tone * np.linspace(rng.uniform(0.4, 1.0), rng.uniform(0.4, 1.0), n)


def _street_music(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    beat = 60.0 / rng.uniform(80.0, 140.0)
    root = int(rng.integers(50, 66))
    scale = [0, 2, 4, 7, 9] if rng.random() < 0.5 else [0, 3, 5, 7, 10]
    amps = _rolloff(rng, int(rng.integers(3, 8)), 0.8, 2.0)
    pluck = rng.random() < 0.5
    at = rng.uniform(0.0, beat)
    while at * sr < n:
        length = int(rng.choice([0.5, 1.0, 1.0, 2.0]) * beat * sr)
        midi = root + rng.choice(scale) + 12 * rng.choice([0, 0, 1])
        t = _time(length, sr)
        f0 = 440.0 * 2 ** ((midi - 69) / 12) * (1 + 0.004 * np.sin(2 * np.pi * 5.0 * t))
        shape = np.exp(-t / rng.uniform(0.1, 0.4)) if pluck else np.ones(length)
        shape = shape * np.minimum(1.0, t / 0.01) * np.minimum(1.0, (t[-1] - t) / 0.03 + 1e-3)
        _add(out, _harmonics(f0, sr, amps) * shape, int(at * sr))
        at += length / sr
    out /= _rms(out)
    if rng.random() < 0.6:  # a bass line on the root, every other beat
        f_bass = 440.0 * 2 ** ((root - 12 - 69) / 12)
        tb = _time(int(2 * beat * sr), sr)
        note = _harmonics(np.full(len(tb), f_bass), sr, np.array([1.0, 0.5, 0.25]))
        times = np.arange(0.0, n / sr, 2 * beat)
        bass = _pulses(n, sr, times, np.ones(len(times)), note * np.exp(-tb / 0.3))
        out += rng.uniform(0.2, 0.6) * bass / _rms(bass)
    if rng.random() < 0.6:  # drums: kick on the beat, hi-hat off the beat
        tk = _time(int(0.15 * sr), sr)
        kick = np.sin(2 * np.pi * rng.uniform(50.0, 80.0) * (tk + 0.03 * (1 - np.exp(-tk / 0.02))))
        kicks = np.arange(0.0, n / sr, beat)
        drums = _pulses(n, sr, kicks, np.ones(len(kicks)), kick * np.exp(-tk / 0.05))
        hat = _noise(rng, n, sr, lo=0.3 * sr) * _pulses(
            n, sr, kicks + beat / 2, np.ones(len(kicks)), np.exp(-tk / 0.02)
        )
        out += rng.uniform(0.2, 0.6) * (drums / _rms(drums) + 0.3 * hat / _rms(hat))
    return out


_SYNTHS: list[Callable[[np.random.Generator, int, int], np.ndarray]] = [
    _air_conditioner,
    _car_horn,
    _children_playing,
    _dog_bark,
    _drilling,
    _engine_idling,
    _gun_shot,
    _jackhammer,
    _siren,
    _street_music,
]


if __name__ == "__main__":
    main()
