"""
Reading conformal p-values
==========================

:meth:`PatchCoreDetector.pvalues <skpatchcore.PatchCoreDetector.pvalues>`
turns an anomaly score into a p-value against the detector's held-out
calibration scores: ``(1 + #{calibration >= s}) / (n + 1)``. A small p-value
says the sample is unlikely to be normal. If new normal samples and the
calibration samples are exchangeable, flagging ``p <= alpha`` flags at most a
fraction ``alpha`` of normal samples, whatever the data: the threshold has a
meaning without any labelled defect.

Here the digit 0 of scikit-learn's :func:`~sklearn.datasets.load_digits` is
normal; the detector is fitted on half of the zeros and scores the other half
and a sample of the other digits.
"""

# %%
# Fit on normal rows, compute p-values of new rows
# ------------------------------------------------
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skpatchcore import CoresetSampler, PatchCoreDetector

X, digit = load_digits(return_X_y=True)
rng = np.random.default_rng(0)
zeros = rng.permutation(np.flatnonzero(digit == 0))
others = rng.choice(np.flatnonzero(digit != 0), 90, replace=False)
train, normal_test = zeros[: len(zeros) // 2], zeros[len(zeros) // 2:]

model = Pipeline([
    ("scale", StandardScaler()),
    ("coreset", CoresetSampler(sampling_ratio=0.5, random_state=0)),
    ("detector", PatchCoreDetector(random_state=0)),
]).fit(X[train])
detector = model[-1]
scaled = model[:-1]
normal_p = detector.pvalues(scaled.transform(X[normal_test]))
novel_p = detector.pvalues(scaled.transform(X[others]))
print(f"{len(detector.calibration_scores_)} calibration scores; smallest possible p-value "
      f"{1 / (len(detector.calibration_scores_) + 1):.3f}")

# %%
# What a threshold on the p-value does
# ------------------------------------
# The fraction of normal samples flagged stays near or below ``alpha`` (the
# calibration rows are scored without themselves, so if anything the
# p-values are conservative); the fraction of other digits flagged is the
# detection rate at that false-alarm level.
for alpha in (0.01, 0.05, 0.1, 0.2):
    print(f"alpha = {alpha:4.2f}: normal flagged {np.mean(normal_p <= alpha):5.1%}, "
          f"other digits flagged {np.mean(novel_p <= alpha):5.1%}")

# %%
# The p-values of normal samples spread over (0, 1]; those of novel samples
# pile up at the smallest values.
fig, ax = plt.subplots(figsize=(6, 3.5))
bins = np.linspace(0, 1, 21)
ax.hist(normal_p, bins=bins, alpha=0.7, label="held-out zeros (normal)")
ax.hist(novel_p, bins=bins, alpha=0.7, label="other digits (novel)")
ax.set_xlabel("conformal p-value")
ax.set_ylabel("samples")
ax.legend()
fig.tight_layout()
plt.show()
