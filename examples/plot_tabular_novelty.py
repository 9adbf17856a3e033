"""
Tabular novelty detection: PatchCore next to LOF and Isolation Forest
=====================================================================

On 2-D input ``(n_samples, n_features)`` every row is one sample, and
:class:`~skpatchcore.CoresetSampler` followed by
:class:`~skpatchcore.PatchCoreDetector` is a k-nearest-neighbour novelty
detector whose memory bank is a greedy k-center coreset of the training rows.

Here each digit of scikit-learn's :func:`~sklearn.datasets.load_digits` in
turn is the *normal* class: the detectors are fitted on half of its images
and must rank the other half (normal) below the images of every other digit
(novel). We compare PatchCore (10% coreset) with
:class:`~sklearn.neighbors.LocalOutlierFactor` (``novelty=True``) and
:class:`~sklearn.ensemble.IsolationForest` by ROC AUC, where the anomaly
score is ``-score_samples`` for all three (scikit-learn's convention: higher
``score_samples`` means more normal).
"""

# %%
# The data and the three detectors
# --------------------------------
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import LocalOutlierFactor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skpatchcore import CoresetSampler, PatchCoreDetector

X, digit = load_digits(return_X_y=True)
rng = np.random.default_rng(0)


def make_detectors():
    """A fresh instance of each detector, by name."""
    return {
        "PatchCore (10% coreset)": Pipeline([
            ("scale", StandardScaler()),
            ("coreset", CoresetSampler(sampling_ratio=0.1, random_state=0)),
            ("detector", PatchCoreDetector(n_neighbors=1, random_state=0)),
        ]),
        "LOF (novelty=True)": Pipeline([
            ("scale", StandardScaler()),
            ("detector", LocalOutlierFactor(n_neighbors=20, novelty=True)),
        ]),
        "Isolation Forest": IsolationForest(n_estimators=100, random_state=0),
    }


# %%
# One novelty-detection task per digit
# ------------------------------------
# Fit on half of the normal digit's images; test on the other half plus 50
# images drawn from each of the other nine digits.
names = list(make_detectors())
auc = {name: [] for name in names}
for normal_digit in range(10):
    normal = rng.permutation(np.flatnonzero(digit == normal_digit))
    train, held_out = normal[: len(normal) // 2], normal[len(normal) // 2:]
    novel = np.concatenate([rng.choice(np.flatnonzero(digit == other), 50, replace=False)
                            for other in range(10) if other != normal_digit])
    test = np.concatenate([held_out, novel])
    is_novel = np.r_[np.zeros(len(held_out)), np.ones(len(novel))]
    for name, detector in make_detectors().items():
        detector.fit(X[train])
        auc[name].append(roc_auc_score(is_novel, -detector.score_samples(X[test])))

print(f"{'normal digit':>14}" + "".join(f"{name:>26}" for name in names))
for normal_digit in range(10):
    print(f"{normal_digit:>14}" + "".join(f"{auc[name][normal_digit]:>26.3f}" for name in names))
print(f"{'mean':>14}" + "".join(f"{np.mean(auc[name]):>26.3f}" for name in names))

# %%
# PatchCore here is a 1-nearest-neighbour distance to a bank of only 10% of
# the training rows, while LOF keeps every row and Isolation Forest needs no
# distances at all; raise ``sampling_ratio`` (up to 1.0, every row) to trade
# memory and scoring time for coverage of the normal class, and see
# :ref:`sphx_glr_auto_examples_plot_grid_search_coreset.py` for choosing it
# by cross-validation.
#
# The memory bank keeps 10% of the training rows; the detector's threshold
# (``offset_``) was calibrated by leaving single bank rows out, so
# ``predict`` flags rows farther from the bank than any held-out bank row.
patchcore = make_detectors()["PatchCore (10% coreset)"].fit(X[digit == 0])
print("bank:", patchcore[-1].memory_bank_.shape, "of", (digit == 0).sum(), "training rows")
print("predicted normal among the other digits:", np.mean(patchcore.predict(X[digit != 0]) == 1))

# %%
# ROC AUC per normal digit
# ------------------------
figure, axis = plt.subplots(figsize=(7, 3.5), layout="constrained")
width = 0.27
for offset, name in enumerate(names):
    axis.bar(np.arange(10) + (offset - 1) * width, auc[name], width, label=name)
axis.set(xlabel="normal digit", ylabel="ROC AUC", xticks=range(10), ylim=(0.5, 1.0))
axis.legend(loc="lower right", fontsize="small")
plt.show()
