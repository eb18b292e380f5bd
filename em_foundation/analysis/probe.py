"""Linear dataset probe: can a linear model tell which dataset an embedding came from?

If a logistic regression on PCA-reduced features predicts the source dataset well above
chance, the backbone's features carry a domain signature that a segmentation head trained
on one domain will meet as a shift. The study reported accuracy and ROC-AUC; here they come
with the per-class sample counts, the fold-to-fold spread and the chance level, because the
minority dataset (VNC) has about 20 images (defect 6 in docs/published-setup.md). Balanced accuracy is used so that the
10:1 imbalance cannot pass for signal.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["dataset_probe", "make_probe"]


def make_probe(n_components: int, seed: int = 0, class_weight: str | None = "balanced", C: float = 1.0):
    """StandardScaler -> PCA(n_components) -> LogisticRegression, as one sklearn Pipeline.

    Fitting the scaler and PCA inside the pipeline keeps them within each training fold, so
    no information from the test fold leaks into the projection.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("pca", PCA(n_components=n_components, random_state=seed)),
            ("logreg", LogisticRegression(C=C, class_weight=class_weight, max_iter=5000)),
        ]
    )


def _auc(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Binary: AUC of the second (positive) class's probability; multi-class: OvR macro."""
    from sklearn.metrics import roc_auc_score

    if len(classes) == 2:
        return float(roc_auc_score(y_true == classes[1], proba[:, 1]))
    return float(roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=classes))


def _splitter(labels: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int):
    """Stratified contiguous folds (analysis/folds.py): each fold holds out one block of
    consecutive samples (or whole groups) of every class, so near-copy neighbouring sections
    never sit on both sides. ``seed`` is unused: the folds follow the stack order."""
    from .folds import ContiguousFolds

    classes = np.unique(labels)
    if groups is None:
        counts = np.array([np.sum(labels == c) for c in classes])
        unit = "samples"
    else:
        counts = np.array([len(np.unique(groups[labels == c])) for c in classes])
        unit = "groups"
    small = [f"{c!s} ({k})" for c, k in zip(classes, counts) if k < 2]
    if small:
        raise ValueError(
            f"every class needs at least 2 {unit} for a cross-validated probe; too few: {', '.join(small)}"
        )
    k = int(max(2, min(n_splits, counts.min())))
    return ContiguousFolds(k), k


def dataset_probe(
    features: np.ndarray,
    labels: np.ndarray,
    pca_dim: int = 64,
    n_splits: int = 5,
    seed: int = 0,
    groups: np.ndarray | None = None,
    class_weight: str | None = "balanced",
    n_permutations: int = 0,
) -> dict[str, Any]:
    """Cross-validated logistic-regression probe predicting the dataset label.

    Parameters
    ----------
    features: (n, d) embeddings. labels: (n,) dataset names.
    pca_dim: PCA components inside the pipeline, capped at min(pca_dim, n_train - 1, d)
        for each fold (PCA cannot have more components than training samples).
    n_splits: stratified contiguous folds (analysis/folds.py; rows must be in stack order),
        reduced to the smallest class count (at least 2).
    groups: optional (n,) group ids (e.g. source image of each patch token); folds then
        never split a group, otherwise tokens of one image make the probe look better.
    class_weight: "balanced" reweights the loss against class imbalance (None: plain).
    n_permutations: if > 0, also a label-permutation p-value for balanced accuracy.

    Returns a dict with balanced accuracy and ROC-AUC (mean and sample std over folds,
    and per fold), the chance level of balanced accuracy (1 / n_classes; 0.5 for AUC),
    counts per class, and the number of folds actually used.
    """
    from sklearn.metrics import balanced_accuracy_score

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(str)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"expected features (n, d) and labels (n,), got {x.shape} and {y.shape}")
    g = None if groups is None else np.asarray(groups)
    if g is not None and g.shape != (len(x),):
        raise ValueError(f"groups must have shape ({len(x)},), got {g.shape}")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"a dataset probe needs at least 2 classes, got {list(classes)}")
    cv, k = _splitter(y, g, n_splits, seed)

    bal, auc, comps = [], [], []
    for train, test in cv.split(x, y, g):
        n_comp = int(max(1, min(pca_dim, len(train) - 1, x.shape[1])))
        model = make_probe(n_comp, seed=seed, class_weight=class_weight).fit(x[train], y[train])
        proba = model.predict_proba(x[test])
        pred = model.classes_[np.argmax(proba, axis=1)]
        bal.append(balanced_accuracy_score(y[test], pred))
        auc.append(_auc(y[test], proba, model.classes_))
        comps.append(n_comp)

    out: dict[str, Any] = {
        "balanced_accuracy_mean": float(np.mean(bal)),
        "balanced_accuracy_std": float(np.std(bal, ddof=1)),
        "roc_auc_mean": float(np.mean(auc)),
        "roc_auc_std": float(np.std(auc, ddof=1)),
        "balanced_accuracy_folds": [float(v) for v in bal],
        "roc_auc_folds": [float(v) for v in auc],
        "chance_balanced_accuracy": 1.0 / len(classes),
        "chance_roc_auc": 0.5,
        "classes": [str(c) for c in classes],
        "n_per_class": {str(c): int(np.sum(y == c)) for c in classes},
        "n_groups_per_class": ({str(c): int(len(np.unique(g[y == c]))) for c in classes} if g is not None else None),
        "n_total": int(len(y)),
        "n_splits": int(k),
        "pca_components": int(min(comps)),
        "p_value": float("nan"),
        "n_permutations": int(n_permutations),
    }
    if n_permutations > 0:
        out["p_value"] = _permutation_p(x, y, g, cv, pca_dim, seed, class_weight, n_permutations, out)
    return out


def _permutation_p(x, y, g, cv, pca_dim, seed, class_weight, n_permutations, out) -> float:
    """p-value of the mean balanced accuracy under shuffled labels.

    Without groups this is sklearn's permutation_test_score (sample labels shuffled). With
    groups, whole groups are relabelled (each group must carry one label), so the null keeps
    the correlation of samples within a group, as the real folds do.
    """
    from sklearn.model_selection import permutation_test_score

    n_train_min = min(len(tr) for tr, _ in cv.split(x, y, g))
    n_comp = int(max(1, min(pca_dim, n_train_min - 1, x.shape[1])))
    model = make_probe(n_comp, seed=seed, class_weight=class_weight)
    if g is None:
        _, _, p = permutation_test_score(
            model,
            x,
            y,
            cv=cv,
            n_permutations=n_permutations,
            scoring="balanced_accuracy",
            random_state=seed,
        )
        return float(p)
    # Grouped: permute labels across groups (each group carries one label), then re-run CV.
    rng = np.random.default_rng(seed)
    uniq = np.unique(g)
    if any(len(np.unique(y[g == u])) > 1 for u in uniq):
        raise ValueError("a group spans several labels; the grouped permutation test needs one label per group")
    group_label = np.array([y[g == u][0] for u in uniq])
    observed = out["balanced_accuracy_mean"]
    from sklearn.metrics import balanced_accuracy_score

    hits = 0
    for _ in range(n_permutations):
        mapping = dict(zip(uniq, rng.permutation(group_label)))
        yp = np.array([mapping[v] for v in g])
        scores = []
        for train, test in cv.split(x, yp, g):
            m = make_probe(n_comp, seed=seed, class_weight=class_weight).fit(x[train], yp[train])
            scores.append(balanced_accuracy_score(yp[test], m.predict(x[test])))
        hits += np.mean(scores) >= observed
    return float((1 + hits) / (1 + n_permutations))
