"""The safe model format (skpatchcore.save / load) and atomic writes."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import joblib
import numpy as np
import pytest
import torch

import skpatchcore
from skpatchcore import CorruptModelError, IncompatibleModelError, PatchCoreDetector, make_patchcore
from skpatchcore.io import model_file as persistence
from skpatchcore.io.atomic import atomic_write, check_writable_file

from _helpers import rewrite_model_file


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def fitted(images):
    model = make_patchcore(backbone="resnet18", weights=None, resize=64, crop_size=None, random_state=0,
                           sampling_ratio=0.5).fit(images[:4])
    # Unseeded from here on: load rebuilds the backbone with other random weights, so only the
    # saved state dict can make the loaded model score identically.
    return model.set_params(features__random_state=None)


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    return skpatchcore.save(fitted, tmp_path_factory.mktemp("safe") / "model.skpc")


_rewrite = rewrite_model_file


def test_save_leaves_the_live_backbone_where_it_is(fitted, tmp_path, monkeypatch):
    """Saving checks the stored graph on a CPU copy: the live network is never moved (e.g. off a GPU)."""
    network = fitted[0].backbone_
    parameters = list(network.parameters())
    assert isinstance(network, torch.fx.GraphModule)  # the traced graph, whose rebuild save checks

    def refuse(*args, **kwargs):
        raise AssertionError("save moved the live backbone")

    monkeypatch.setattr(type(network), "to", refuse)
    monkeypatch.setattr(type(network), "cpu", refuse)
    path = skpatchcore.save(fitted, tmp_path / "model.skpc")
    monkeypatch.undo()
    assert fitted[0].backbone_ is network
    assert all(a is b for a, b in zip(network.parameters(), parameters))
    assert _backbone_entry(_saved_description(path))["graph"] is not None  # verified and kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_saving_a_model_on_the_gpu_leaves_it_there(images, tmp_path):
    model = make_patchcore(backbone="resnet18", weights=None, resize=64, crop_size=None, random_state=0,
                           sampling_ratio=0.5, device="cuda").fit(images[:4])
    assert next(model[0].backbone_.parameters()).device.type == "cuda"
    skpatchcore.save(model, tmp_path / "model.skpc")
    assert next(model[0].backbone_.parameters()).device.type == "cuda"


def test_round_trip_scores_bit_identically(fitted, saved, images):
    loaded = skpatchcore.load(saved)
    expected_scores, expected_maps = fitted.score_and_maps(images)
    scores, maps = loaded.score_and_maps(images)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(maps, expected_maps)
    np.testing.assert_array_equal(loaded.predict(images), fitted.predict(images))
    assert loaded.get_params(deep=True).keys() == fitted.get_params(deep=True).keys()
    features = loaded[0]
    assert features.layers == ("layer2", "layer3") and features.mean == "auto" and isinstance(features.mean_, tuple)
    assert features.input_size_ == (64, 64) and isinstance(features.feature_shape_, tuple)
    assert loaded[-1].offset_ == fitted[-1].offset_ and type(loaded[-1].offset_) is float
    assert loaded[1].coreset_indices_.dtype == fitted[1].coreset_indices_.dtype


def test_fresh_process_loads_without_torchvision_and_scores_identically(fitted, saved, images, tmp_path):
    np.save(tmp_path / "images.npy", images)
    code = (
        "import sys, numpy as np, skpatchcore;"
        f"m = skpatchcore.load({str(saved)!r});"
        "assert 'torchvision' not in sys.modules, 'torchvision imported';"
        f"np.save({str(tmp_path / 'scores.npy')!r}, m.score_samples(np.load({str(tmp_path / 'images.npy')!r})))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), fitted.score_samples(images))


def _backbone_entry(description):
    return description["estimator"]["steps"][0][1]["fitted"]["backbone_"]


def _saved_description(path):
    """The JSON description of the model in a saved file."""
    data = path.read_bytes()
    return json.loads(json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]["model"])


def test_timm_efficientnet_graph_round_trips(images, tmp_path):
    pytest.importorskip("timm")
    model = make_patchcore("timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights=None, resize=64,
                           crop_size=None, random_state=0).fit(images[:3])
    model.set_params(features__random_state=None)  # the by-name rebuild could not reproduce the weights
    path = skpatchcore.save(model, tmp_path / "lite0.skpc")
    graph = _backbone_entry(_saved_description(path))["graph"]
    assert graph is not None and "Sequential" in {m["class"] for m in graph["modules"].values()}
    loaded = skpatchcore.load(path)
    np.testing.assert_array_equal(loaded.score_samples(images), model.score_samples(images))


def test_backbone_without_graph_is_rebuilt_by_name(fitted, saved, images, tmp_path):
    def drop_graph(metadata, description):
        assert _backbone_entry(description)["graph"] is not None  # resnet18 is described as a graph
        _backbone_entry(description)["graph"] = None

    loaded = skpatchcore.load(_rewrite(saved, tmp_path / "by-name.skpc", drop_graph))
    np.testing.assert_array_equal(loaded.score_samples(images), fitted.score_samples(images))


@pytest.mark.parametrize("change, match", [
    (lambda node: node.update(op="call_function", target="os.system"), "os.system"),
    (lambda node: node.update(op="call_method", target="__reduce__"), "__reduce__"),
    (lambda node: node.update(op="call_module", target="__class__"), "__class__"),
])
def test_graph_outside_the_allow_lists_is_refused(saved, tmp_path, change, match):
    def edit(metadata, description):
        nodes = _backbone_entry(description)["graph"]["nodes"]
        change(next(node for node in nodes if node["op"] == "call_module"))

    with pytest.raises(IncompatibleModelError, match=match):
        skpatchcore.load(_rewrite(saved, tmp_path / "edited.skpc", edit))


def test_graph_module_classes_are_allow_listed(saved, tmp_path):
    def edit(metadata, description):
        modules = _backbone_entry(description)["graph"]["modules"]
        modules[next(iter(modules))] = {"class": "Module", "arguments": {}}

    with pytest.raises(IncompatibleModelError, match="'Module' is not allowed"):
        skpatchcore.load(_rewrite(saved, tmp_path / "edited.skpc", edit))


def test_any_public_fitted_attribute_round_trips(tmp_path):
    detector = PatchCoreDetector(random_state=0).fit(np.random.default_rng(0).normal(size=(30, 4)))
    detector.bank_image_index_ = np.arange(30, dtype=np.int32)  # attributes a later version may add
    detector.n_images_seen_ = np.int64(7)
    detector.n_rows_seen_ = 30
    detector.extra_ = (1, "two", None, [3.5, float("nan")], {"k": (4,)})
    detector.names_ = np.array(["a", "bc"], dtype=object)
    detector._private_cache = object()  # private: a cache, skipped
    loaded = skpatchcore.load(skpatchcore.save(detector, tmp_path / "d.skpc"))
    np.testing.assert_array_equal(loaded.bank_image_index_, detector.bank_image_index_)
    assert loaded.bank_image_index_.dtype == np.int32
    assert loaded.n_images_seen_ == 7 and type(loaded.n_images_seen_) is np.int64
    assert loaded.n_rows_seen_ == 30
    assert loaded.extra_[:3] == (1, "two", None) and np.isnan(loaded.extra_[3][1])
    assert loaded.extra_[4] == {"k": (4,)}
    assert list(loaded.names_) == ["a", "bc"]
    assert not hasattr(loaded, "_private_cache")
    np.testing.assert_array_equal(loaded.score_samples(np.ones((2, 4))), detector.score_samples(np.ones((2, 4))))


def test_unknown_pipeline_params_are_tolerated_step_params_refused(saved, tmp_path):
    def add_pipeline_param(metadata, description):
        description["estimator"]["params"]["working_memory"] = 256

    loaded = skpatchcore.load(_rewrite(saved, tmp_path / "a.skpc", add_pipeline_param))
    assert loaded[-1].memory_bank_.shape[0] > 0

    def add_step_param(metadata, description):
        description["estimator"]["steps"][2][1]["params"]["new_knob"] = 1

    with pytest.raises(IncompatibleModelError, match="new_knob"):
        skpatchcore.load(_rewrite(saved, tmp_path / "b.skpc", add_step_param))


def test_versions_are_checked(saved, tmp_path):
    def newer_file(metadata, description):
        metadata["format_version"] = "99"

    with pytest.raises(IncompatibleModelError, match="file format 99"):
        skpatchcore.load(_rewrite(saved, tmp_path / "a.skpc", newer_file))

    def other_model_format(metadata, description):
        description["model_format"] = 999

    with pytest.raises(IncompatibleModelError, match="model format 999"):
        skpatchcore.load(_rewrite(saved, tmp_path / "b.skpc", other_model_format))


def test_classes_outside_the_allow_list_are_refused(saved, tmp_path):
    def foreign_class(metadata, description):
        description["estimator"]["steps"][0][1]["class"] = "os.system"

    with pytest.raises(IncompatibleModelError, match="unknown estimator class 'os.system'"):
        skpatchcore.load(_rewrite(saved, tmp_path / "a.skpc", foreign_class))
    with pytest.raises(TypeError, match="skpatchcore estimators only"):
        from sklearn.preprocessing import StandardScaler

        skpatchcore.save(StandardScaler().fit([[0.0], [1.0]]), tmp_path / "s.skpc")


@pytest.mark.parametrize("where", [0, 5, 40, "metadata", "middle", -1, "truncate", "empty"])
def test_corrupted_file_is_refused(saved, tmp_path, where):
    data = bytearray(saved.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    if where == "truncate":
        data = data[: len(data) // 2]
    elif where == "empty":
        data = bytearray()
    else:
        position = {"metadata": header_end - 30, "middle": len(data) // 2}.get(where, where)
        data[position] ^= 0x5A
        if where == "middle":  # 4 kB flipped, as in the issue
            data[position:position + 4096] = bytes(b ^ 0xFF for b in data[position:position + 4096])
    broken = tmp_path / "broken.skpc"
    broken.write_bytes(bytes(data))
    with pytest.raises((CorruptModelError, IncompatibleModelError)) as info:
        skpatchcore.load(broken)
    assert isinstance(info.value, ValueError)
    assert str(broken) in str(info.value)


def test_every_byte_of_the_tensor_data_is_checked(tmp_path):
    detector = PatchCoreDetector(random_state=0).fit(np.random.default_rng(0).normal(size=(30, 4)))
    path = skpatchcore.save(detector, tmp_path / "d.skpc")
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for position in range(header_end, len(data), 7):
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(CorruptModelError, match="checksum"):
            skpatchcore.load(path)


def test_module_backbone_gets_a_clear_error(images, tmp_path):
    import torchvision

    model = make_patchcore(backbone=torchvision.models.resnet18(), weights=None, resize=64, crop_size=None,
                           random_state=0).fit(images[:3])
    with pytest.raises(TypeError, match="torchvision model name or 'timm:<name>'.*joblib.dump"):
        skpatchcore.save(model, tmp_path / "m.skpc")
    assert not (tmp_path / "m.skpc").exists()


class _Payload:
    """Unpickling it creates a marker file (a stand-in for any shell command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_is_refused_unopened(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.skpc"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    assert persistence.detect_format(path) == "pickle"
    with pytest.raises(CorruptModelError, match="not a skpatchcore model file"):
        skpatchcore.load(path)
    assert not marker.exists()
    joblib.dump({"a": 1}, tmp_path / "plain.joblib", compress=3)
    assert persistence.detect_format(tmp_path / "plain.joblib") == "pickle"


def test_detect_format(saved, tmp_path):
    assert persistence.detect_format(saved) == "safe"
    (tmp_path / "text").write_text("hello world, not a model")
    assert persistence.detect_format(tmp_path / "text") == "unknown"


# ----------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_write(target, "w") as handle:
        handle.write("new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600


def test_check_writable_file(tmp_path):
    check_writable_file(tmp_path / "new" / "m.skpc")
    assert (tmp_path / "new").is_dir() and not any((tmp_path / "new").iterdir())
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OSError, match="not writable"):
        check_writable_file(tmp_path / "a-file" / "m.skpc")
    with pytest.raises(OSError, match="is a folder"):
        check_writable_file(tmp_path)


_SLOW_SAVE = textwrap.dedent("""
    import os, sys, time

    def slow_fsync(descriptor):  # the whole new file is written, not yet renamed
        print("writing", flush=True)
        time.sleep(60)

    if sys.argv[3] == "cli":
        import numpy as np
        from skpatchcore import PatchCoreDetector
        from skpatchcore.cli.fit import save_model

        model = PatchCoreDetector().fit(np.random.default_rng(0).normal(size=(30, 4)))
        os.fsync = slow_fsync
        save_model(model, sys.argv[2])
    else:  # the helper alone, without importing torch
        import importlib.util
        import joblib

        spec = importlib.util.spec_from_file_location("_atomic", sys.argv[1])
        atomic = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(atomic)
        os.fsync = slow_fsync
        with atomic.atomic_path(sys.argv[2]) as temporary:
            joblib.dump({"new": "model"}, temporary)
""")


@pytest.mark.parametrize("suffix, sig, how", [(".skpc", signal.SIGKILL, "cli"), (".joblib", signal.SIGTERM, "helper")])
def test_killed_save_keeps_the_previous_model(tmp_path, suffix, sig, how):
    from skpatchcore.io import atomic as _atomic

    target = tmp_path / f"model{suffix}"
    target.write_bytes(b"previous model")
    process = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, _atomic.__file__, str(target), how],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(sig)
        process.wait(timeout=30)
    finally:
        process.kill()
        process.stdout.close()
    assert target.read_bytes() == b"previous model"


def test_multi_scale_model_round_trips(images, tmp_path):
    model = make_patchcore(backbone="resnet18", weights=None, resize=64, crop_size=None, random_state=0,
                           sampling_ratio=0.5, scales=(1.0, 0.75)).fit(images[:4])
    loaded = skpatchcore.load(skpatchcore.save(model, tmp_path / "multi.skpc"))
    assert loaded[0].scales == (1.0, 0.75) and loaded[0].feature_shape_ == (8, 8, 2048)
    expected_scores, expected_maps = model.score_and_maps(images)
    scores, maps = loaded.score_and_maps(images)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(maps, expected_maps)


def test_a_model_saved_before_scales_existed_loads_single_scale(fitted, saved, images, tmp_path):
    def drop_scales(metadata, description):
        del description["estimator"]["steps"][0][1]["params"]["scales"]

    loaded = skpatchcore.load(_rewrite(saved, tmp_path / "old.skpc", drop_scales))
    assert loaded[0].scales == (1.0,)
    np.testing.assert_array_equal(loaded.score_samples(images), fitted.score_samples(images))


def test_multi_scale_efficientnet_keeps_the_hooked_network_through_a_round_trip(tmp_path):
    # Its "same" padding depends on the input size, so with two scales the model keeps the network itself
    # (no graph) and loading rebuilds it by name.
    pytest.importorskip("timm")
    images = np.random.default_rng(1).integers(0, 255, (5, 60, 80, 3), dtype=np.uint8)
    model = make_patchcore(backbone="timm:tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), weights=None,
                           resize=64, random_state=0, sampling_ratio=0.5, scales=(1.0, 0.78)).fit(images[:3])
    loaded = skpatchcore.load(skpatchcore.save(model.set_params(features__random_state=None), tmp_path / "m.skpc"))
    assert type(loaded[0].backbone_).__name__ == "HookedLayers"
    np.testing.assert_array_equal(loaded.score_samples(images), model.score_samples(images))
