"""The epoch history with whole probability vectors against their top k classes.

Prints one table, one row per ``top_k`` (None: whole vectors): on N samples with C
classes over three validation epochs of synthetic predictions (flat ones: the top 10
classes hold about a seventh of the probability, the hard case for ``top_k``; 10% of the
given labels wrong), how far the averaged probabilities move from the whole-vector ones
(``max_abs_error``), the Spearman correlation of the averaged self-confidence, the share
of the 10% lowest self-confidences that stay the same samples (``lowest_kept``), the
share of samples whose confident-learning flag stays the same (``flags_kept``), the
memory of the stored past (``past_mb``) and the seconds that one epoch's averaging takes
(``epoch_s``).

    python benchmarks/history_top_k.py
    python benchmarks/history_top_k.py --samples 100000 --classes 1000
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from labelwatch.combined import candidate_flags
from labelwatch.history import EpochHistory


def predictions(n: int, c: int, epochs: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Softmax of noisy logits with a boost on the true class and a confusable one."""
    generator = torch.Generator().manual_seed(0)
    true = torch.randint(0, c, (n,), generator=generator)
    given = true.clone()
    wrong = torch.rand(n, generator=generator) < 0.1
    given[wrong] = torch.randint(0, c, (int(wrong.sum()),), generator=generator)
    rows = torch.arange(n)
    probs = []
    for epoch in range(epochs):
        logits = torch.randn(n, c, generator=generator)
        logits[rows, true] += 4.0 + epoch
        logits[rows, (true + 1) % c] += 0.7 * (4.0 + epoch)
        probs.append(torch.softmax(logits, dim=1))
    return probs, given


def averaged(
    probs: list[torch.Tensor], top_k: int | None
) -> tuple[torch.Tensor, EpochHistory, float]:
    history = EpochHistory(window=len(probs), top_k=top_k)
    ids, flags = range(len(probs[0])), torch.zeros(len(probs[0]), dtype=torch.bool)
    for epoch, p in enumerate(probs[:-1]):
        history.update(epoch, ids, p, flags)
    start = time.perf_counter()
    mean, _ = history.update(len(probs) - 1, ids, probs[-1], flags)
    return mean, history, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--top-k", type=int, nargs="+", default=[10, 32])
    args = parser.parse_args()
    from scipy.stats import spearmanr

    probs, given = predictions(args.samples, args.classes)
    rows = torch.arange(len(given))
    whole, _, _ = averaged(probs, None)
    lowest = set(whole[rows, given].argsort()[: len(given) // 10].tolist())
    flags = candidate_flags(whole, given)  # confident learning, as without neighbours
    table = []
    for top_k in [None, *args.top_k]:
        mean, history, seconds = averaged(probs, top_k)
        past = [history._past, *(history._past_top or ())]
        confidence = mean[rows, given]
        table.append(
            {
                "top_k": "None" if top_k is None else top_k,
                "max_abs_error": float((mean - whole).abs().max()),
                "spearman": spearmanr(whole[rows, given].numpy(), confidence.numpy())[0],
                "lowest_kept": len(lowest & set(confidence.argsort()[: len(lowest)].tolist()))
                / len(lowest),
                "flags_kept": float((candidate_flags(mean, given) == flags).float().mean()),
                "past_mb": sum(t.numel() * t.element_size() for t in past) / 1e6,
                "epoch_s": seconds,
            }
        )
    print(f"N = {args.samples}, C = {args.classes}, window = 3")
    print(pd.DataFrame(table).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
