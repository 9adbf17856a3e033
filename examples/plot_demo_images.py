"""
Images end to end: scores and an anomaly map
============================================

The full image pipeline of :func:`~skpatchcore.make_patchcore` on the
synthetic surface-defect images that ``skpatchcore demo`` uses
(:func:`skpatchcore.synthetic.make_synthetic_defects`, generated in memory).
To run offline and fast, the backbone is a ResNet-18 with *random* weights
(``weights=None``) on 96 x 96 inputs; with ImageNet weights (the default,
``wide_resnet50_2``) the scores separate much better, see :doc:`/quickstart`.
"""

# %%
# Data: normal training images, good and defective test images
# -------------------------------------------------------------
import matplotlib.pyplot as plt
import numpy as np

from skpatchcore import make_patchcore
from skpatchcore.evaluation.figures import plot_triptych
from skpatchcore.evaluation.metrics import image_auroc, pixel_auroc
from skpatchcore.synthetic import make_synthetic_defects

data = make_synthetic_defects(n_train=12, n_test_good=4, n_test_defect=6, image_size=96, random_state=0)
print("train:", data.train_images.shape, " test:", data.test_images.shape)
print("test images:", data.test_defect_types)

# %%
# Fit on the normal images only
# -----------------------------
# ``crop_size=None`` resizes every image to 96 x 96 without a centre crop,
# so the anomaly maps cover whole images.
model = make_patchcore(backbone="resnet18", weights=None, resize=96, crop_size=None,
                       sampling_ratio=0.1, random_state=0, device="cpu")
model.fit(data.train_images)
print("patch grid and feature size:", model.named_steps["features"].feature_shape_)
print("memory bank:", model.named_steps["detector"].memory_bank_.shape)

# %%
# Scores and maps in one pass
# ---------------------------
# ``score_samples`` is higher for normal images (scikit-learn's convention);
# the PatchCore anomaly score is its negative. ``predict`` flags images
# whose score exceeds the threshold calibrated on held-out training images.
normality, maps = model.score_and_maps(data.test_images)
anomaly_score = -normality
for kind, score, label in zip(data.test_defect_types, anomaly_score, model.predict(data.test_images)):
    print(f"{kind:>8}  anomaly score {score:7.3f}  predicted {'normal' if label == 1 else 'anomalous'}")
print(f"image AUROC {image_auroc(data.test_labels, anomaly_score):.3f}, "
      f"pixel AUROC {pixel_auroc(data.test_masks, maps):.3f}")

# %%
# The anomaly map of the most anomalous test image
# ------------------------------------------------
# Image, map and ground-truth mask; the map is the patch distances upsampled
# to the input size and smoothed.
worst = int(np.argmax(anomaly_score))
figure = plot_triptych(data.test_images[worst], maps[worst], mask=data.test_masks[worst],
                       score=anomaly_score[worst], title=data.test_defect_types[worst])
plt.show()
