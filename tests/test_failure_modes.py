"""The rows of issue 11's table: hostile model files, interrupted writes, odd images, bad batches.

Everything runs offline on a random-weight resnet18 and 64 px generated images.
"""

import csv
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from skpatchcore.cli import fit as cli_fit
from skpatchcore.cli import main
from skpatchcore.io.images import UnreadableImageError

from _helpers import small_transformer

FAST = ["--backbone", "resnet18", "--weights", "none", "--resize", "64", "--no-crop",
        "--layers", "layer2", "layer3", "--quiet"]



def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _truncated_jpeg(source, target):
    """A JPEG whose header is intact but whose image data stops half-way."""
    buffer = io.BytesIO()
    Image.open(source).convert("RGB").save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    target.write_bytes(data[: len(data) // 2])
    return target


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------- rows 1-3, 5, 10: model files


@pytest.mark.parametrize("command", ["score", "evaluate"])
def test_malicious_pickle_is_refused_without_running_it(category, tmp_path, capsys, command):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "model.joblib"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    target = str(category / "test") if command == "score" else str(category)
    extra = ["-o", str(tmp_path / "out")] if command == "score" else []
    assert main([command, str(evil), target, *extra]) == 1
    err = capsys.readouterr().err
    assert "pickle" in err and "--allow-pickle" in err and "Traceback" not in err
    assert not marker.exists()


def test_cli_help_warns_about_pickles(capsys):
    assert main(["score", "--help"]) == 0
    assert "--allow-pickle" in capsys.readouterr().out


def test_corrupted_model_is_refused_by_the_cli(model_path, category, tmp_path, capsys):
    data = bytearray(model_path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)  # 4 kB zeroed, as in the issue
    broken = tmp_path / "broken.skpc"
    broken.write_bytes(bytes(data))
    assert main(["score", str(broken), str(category / "test"), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "checksum" in err and str(broken) in err


def test_joblib_suffix_writes_a_pickle_read_only_with_the_flag(category, tmp_path, capsys):
    path = tmp_path / "m.joblib"
    assert main(["fit", str(category / "train" / "good"), "-o", str(path), *FAST]) == 0
    assert path.read_bytes()[:1] == b"\x80"  # a pickle, as asked by the suffix
    out = tmp_path / "o"
    assert main(["score", str(path), str(category / "test" / "good"), "-o", str(out), "-q"]) == 1
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["score", str(path), str(category / "test" / "good"), "-o", str(out), "-q", "--allow-pickle"]) == 0


def test_unwritable_output_fails_before_the_fit(category, tmp_path, capsys, monkeypatch):
    def no_fit(*args, **kwargs):
        raise AssertionError("the fit started")

    monkeypatch.setattr(cli_fit, "fit_model", no_fit)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["fit", str(category / "train"), "-o", str(blocker / "sub" / "m.skpc"), *FAST]) == 1
    err = capsys.readouterr().err
    assert "not writable" in err and str(blocker) in err


# ---------------------------------------------------------------- row 4: batches


def test_batch_with_a_truncated_jpeg_scores_the_rest(model_path, category, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted((category / "test").rglob("*.png"))
    for i, path in enumerate(good):
        Image.open(path).save(folder / f"{i}.png")
    bad = _truncated_jpeg(good[0], folder / "9-truncated.jpg")
    out = tmp_path / "out"
    # A complete earlier run, with one heatmap that the new run does not produce.
    assert main(["score", str(model_path), str(folder / "0.png"), "-o", str(out), "-q"]) == 0
    (out / "heatmaps" / "stale.png").write_bytes(b"old")
    status = main(["score", str(model_path), str(folder), "-o", str(out), "--batch-size", "2"])
    assert status == 3
    captured = capsys.readouterr()
    assert f"1 of {len(good) + 1} images could not be read" in captured.err and str(bad) in captured.err
    rows = _rows(out / "scores.csv")
    assert len(rows) == len(good) + 1
    failed = [row for row in rows if row["error"]]
    assert [row["path"] for row in failed] == [str(bad)] and failed[0]["anomaly_score"] == ""
    assert all(float(row["anomaly_score"]) > 0 for row in rows if not row["error"])
    heatmaps = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert heatmaps == sorted(f"{i}.png" for i in range(len(good)))  # no stale.png, none for the bad file
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # staging folder removed


def test_fail_fast_keeps_the_previous_results(model_path, category, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["score", str(model_path), str(category / "test" / "good"), "-o", str(out), "-q"]) == 0
    before = (out / "scores.csv").read_bytes()
    heatmaps = sorted(p.name for p in (out / "heatmaps").iterdir())
    bad = _truncated_jpeg(category / "test" / "good" / "000.png", tmp_path / "bad.jpg")
    inputs = [str(category / "test" / "crack"), str(bad)]
    assert main(["score", str(model_path), *inputs, "-o", str(out), "--fail-fast", "-q"]) == 1
    assert str(bad) in capsys.readouterr().err
    assert (out / "scores.csv").read_bytes() == before
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == heatmaps


def test_evaluate_leaves_unreadable_images_out_of_the_metrics(model_path, category, tmp_path, capsys):
    import shutil

    copy = tmp_path / "parts"
    shutil.copytree(category, copy)
    bad = copy / "test" / "good" / "000.png"
    bad.write_bytes(bad.read_bytes()[:100])  # header only
    out = tmp_path / "eval"
    assert main(["evaluate", str(model_path), str(copy), "-o", str(out), "--heatmaps"]) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_unreadable"] == 1 and metrics["unreadable"][0]["path"] == str(bad)
    assert metrics["n_test_images"] == 5 and metrics["image_auroc"] is not None
    rows = _rows(out / "scores.csv")
    assert [row["path"] for row in rows if row["error"]] == [str(bad)]
    assert len(list((out / "heatmaps").iterdir())) == 4
    assert "could not be read" in capsys.readouterr().err


# ---------------------------------------------------------------- rows 6-8: images


def _grey_picture(size=96):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size]
    picture = 120 + 60 * np.sin(x / 7.0) * np.cos(y / 11.0) + rng.normal(0, 8, (size, size))
    picture[40:50, 30:70] = 250  # a bright defect
    return np.clip(picture, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def grey_transformer():
    return small_transformer().fit()


def test_16_bit_and_8_bit_versions_score_within_1e_4(tmp_path):
    from skpatchcore import make_patchcore

    def save_pair(picture, stem):
        Image.fromarray(picture).save(tmp_path / f"{stem}-8.png")
        Image.fromarray(picture.astype(np.uint16) * 257).save(tmp_path / f"{stem}-16.png")  # 255 -> 65535
        return str(tmp_path / f"{stem}-8.png"), str(tmp_path / f"{stem}-16.png")

    train_16 = [save_pair(np.roll(_grey_picture(64), 5 * k, axis=1), f"train{k}")[1] for k in range(4)]
    with Image.open(train_16[0]) as opened:
        assert opened.mode.startswith("I;16")
    model = make_patchcore(backbone="resnet18", weights=None, resize=64, crop_size=None, random_state=0)
    model.fit(train_16)  # a training set of 16-bit files fits

    # At the model's input size: the same pixels up to float rounding.
    eight, sixteen = save_pair(_grey_picture(64), "same-size")
    scores = model.score_samples([eight, sixteen, _grey_picture(64).astype(np.uint16) * 257])
    np.testing.assert_allclose(scores[1:], scores[0], rtol=1e-4, atol=0)
    # Resized 96 -> 64 px: PIL rounds the resized 8-bit picture to 8 bits, the 16-bit one is
    # resized in float, so the two differ by that rounding (about 1e-4 relative).
    eight, sixteen = save_pair(_grey_picture(96), "resized")
    resized = model.score_samples([eight, sixteen])
    np.testing.assert_allclose(resized[1], resized[0], rtol=5e-4, atol=0)
    # Before the fix every 16-bit pixel read as 255: a white image.
    white = model.score_samples([np.full((64, 64), 255, np.uint8)])
    assert abs(white[0] - scores[0]) > 1e-2


@pytest.mark.parametrize("mode, scale", [("I", 65535), ("F", 1.0)])
def test_32_bit_files_are_scaled_by_their_range(grey_transformer, tmp_path, mode, scale):
    eight = _grey_picture(64)
    Image.fromarray(eight).save(tmp_path / "8.png")
    values = (eight.astype(np.float64) / 255.0 * scale).astype(np.int32 if mode == "I" else np.float32)
    Image.fromarray(values, mode=mode).save(tmp_path / "32.tif")
    expected = grey_transformer._preprocess(str(tmp_path / "8.png"))
    np.testing.assert_allclose(grey_transformer._preprocess(str(tmp_path / "32.tif")), expected, atol=2e-5)


def test_float_file_outside_unit_range_is_refused_by_name(grey_transformer, tmp_path):
    Image.fromarray(np.full((8, 8), 300.0, np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(UnreadableImageError, match=r"f\.tif.*\[0, 1\]"):
        grey_transformer._preprocess(str(tmp_path / "f.tif"))


def test_exif_orientation_is_applied_unless_turned_off(tmp_path):
    picture = np.zeros((48, 64, 3), np.uint8)
    picture[:, :16] = 255  # a white band on the left
    upright = np.rot90(picture, k=-1)  # what a viewer shows for orientation 6 (rotate 90 degrees clockwise)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(picture).save(tmp_path / "rotated.png", exif=exif)
    Image.fromarray(np.ascontiguousarray(upright)).save(tmp_path / "upright.png")
    on = small_transformer(resize=32).fit()
    off = small_transformer(resize=32, exif_transpose=False).fit()
    np.testing.assert_array_equal(on._preprocess(str(tmp_path / "rotated.png")),
                                  on._preprocess(str(tmp_path / "upright.png")))
    assert not np.allclose(off._preprocess(str(tmp_path / "rotated.png")),
                           off._preprocess(str(tmp_path / "upright.png")))
    from skpatchcore.io.images import image_size

    assert image_size(str(tmp_path / "rotated.png")) == (64, 48)
    assert image_size(str(tmp_path / "rotated.png"), exif_transpose=False) == (48, 64)


def test_decompression_bomb_names_the_file_and_the_limit_can_be_raised(grey_transformer, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    path = tmp_path / "huge.png"
    Image.new("L", (300, 200)).save(path)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 20_000)  # 60,000 pixels: over 2x the limit
    with pytest.raises(UnreadableImageError, match=r"huge\.png.*MAX_IMAGE_PIXELS.*--max-image-pixels"):
        grey_transformer._preprocess(str(path))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 50_000)  # between 1x and 2x: PIL only warns
    with pytest.warns(PILImage.DecompressionBombWarning), pytest.raises(UnreadableImageError, match="huge.png"):
        grey_transformer._preprocess(str(path))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", None)
    assert grey_transformer._preprocess(str(path)).shape == (3, 64, 64)


def test_cli_max_image_pixels(model_path, category, tmp_path, capsys, monkeypatch):
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", PILImage.MAX_IMAGE_PIXELS)  # restored afterwards
    image = str(category / "test" / "good" / "000.png")  # 64 x 64
    out = str(tmp_path / "o")
    assert main(["score", str(model_path), image, "-o", out, "-q", "--max-image-pixels", "1000"]) == 3
    assert "--max-image-pixels" in capsys.readouterr().err
    assert main(["score", str(model_path), image, "-o", out, "-q", "--max-image-pixels", "0"]) == 0
