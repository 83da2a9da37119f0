"""Linear probes: how much of each grounded factor the frozen encoder's cached features carry.

    python cli.py grounded-eval RUN HELDOUT_SHARDS --probe TRAIN_SHARDS

A multinomial logistic regression per factor (colour, shape, direction) is fitted on the training
clips' cached features and scored on the held-out clips' features. It reads one of two views, standardised
with the training clips' statistics: the clip's mean feature (``[D]``: what every frame holds, colour and
shape) or each frame's mean over the query tokens, frames concatenated in order (``[T * D]``: also how the
frames differ, the direction). The view and the L2 strength are picked per factor by 4-fold
cross-validation on the training clips only.

The probe's held-out accuracy is a ceiling of what the encoder makes linearly available, printed beside
what stage-1 training reached: a low direction score with a high probe blames the training, a low probe
blames the encoder (or the data).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import grounded

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # mean-loss L2 on the weights, picked per factor by cross-validation
FOLDS = 4


def probe_input(features: np.ndarray) -> np.ndarray:
    """``[N, T, Q, D]`` cached features -> ``[N, T * D]``: per-frame means over the queries, in frame order."""
    return features.mean(axis=2).reshape(len(features), -1)


def probe_views(features: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs a probe may read: the clip's mean feature ``[N, D]`` (fewer weights to fit: what is in
    every frame) and the frames in order ``[N, T * D]`` (what changes between frames)."""
    return {"clip mean": features.mean(axis=(1, 2)), "frames in order": probe_input(features)}


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[F, classes]`` and bias of a logistic regression on standardised ``x`` (L-BFGS)."""
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [torch.from_numpy((a - mean) / std).double() for a in (train, *others)]


def _predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, classes: int, l2: float):
    xtr, xte = _standardise(train_x, test_x)
    w, b = fit(xtr, torch.from_numpy(train_y).long(), classes, l2)
    return (xte @ w + b).argmax(1).numpy()


def choose_l2(x: np.ndarray, y: np.ndarray, classes: int, seed: int = 0) -> tuple[float, int]:
    """The L2 strength of ``L2_GRID`` with the best ``FOLDS``-fold cross-validated accuracy on ``x``,
    and the number of clips it got right."""
    folds = np.random.default_rng(seed).permutation(len(x)) % FOLDS
    scores = []
    for l2 in L2_GRID:
        hits = 0
        for k in range(FOLDS):
            tr, te = folds != k, folds == k
            hits += int((_predict(x[tr], y[tr], x[te], classes, l2) == y[te]).sum())
        scores.append(hits)
    return L2_GRID[int(np.argmax(scores))], max(scores)


def probe(
    train_x: np.ndarray | dict[str, np.ndarray],
    train_labels: list[str],
    test_x: np.ndarray | dict[str, np.ndarray],
    test_labels: list[str],
) -> tuple[float, np.ndarray, str]:
    """Held-out accuracy of one factor's probe, its per-clip hits, and the chosen view and L2. With
    several views (dicts of inputs), the view and the L2 are both picked by cross-validation on the
    training clips."""
    if not isinstance(train_x, dict):
        train_x, test_x = {"input": train_x}, {"input": test_x}
    classes = sorted(set(train_labels))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in train_labels])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread (on a loaded machine, more spin for minutes)
    try:
        picks = {v: choose_l2(x, y, len(classes)) for v, x in train_x.items()}
        view = max(picks, key=lambda v: picks[v][1])
        l2 = picks[view][0]
        pred = _predict(train_x[view], y, test_x[view], len(classes), l2)
    finally:
        torch.set_num_threads(threads)
    hits = np.array([classes[p] == t for p, t in zip(pred, test_labels, strict=True)])
    return float(hits.mean()), hits, f"{view}, L2 {l2:g}"


def probe_factors(
    train_features: np.ndarray, train_refs: list[str], test_features: np.ndarray, test_refs: list[str]
) -> dict[str, float | str]:
    """Per factor (and all three at once) held-out accuracy of linear probes on cached features
    ``[N, T, Q, D]``; labels are read from the reference captions (``pipeline.grounded.read_factors``)."""
    xtr, xte = probe_views(train_features), probe_views(test_features)
    train_f = [grounded.read_factors(r) for r in train_refs]
    test_f = [grounded.read_factors(r) for r in test_refs]
    out: dict[str, float | str] = {"train_clips": len(train_refs), "clips": len(test_refs)}
    all_hits = np.ones(len(test_refs), dtype=bool)
    for f in grounded.FACTORS:
        acc, hits, how = probe(xtr, [str(t[f]) for t in train_f], xte, [str(t[f]) for t in test_f])
        out[f], out[f"{f}_probe"] = acc, how
        all_hits &= hits
    out["all"] = float(all_hits.mean())
    return out
