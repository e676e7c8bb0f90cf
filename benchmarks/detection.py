"""Does labelwatch find more real label errors than cleanlab on the same predictions?

For each noise kind (uniform, class-conditional, ambiguous mixtures) and rate (5/20/40%)
labels are corrupted, a small MLP is trained with 2-fold cross-validation (train on one
half with its noisy labels, validate on the other, and the other way round) and every
validation epoch records each held-out sample's probabilities and penultimate embedding,
as LabelWatch captures them. Each held-out half is one validation set: labelwatch scores
it with its epoch history (``EpochHistory``, window 3) and kNN label agreement in the last
epoch's embeddings (k=10); cleanlab scores the same half from the last epoch's
probabilities alone. Scores of the two halves are concatenated and compared with the
ground truth: AUROC and average precision of each ranking (low quality = error) and
precision/recall/F1 of each flag, in one table, then a per-setting summary of the default
ranking and flag against cleanlab's best method and best filter. The ``DEFAULT`` rows are
LabelWatch's defaults, read from its signature and computed by
``labelwatch.combined.history_scores``, the function the callback calls.

Noise kinds (rate r):

- ``uniform``: a fraction r of labels flipped to a random other class;
- ``class_conditional``: a fraction r flipped to a fixed confusable class
  (digits 0->6, 1->7, 2->3, 3->8, 4->9, 5->6, 6->5, 7->1, 8->3, 9->4);
- ``ambiguous``: a fraction 2r of inputs replaced by a blend ``w * a + (1 - w) * b`` of
  their own image ``a`` and one of another class ``b``, ``w ~ U(0.55, 0.65)``; half of
  them (r of all samples) are labelled with the minority component ``b``, which counts
  as a label error, and the other half keep the majority label (hard, but correct).

Data: scikit-learn's bundled digits (8x8 images, 1797 samples) by default;
``--data synthetic`` uses a 10-class, 32-feature ``make_classification`` task (2000
samples) as an embedding-style check that the defaults were not tuned to digits alone.

    python benchmarks/detection.py                 # digits, 3 seeds, about 1-2 min on 2 cores
    python benchmarks/detection.py --data synthetic --seeds 2
    python benchmarks/detection.py --data urban_sounds --root data/urban_sounds

``--data urban_sounds`` uses the example's clips (``examples/urban_sounds``; generated under
``--root`` when missing) with their own annotation errors (about 8%, mostly flips between
classes that sound alike) instead of injected noise; the seed changes the folds' training.
It also counts, for each flag, the *hidden sirens* found: clips holding a siren that
their label leaves out (a siren behind a dog bark, or a corrupted siren label), errors no
single-label model's outputs reveal; and it adds the flag LabelWatch raises with
``watch_classes=["siren"]`` (the default rule, or ``watch_siren >= 3`` on the last epoch
or the first, see ``labelwatch.watch``), whose extra flags the corrupted-label F1 counts as
wrong.

Two rows separate how many to flag from which: the default ranking's top K rows, with K
the default flag's count, and with K the true number of errors (an oracle no filter has:
it shows what a perfect count would give the default ranking).

The tiny model trains with one torch thread: measured here, a training step of this MLP
took 1 ms with one thread and 65-95 ms with two on a 2-core machine under load.
"""

from __future__ import annotations

import argparse
import inspect
import time

import numpy as np
import pandas as pd
import torch
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.datasets import load_digits, make_classification
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from labelwatch import score_predictions
from labelwatch.callback import LabelWatchLogic
from labelwatch.combined import (
    candidate_flags,
    combined_quality,
    history_scores,
    reachable_agreement,
)
from labelwatch.epoch_scoring import KNN_NEIGHBOURS
from labelwatch.history import EpochHistory
from labelwatch.neighbours import knn_label_distribution
from labelwatch.scoring import LABEL_QUALITY_METHODS
from labelwatch.watch import watch_scores

KINDS = ("uniform", "class_conditional", "ambiguous")
RATES = (0.05, 0.2, 0.4)
CLEANLAB_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
CLEANLAB_FILTERS = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
)
CONFUSABLE = np.array([6, 7, 3, 8, 9, 6, 5, 1, 3, 4])
# LabelWatch's own defaults, read from its signature: the DEFAULT rows are what it logs.
DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(LabelWatchLogic.__init__).parameters.items()
}
DEFAULT_RANKING = f"DEFAULT label_quality ({DEFAULTS['label_quality']})"
DEFAULT_FLAG = f"DEFAULT is_candidate ({DEFAULTS['candidate_rule']})"
WINDOW, K, EPOCHS, BATCH = DEFAULTS["history_window"], KNN_NEIGHBOURS, 20, 32
WATCH_FLAG = f"DEFAULT | watch siren >= {DEFAULTS['min_watch_score']:g} (last or first epoch)"
RANKED_FLAG = "DEFAULT ranking, top K (K = the DEFAULT flag's count)"
ORACLE_FLAG = "DEFAULT ranking, top K (K = the true number of errors: an oracle)"
SIREN = 8  # the urban-sounds class index of "siren"
# features, annotated labels, corrupted, hidden sirens, dog barks hiding a siren
URBAN_SOUNDS: list[tuple[np.ndarray, ...]] = []  # loaded once by main


def urban_sounds_features(root: str) -> tuple[np.ndarray, ...]:
    """Fixed log-mel features of the urban-sounds clips, their annotated labels, which
    annotations are wrong, which clips hide a siren that their label leaves out, and which
    of those are dog barks (``ground_truth.csv``); the clips are generated when missing.

    A cheap, honest stand-in for training the example's CNN on 2 cores: each clip's
    64-band log-mel spectrogram (the example's ``LogMel``) pooled to its mean and standard
    deviation per band over time (128 features), then the MLP below learns from those.
    """
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the examples package
    from examples.urban_sounds.data import load_clip
    from examples.urban_sounds.generate import generate
    from examples.urban_sounds.model import LogMel

    path = Path(root)
    if not (path / "metadata" / "ground_truth.csv").is_file():
        generate(path, num_clips=3000, seed=0, workers=2)
    truth = pd.read_csv(path / "metadata" / "ground_truth.csv")
    folds = pd.read_csv(path / "metadata" / "UrbanSound8K.csv").set_index("slice_file_name")
    logmel = LogMel(16000, 1024, 512, 64)
    features = []
    with torch.no_grad():
        for start in range(0, len(truth), 250):
            names = truth["slice_file_name"].iloc[start : start + 250]
            clips = torch.stack(
                [
                    load_clip(path / "audio" / f"fold{folds.loc[n, 'fold']}" / n, 16000, 32000)
                    for n in names
                ]
            )
            spec = logmel(clips).squeeze(1)  # (B, n_mels, frames)
            features.append(torch.cat([spec.mean(dim=2), spec.std(dim=2)], dim=1))
    x = torch.cat(features).numpy()
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    noisy = truth["annotated_classID"].to_numpy()
    siren = truth["contains_siren"].to_numpy(bool)
    hidden = siren & (truth["annotated_class"] != "siren").to_numpy()
    dog = siren & (truth["annotated_class"] == "dog_bark").to_numpy()
    return x.astype(np.float32), noisy, truth["is_corrupted"].to_numpy(bool), hidden, dog


def make_data(
    source: str, kind: str, rate: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, noisy labels and the error mask for one setting."""
    if source == "urban_sounds":  # the data set's own annotation errors
        return URBAN_SOUNDS[0][:3]
    if source == "digits":
        x, y = load_digits(return_X_y=True)
        x, confusable = x / 16.0, CONFUSABLE
    else:
        x, y = make_classification(
            n_samples=2000,
            n_features=32,
            n_informative=16,
            n_redundant=0,
            n_classes=10,
            n_clusters_per_class=1,
            class_sep=1.5,
            random_state=seed,
        )
        confusable = (np.arange(10) + 1) % 10
    rng = np.random.default_rng(seed)
    n = len(y)
    noisy = y.copy()
    if kind == "uniform":
        errors = rng.random(n) < rate
        noisy[errors] = (y[errors] + rng.integers(1, 10, errors.sum())) % 10
    elif kind == "class_conditional":
        errors = rng.random(n) < rate
        noisy[errors] = confusable[y[errors]]
    else:
        draw = rng.random(n)
        errors, mixed = draw < rate, draw < 2 * rate
        partner = rng.integers(0, n, n)
        while (clash := mixed & (y[partner] == y)).any():  # a partner of another class
            partner[clash] = rng.integers(0, n, clash.sum())
        weight = rng.uniform(0.55, 0.65, n)[:, None]
        x = np.where(mixed[:, None], weight * x + (1 - weight) * x[partner], x)
        noisy[errors] = y[partner[errors]]
    return x.astype(np.float32), noisy, errors


class MLP(nn.Module):
    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU()
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.body(x)
        return self.head(embedding), embedding


def train_fold(
    x: np.ndarray, noisy: np.ndarray, train: np.ndarray, valid: np.ndarray, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-epoch validation probabilities, and the first and last epochs' validation
    embeddings."""
    torch.manual_seed(seed)
    model = MLP(x.shape[1], 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_train, y_train = torch.from_numpy(x[train]), torch.from_numpy(noisy[train]).long()
    x_valid = torch.from_numpy(x[valid])
    generator = torch.Generator().manual_seed(seed)
    probs, embedded = [], []
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), BATCH):
            batch = order[start : start + BATCH]
            loss = nn.functional.cross_entropy(model(x_train[batch])[0], y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            logits, embeddings = model(x_valid)
        probs.append(torch.softmax(logits, dim=1).numpy())
        if epoch in (0, EPOCHS - 1):
            embedded.append(embeddings.numpy())
    return probs, embedded


def score_half(
    epoch_probs: list[np.ndarray],
    embedded: list[np.ndarray],
    labels: np.ndarray,
    watch_siren: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every ranking (higher = more likely an error) and flag for one validation set, from
    the epochs' probabilities and the first and last epochs' embeddings; ``watch_siren``
    adds the flag of ``watch_classes=["siren"]``."""
    embeddings = embedded[-1]
    labels_t = torch.from_numpy(labels).long()
    ids = np.arange(len(labels))
    history = EpochHistory(window=WINDOW)
    for epoch, probs in enumerate(epoch_probs):
        flags = score_predictions(probs=probs, labels=labels)["is_confident_mismatch"]
        averaged, streak = history.update(
            epoch, ids, torch.from_numpy(probs), torch.from_numpy(flags.to_numpy().copy())
        )
    last = epoch_probs[-1]
    knn = knn_label_distribution(torch.from_numpy(embeddings), labels_t, 10, k=K)
    rankings: dict[str, np.ndarray] = {}
    flags_out: dict[str, np.ndarray] = {}
    for method in LABEL_QUALITY_METHODS:
        frame = score_predictions(probs=last, labels=labels, label_quality=method)
        rankings[f"lw {method} (last epoch)"] = -frame["label_quality"].to_numpy()
    # LabelWatch's single-epoch flag (= cleanlab's confident_learning, the old candidate rule)
    flags_out["lw is_confident_mismatch (last epoch)"] = frame["is_confident_mismatch"].to_numpy()
    default = history_scores(
        averaged,
        labels_t,
        knn,
        method=DEFAULTS["label_quality"],
        knn_weight=DEFAULTS["knn_weight"],
        # as the callback scales it: a class too small to fill a neighbourhood is spared
        min_knn_agreement=DEFAULTS["min_knn_agreement"]
        * reachable_agreement(labels_t, min(K, len(labels_t) - 1)),
    )
    rankings[DEFAULT_RANKING] = -default.quality.double().numpy()
    for method in (
        "averaged_self_confidence",
        "averaged_margin",
        "knn_agreement",
        "knn_mixed_self_confidence",
        "knn_mixed_margin",
    ):
        if method != DEFAULTS["label_quality"]:
            quality = combined_quality(averaged, labels_t, knn, method=method)
            rankings[f"lw {method}"] = -quality.double().numpy()
    for method in CLEANLAB_METHODS:
        rankings[f"cleanlab {method}"] = -get_label_quality_scores(labels, last, method=method)
    flags_out["lw cl(averaged)"] = candidate_flags(averaged, labels_t).numpy()
    for s in (2, 3):
        flags_out[f"lw streak>={s}"] = (streak >= s).numpy()
    flags_out["lw cl(averaged) | knn<0.2"] = candidate_flags(
        averaged, labels_t, knn, knn_weight=0.0
    ).numpy()
    flags_out[DEFAULT_FLAG] = default.is_candidate.numpy()
    for filter_by in CLEANLAB_FILTERS:
        flags_out[f"cleanlab {filter_by}"] = find_label_issues(labels, last, filter_by=filter_by)
    if watch_siren:  # as the callback: this (the last) epoch's score, or the first's
        leaning = np.zeros(len(labels), dtype=bool)
        for probs, features in ((epoch_probs[0], embedded[0]), (last, embeddings)):
            predicted = torch.from_numpy(probs.argmax(1))
            scores = watch_scores(
                torch.from_numpy(features), labels_t, [SIREN], 10, predictions=predicted
            )[:, 0]
            leaning |= (scores >= DEFAULTS["min_watch_score"]).numpy()  # NaN compares False
        flags_out[WATCH_FLAG] = default.is_candidate.numpy() | leaning
    return rankings, flags_out


def top_k(ranking: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` rows ranked highest (higher = more likely an error; ties: lower index)."""
    flags = np.zeros(len(ranking), dtype=bool)
    flags[np.argsort(-ranking, kind="stable")[:k]] = True
    return flags


def run_setting(source: str, kind: str, rate: float, seed: int) -> list[dict]:
    x, noisy, errors = make_data(source, kind, rate, seed)
    fold = np.random.default_rng(seed + 1000).permutation(len(x)) % 2
    rankings: dict[str, list[np.ndarray]] = {}
    flags: dict[str, list[np.ndarray]] = {}
    order = []
    for half in (0, 1):
        valid, train = np.flatnonzero(fold == half), np.flatnonzero(fold != half)
        epoch_probs, embedded = train_fold(x, noisy, train, valid, seed * 10 + half)
        ranked, flagged = score_half(
            epoch_probs, embedded, noisy[valid], watch_siren=source == "urban_sounds"
        )
        # How many to flag, apart from which: the default ranking's top K rows, with K the
        # default flag's count, and with K the true number of errors (an oracle).
        counts = {RANKED_FLAG: flagged[DEFAULT_FLAG].sum(), ORACLE_FLAG: errors[valid].sum()}
        for name, count in counts.items():
            flagged[name] = top_k(ranked[DEFAULT_RANKING], int(count))
        for name, values in ranked.items():
            rankings.setdefault(name, []).append(values)
        for name, values in flagged.items():
            flags.setdefault(name, []).append(values)
        order.append(valid)
    truth = errors[np.concatenate(order)]
    hidden = dog = None
    if source == "urban_sounds":
        hidden, dog = (mask[np.concatenate(order)] for mask in URBAN_SOUNDS[0][3:])
    rows = []
    base = {"kind": kind, "rate": rate, "seed": seed}
    for name, parts in rankings.items():
        score = np.concatenate(parts)
        rows.append(
            base
            | {
                "method": name,
                "auroc": roc_auc_score(truth, score),
                "ap": average_precision_score(truth, score),
            }
        )
    for name, parts in flags.items():
        flagged = np.concatenate(parts).astype(bool)
        hits = int((flagged & truth).sum())
        precision = hits / max(int(flagged.sum()), 1)
        recall = hits / max(int(truth.sum()), 1)
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        row = {
            "method": name,
            "n_flagged": int(flagged.sum()),
            "precision": precision,
            "recall": recall,
            "f1": f1,
        }
        if hidden is not None:
            row |= {
                "right": int((flagged & (truth | hidden)).sum()),
                "hidden_sirens": int((flagged & hidden).sum()),
                "of_hidden": int(hidden.sum()),
                "dog_sirens": int((flagged & dog).sum()),
                "of_dog": int(dog.sum()),
            }
        rows.append(base | row)
    return rows


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per setting: default vs cleanlab's best ranking (AP) and best filter (F1)."""
    out = []
    for (kind, rate), group in table.groupby(level=["kind", "rate"], sort=False):
        group = group.droplevel(["kind", "rate"])
        cleanlab = group[group.index.str.startswith("cleanlab")]
        best_ap = cleanlab["ap"].idxmax()
        best_f1 = cleanlab["f1"].idxmax()
        out.append(
            {
                "kind": kind,
                "rate": rate,
                "default_ap": group.loc[DEFAULT_RANKING, "ap"],
                "cleanlab_best_ap": cleanlab.loc[best_ap, "ap"],
                "ap_gain": group.loc[DEFAULT_RANKING, "ap"] - cleanlab.loc[best_ap, "ap"],
                "best_method": best_ap.removeprefix("cleanlab "),
                "default_f1": group.loc[DEFAULT_FLAG, "f1"],
                "cleanlab_best_f1": cleanlab.loc[best_f1, "f1"],
                "f1_gain": group.loc[DEFAULT_FLAG, "f1"] - cleanlab.loc[best_f1, "f1"],
                "best_filter": best_f1.removeprefix("cleanlab "),
            }
        )
    return pd.DataFrame(out).set_index(["kind", "rate"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("digits", "synthetic", "urban_sounds"), default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--root", default="data/urban_sounds", help="urban-sounds clips (made when missing)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    settings = {kind: RATES for kind in KINDS}
    if args.data == "urban_sounds":
        URBAN_SOUNDS.append(urban_sounds_features(args.root))
        settings = {"annotated": (float(URBAN_SOUNDS[0][2].mean().round(3)),)}
    for kind, rates in settings.items():
        for rate in rates:
            for seed in range(args.seeds):
                rows.extend(run_setting(args.data, kind, rate, seed))
    frame = pd.DataFrame(rows)
    table = frame.groupby(["kind", "rate", "method"], sort=False).mean(numeric_only=True)
    table = table.drop(columns="seed")
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 1000)
    print(
        f"data={args.data}, seeds={args.seeds}, epochs={EPOCHS}, window={WINDOW}, k={K};"
        " rankings: AUROC/AP (low quality = error); flags: precision/recall/F1\n"
    )
    print(table.round(3).to_string(na_rep=""))
    print("\nmean over the settings:")
    print(
        table.groupby(level="method", sort=False)
        .mean()[["auroc", "ap", "precision", "recall", "f1"]]
        .round(3)
        .to_string(na_rep="")
    )
    if "hidden_sirens" in table.columns:
        print(
            "\nhidden sirens (a siren the label leaves out) among each flag's samples; right ="
            " corrupted labels or hidden sirens (mean over the seeds):"
        )
        columns = ["n_flagged", "right", "hidden_sirens", "of_hidden", "dog_sirens", "of_dog"]
        print(table[columns].dropna().round(1).to_string())
    print(f"\ndefault ranking {DEFAULT_RANKING!r} and flag {DEFAULT_FLAG!r} vs cleanlab's best:")
    result = summary(table)
    print(result.round(3).to_string())
    print(
        f"\nmean AP gain {result['ap_gain'].mean():+.3f} (target +0.03; met in"
        f" {(result['ap_gain'] >= 0.03).sum()}/{len(result)} settings), mean F1 gain"
        f" {result['f1_gain'].mean():+.3f} (target >= 0; met in"
        f" {(result['f1_gain'] >= 0).sum()}/{len(result)} settings);"
        f" {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
