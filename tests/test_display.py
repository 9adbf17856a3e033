"""Display objects (scikit-learn's Display API), drawn with matplotlib's Agg backend."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from skpatchcore import AnomalyMapDisplay, AnomalyRocDisplay, make_patchcore  # noqa: E402
from skpatchcore.evaluation.figures import new_figure  # noqa: E402


@pytest.fixture
def mask():
    truth = np.zeros((48, 80), dtype=np.uint8)
    truth[12:28, 40:60] = 255
    return truth


@pytest.fixture(scope="module")
def fitted(synthetic):
    return make_patchcore(backbone="resnet18", weights=None, resize=96, crop_size=None, sampling_ratio=0.25,
                          random_state=0).fit(synthetic.train_images[:8])


# ------------------------------------------------------------- anomaly maps
def test_anomaly_map_display_from_predictions(image, hot_map, mask):
    display = AnomalyMapDisplay.from_predictions(image, hot_map, mask=mask, anomaly_score=1.5, vmin=0.0, vmax=10.0)
    assert display.ax_.figure is display.figure_
    assert len(display.ax_.images) == 2
    assert display.ax_.images[0] is display.image_ and display.ax_.images[1] is display.overlay_
    assert display.overlay_.get_array().shape == image.shape[:2]  # resized to the image
    assert display.overlay_.get_clim() == (0.0, 10.0)
    assert display.contour_ is not None and len(display.contour_.allsegs[0]) == 1  # one outlined region
    assert display.colorbar_ is not None
    assert "1.5" in display.ax_.get_title()


def test_anomaly_map_display_plot_on_given_axes(image, hot_map):
    display = AnomalyMapDisplay(image, hot_map)
    ax = new_figure(4, 4).add_subplot()
    assert display.plot(ax=ax, colorbar=False) is display
    assert display.ax_ is ax and display.contour_ is None and display.colorbar_ is None
    np.testing.assert_array_equal(display.image_.get_array(), image)


def test_anomaly_map_display_from_estimator(fitted, synthetic):
    image = synthetic.test_images[-1]
    mask = synthetic.test_masks[-1]
    display = AnomalyMapDisplay.from_estimator(fitted, image, mask=mask)
    scores, maps = fitted.score_and_maps([image], original_size=True)
    assert display.anomaly_score == pytest.approx(-scores[0])
    np.testing.assert_allclose(display.overlay_.get_array(), maps[0])
    assert display.contour_ is not None


def test_anomaly_map_display_from_estimator_with_a_crop(synthetic):
    cropped = make_patchcore(backbone="resnet18", weights=None, resize=80, crop_size=64, random_state=0)
    cropped.fit(synthetic.train_images[:4])
    display = AnomalyMapDisplay.from_estimator(cropped, synthetic.test_images[-1], mask=synthetic.test_masks[-1])
    # Drawn over the image as the backbone sees it.
    assert display.image_.get_array().shape == (64, 64, 3)
    assert display.overlay_.get_array().shape == (64, 64)


def test_anomaly_map_display_needs_a_pipeline(image):
    from skpatchcore import PatchCoreDetector

    with pytest.raises(TypeError, match="from_predictions"):
        AnomalyMapDisplay.from_estimator(PatchCoreDetector(), image)


# ------------------------------------------------------------------- ROC
def test_roc_display_image_level_equals_sklearn():
    y = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    display = AnomalyRocDisplay.from_predictions(y, scores, name="model")
    fpr, tpr, _ = roc_curve(y, scores)
    assert display.axes_.shape == (1,) and display.lines_.shape == (1,)
    np.testing.assert_array_equal(display.lines_[0].get_xdata(), fpr)
    np.testing.assert_array_equal(display.lines_[0].get_ydata(), tpr)
    assert display.image_auroc == pytest.approx(roc_auc_score(y, scores))
    assert display.figure_ is display.axes_[0].figure
    assert "model (image)" in display.lines_[0].get_label()


def test_roc_display_pixel_level_pools_pixels(rng):
    masks = [np.zeros((8, 8), dtype=bool) for _ in range(3)]
    masks[1][2:5, 2:5] = True
    masks[2][0:3, 5:8] = True
    maps = [rng.random((8, 8)) + 0.5 * m for m in masks]
    display = AnomalyRocDisplay.from_predictions([0, 1, 1], [0.1, 0.7, 0.6], masks=masks, maps=maps)
    labels = np.concatenate([m.ravel() for m in masks])
    pixels = np.concatenate([a.ravel() for a in maps])
    fpr, tpr, _ = roc_curve(labels, pixels.astype(np.float32))
    assert display.axes_.shape == (2,) and len(display.roc_displays_) == 2
    np.testing.assert_allclose(display.lines_[1].get_xdata(), fpr)
    np.testing.assert_allclose(display.lines_[1].get_ydata(), tpr)
    assert display.pixel_auroc == pytest.approx(roc_auc_score(labels, pixels), abs=1e-6)
    # Each axes holds its curve and the chance line.
    assert [len(ax.lines) for ax in display.axes_] == [2, 2]


def test_roc_display_plot_on_given_axes_and_errors(rng):
    figure = new_figure(8, 4)
    axes = figure.subplots(1, 2)
    masks = [np.eye(4, dtype=bool), np.zeros((4, 4), dtype=bool)]
    maps = [rng.random((4, 4)) for _ in masks]
    display = AnomalyRocDisplay.from_predictions([1, 0], [0.9, 0.1], masks=masks, maps=maps, ax=axes)
    assert list(display.axes_) == list(axes)
    with pytest.raises(ValueError, match="2 axes"):
        display.plot(ax=axes[0])
    with pytest.raises(ValueError, match="equal shapes"):
        AnomalyRocDisplay.from_predictions([1, 0], [0.9, 0.1], masks=masks, maps=[m[:2] for m in maps])
    with pytest.raises(ValueError, match="both masks and maps"):
        AnomalyRocDisplay.from_predictions([1, 0], [0.9, 0.1], masks=masks)


def test_roc_display_from_estimator(fitted, synthetic):
    images = synthetic.test_images
    display = AnomalyRocDisplay.from_estimator(fitted, images, synthetic.test_labels, masks=synthetic.test_masks)
    scores, maps = fitted.score_and_maps(images)
    fpr, tpr, _ = roc_curve(synthetic.test_labels, -scores)
    np.testing.assert_allclose(display.image_fpr, fpr)
    np.testing.assert_allclose(display.image_tpr, tpr)
    pooled_auroc = roc_auc_score(np.concatenate([m.ravel() for m in synthetic.test_masks]) != 0, maps.ravel())
    assert display.pixel_auroc == pytest.approx(pooled_auroc, abs=1e-6)
