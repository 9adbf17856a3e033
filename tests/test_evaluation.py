"""skpatchcore.evaluation: metrics and per-image scores of a fitted model on a test set."""

import numpy as np
import pytest

import skpatchcore
from skpatchcore.evaluation import evaluate, evaluate_model, format_metrics, masks_at_map_geometry
from skpatchcore.io.datasets import load_mvtec

pd = pytest.importorskip("pandas")

METRIC_KEYS = {
    "category", "n_test_images", "n_anomalous", "image_auroc", "pixel_auroc", "aupro", "aupro_fpr_limit",
    "image_auroc_per_defect", "threshold", "n_predicted_anomalous", "accuracy", "map_size", "seconds",
    "n_unreadable", "unreadable",
}
COLUMNS = ["path", "defect_type", "label", "score_samples", "decision_function", "prediction", "error"]


@pytest.fixture(scope="module")
def model(model_path):
    return skpatchcore.load(model_path)


@pytest.fixture(scope="module")
def data(category):
    return load_mvtec(category)


def test_evaluate_an_mvtec_folder(model, data):
    metrics, scores = evaluate(model, data)
    assert set(metrics) == METRIC_KEYS
    assert metrics["category"] == "parts" and metrics["n_test_images"] == len(data.test_images) == 5
    assert metrics["n_anomalous"] == 3 and metrics["n_unreadable"] == 0 and metrics["unreadable"] == []
    for key in ("image_auroc", "pixel_auroc", "aupro", "accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["image_auroc_per_defect"]) == set(data.test_defect_types) - {"good"}
    assert metrics["map_size"] == [64, 64]

    assert list(scores.columns) == COLUMNS and len(scores) == len(data.test_images)
    assert scores["path"].tolist() == data.test_images
    assert scores["defect_type"].tolist() == data.test_defect_types
    assert scores["label"].tolist() == data.test_labels.tolist()
    np.testing.assert_allclose(scores["score_samples"], model.score_samples(data.test_images), rtol=1e-6)
    np.testing.assert_allclose(scores["decision_function"], model.decision_function(data.test_images), rtol=1e-6)
    assert scores["prediction"].tolist() == model.predict(data.test_images).tolist()
    assert scores["error"].isna().all()
    assert (metrics["n_predicted_anomalous"] == (scores["prediction"] == -1).sum())


def test_evaluate_model_gives_the_same_metrics(model, data, tmp_path):
    metrics, _ = evaluate(model, data)
    written = evaluate_model(model, data, output=tmp_path, extra={"note": "x"})
    assert written.pop("note") == "x"
    for key in METRIC_KEYS - {"seconds"}:
        assert written[key] == metrics[key], key
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "scores.csv").is_file()
    assert "image AUROC" in format_metrics(written)


def test_lists_of_images_labels_and_masks(model, data):
    metrics, scores = evaluate(
        model, images=data.test_images, labels=data.test_labels, masks=data.test_masks,
        defect_types=data.test_defect_types,
    )
    reference, _ = evaluate(model, data)
    assert metrics["category"] is None
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_auroc_per_defect", "accuracy"):
        assert metrics[key] == reference[key]
    assert len(scores) == len(data.test_images)


def test_perfect_separation_gives_auroc_one(model, data):
    images = data.test_images
    anomaly = -model.score_samples(images)
    labels = (anomaly >= np.sort(anomaly)[-2]).astype(int)  # the two highest scores are "defects"
    metrics, scores = evaluate(model, images=images, labels=labels)
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None  # no masks
    assert metrics["image_auroc_per_defect"] == {}
    assert scores["label"].tolist() == labels.tolist()


def test_masks_of_the_wrong_size_are_refused(model, data):
    masks = [None if mask is None else np.ones((10, 12), dtype=bool) for mask in data.test_masks]
    with pytest.raises(ValueError, match=r"masks\[\d\] has size 10x12 but its image .* is 64x64"):
        evaluate(model, images=data.test_images, labels=data.test_labels, masks=masks)


def test_array_masks_at_the_image_size(model, data):
    from skpatchcore.io.images import read_mask

    arrays = [None if mask is None else read_mask(mask) for mask in data.test_masks]
    metrics, _ = evaluate(model, images=data.test_images, labels=data.test_labels, masks=arrays)
    reference, _ = evaluate(model, data)
    assert metrics["pixel_auroc"] == reference["pixel_auroc"] and metrics["aupro"] == reference["aupro"]


@pytest.mark.parametrize("kwargs, message", [
    ({"labels": [0, 1]}, "images and labels"),
    ({"images": ["a.png", "b.png"], "labels": [0, 1, 1]}, "one label per image"),
    ({"images": ["a.png", "b.png"], "labels": [0, 2]}, "0 \\(normal\\) or 1"),
    ({"images": ["a.png", "b.png"], "labels": [0, 1], "masks": [None]}, "1 masks for 2 images"),
])
def test_invalid_inputs(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate(model, **kwargs)


def test_data_and_lists_are_exclusive(model, data):
    with pytest.raises(ValueError, match="not both"):
        evaluate(model, data, labels=data.test_labels)


def test_unreadable_images_get_an_error_row(model, data, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    images = [*data.test_images, str(bad)]
    labels = [*data.test_labels.tolist(), 1]
    metrics, scores = evaluate(model, images=images, labels=labels)
    assert metrics["n_unreadable"] == 1 and metrics["unreadable"][0]["path"] == str(bad)
    assert len(scores) == len(images)
    row = scores.iloc[-1]
    assert np.isnan(row["score_samples"]) and pd.isna(row["prediction"]) and "broken.png" in row["error"]
    with pytest.raises(Exception, match="broken.png"):
        evaluate(model, images=images, labels=labels, fail_fast=True)


def test_masks_follow_the_transformer_geometry_and_image_size(tmp_path):
    class Square:
        resize_, crop_size_, input_size_ = 8, None, (8, 8)

    mask = np.zeros((16, 32), dtype=bool)
    mask[:, :8] = True
    assert masks_at_map_geometry(Square, [mask])[0][:, :2].all()
    with pytest.raises(ValueError, match="1 masks for 2 images"):
        masks_at_map_geometry(Square, [mask], [np.zeros((16, 32, 3)), np.zeros((16, 32, 3))])
    with pytest.raises(ValueError, match="size 16x32 but its image is 16x16"):
        masks_at_map_geometry(Square, [mask], [np.zeros((16, 16, 3))])
