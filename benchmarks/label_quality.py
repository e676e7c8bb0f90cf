"""Which `label_quality` ranking finds flipped labels best? Prints one table.

Out-of-sample probabilities (5-fold cross-validated logistic regression) on scikit-learn's
bundled digits images, with a fraction of labels flipped uniformly to another class;
each ranking is scored by how well low values pick out the flipped samples.

    python benchmarks/label_quality.py            # 3 seeds
    python benchmarks/label_quality.py --seeds 1
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from labelwatch import score_predictions
from labelwatch.scoring import LABEL_QUALITY_METHODS


def noisy_probs(noise_rate: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    flipped = rng.random(len(y)) < noise_rate
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, flipped.sum())) % 10
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    probs = cross_val_predict(model, x, noisy, cv=5, method="predict_proba")
    return probs, noisy, flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per noise rate")
    args = parser.parse_args()
    rows = []
    for noise_rate in (0.05, 0.2, 0.4):
        for seed in range(args.seeds):
            probs, noisy, flipped = noisy_probs(noise_rate, seed)
            for method in LABEL_QUALITY_METHODS:
                quality = score_predictions(probs=probs, labels=noisy, label_quality=method)
                score = -quality["label_quality"].to_numpy()  # low quality = likely error
                rows.append(
                    {
                        "noise_rate": noise_rate,
                        "method": method,
                        "auroc": roc_auc_score(flipped, score),
                        "average_precision": average_precision_score(flipped, score),
                    }
                )
    table = pd.DataFrame(rows).groupby(["noise_rate", "method"]).mean().unstack("method")
    print(table.round(3).to_string())
    print("\nmean over noise rates and seeds:")
    print(pd.DataFrame(rows).groupby("method")[["auroc", "average_precision"]].mean().round(3))


if __name__ == "__main__":
    main()
