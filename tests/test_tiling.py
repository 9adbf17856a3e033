"""Tiling of large images: tile grids, scores over tiles, stitched maps, budgets, persistence, CLI."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from sklearn.utils._param_validation import InvalidParameterError

import skpatchcore
from skpatchcore import make_patchcore
from skpatchcore.cli import main
from skpatchcore.evaluation import evaluate_model
from skpatchcore.tiling import MapStitcher, tile_layout, tile_starts
from tests._helpers import REPO, small_transformer

TILE = 32


def tiled_model(**params):
    """A random-weight resnet18 pipeline on 32 px tiles, 25% coreset, seeded."""
    defaults = dict(backbone="resnet18", weights=None, tile_size=TILE, sampling_ratio=0.25, random_state=0)
    defaults.update(params)
    return make_patchcore(**defaults)


def _texture(rng, height, width):
    """A smooth periodic surface with noise: every crop looks alike."""
    y, x = np.mgrid[:height, :width]
    phase = rng.uniform(0, 2 * np.pi)
    surface = 120 + 30 * np.sin(x / 3.0 + phase) + 30 * np.cos(y / 5.0) + rng.normal(0, 4, (height, width))
    return np.repeat(np.clip(surface, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def train():
    rng = np.random.default_rng(0)
    return [_texture(rng, 64, 96) for _ in range(5)]


@pytest.fixture(scope="module")
def fitted(train):
    return tiled_model(tile_overlap=0.25).fit(train)


@pytest.fixture(scope="module")
def test_images():
    rng = np.random.default_rng(1)
    good, defect = _texture(rng, 64, 96), _texture(rng, 64, 96)
    defect[40:48, 70:78] = 255  # an 8 px defect: a quarter of a tile
    return [good, defect]


# ------------------------------------------------------------------ geometry
def test_tile_grid_covers_the_image_flush_with_its_edges():
    assert tile_starts(640, 320, 0.0).tolist() == [0, 320]
    assert tile_starts(640, 213, 0.0).tolist() == [0, 213, 426, 427]
    assert tile_starts(100, 40, 0.5).tolist() == [0, 20, 40, 60]
    assert tile_starts(30, 40, 0.5).tolist() == [0]  # smaller than a tile: one tile, padded
    layout = tile_layout((100, 30), 40, 0.5, tile_scale=0.5)
    assert layout.scaled_size == (50, 15) and layout.padded_size == (50, 40)
    assert layout.origins.tolist() == [[0, 0], [10, 0]]


@pytest.mark.parametrize("params, message", [
    (dict(tile_size=0), r"'tile_size' parameter .* must be an int .* in the range \[1, inf\) or None"),
    (dict(tile_size=2.5), r"'tile_size' parameter .* must be an int .* in the range \[1, inf\) or None"),
    (dict(tile_size=True), r"'tile_size' parameter .* must be an int \(not a bool\)"),
    (dict(tile_size=32, tile_overlap=1.0), r"'tile_overlap' parameter .* in the range \[0.0, 1.0\)"),
    (dict(tile_size=32, tile_overlap=-0.1), r"'tile_overlap' parameter .* in the range \[0.0, 1.0\)"),
    (dict(tile_size=32, tile_scale=0), r"'tile_scale' parameter .* in the range \(0.0, inf\)"),
])
def test_bad_tiling_parameters_are_named(params, message):
    with pytest.raises(InvalidParameterError, match=message):
        small_transformer(**params).fit()


def test_an_image_without_a_tile_grid_is_named(fitted):
    with pytest.raises(ValueError, match="Cannot tile an empty image"):
        fitted.steps[0][1].tile_layout(np.zeros((0, 40, 3), dtype=np.uint8))


# ----------------------------------------------------------------- features
def test_a_tile_is_the_untiled_computation_of_its_pixels(train):
    tiled = small_transformer(tile_size=TILE).fit()
    untiled = small_transformer(resize=TILE).fit()
    features = tiled.transform(train[:1])
    layout = tiled.tile_layout(train[0])
    assert features.shape == (layout.n_tiles, *tiled.feature_shape_) and layout.n_tiles == 2 * 3
    for features_of_tile, (top, left) in zip(features, layout.origins):
        crop = train[0][top:top + TILE, left:left + TILE]
        np.testing.assert_allclose(features_of_tile, untiled.transform([crop])[0], rtol=1e-4, atol=1e-4)


def test_iter_tiles_chunks_hold_the_tiles_of_transform(train):
    tiled = small_transformer(tile_size=TILE, tile_overlap=0.5).fit()
    whole = tiled.transform(train[:2])
    chunks = list(tiled.iter_tiles(train[:2], chunk_tiles=4))
    assert [len(features) for _, _, features in chunks][:-1] == [4] * (len(chunks) - 1)
    np.testing.assert_array_equal(np.concatenate([features for _, _, features in chunks]), whole)
    images = np.concatenate([image for image, _, _ in chunks])
    assert np.bincount(images).tolist() == [tiled.tile_layout(train[0]).n_tiles] * 2


# ------------------------------------------------------------------ scoring
def test_image_score_is_its_most_anomalous_patch_over_all_tiles(fitted, test_images):
    features, detector = fitted.steps[0][1], fitted.steps[-1][1]
    scores = fitted.score_samples(test_images)
    tile_scores = detector.score_samples(features.transform(test_images))
    n_tiles = features.tile_layout(test_images[0]).n_tiles
    np.testing.assert_allclose(scores, tile_scores.reshape(2, n_tiles).min(axis=1))
    assert scores[1] < scores[0]  # the defect is found
    assert fitted.predict(test_images).tolist() == [1, -1]


@pytest.mark.parametrize("reweight", [False, True])
def test_tiled_scores_without_maps_equal_those_with_maps_and_exact_search(train, test_images, reweight):
    # predict's scoring searches coarsely (fewer pynndescent candidates) since each image's largest patch
    # score over its tiles is searched again exactly: the image scores must not change.
    from skpatchcore.detector import PatchCoreDetector

    approximate = tiled_model().set_params(detector__algorithm="pynndescent", detector__reweight=reweight).fit(train)
    exact = tiled_model().set_params(detector__algorithm="exact", detector__reweight=reweight).fit(train)
    certified = []  # groups per certification (the sparse grid's, then all patches'): one per image, not per tile
    make_exact = PatchCoreDetector._make_maxima_exact

    def spy(self, search, rows, members, *args):
        certified.append(len(members))
        return make_exact(self, search, rows, members, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PatchCoreDetector, "_make_maxima_exact", spy)
        scores = approximate.score_samples(test_images)
    assert certified == [len(test_images)] * 2
    np.testing.assert_allclose(scores, approximate.score_and_maps(test_images)[0], rtol=1e-6)
    np.testing.assert_allclose(scores, exact.score_samples(test_images), rtol=1e-5)


def test_maps_are_at_the_image_size_and_peak_on_the_defect(fitted, test_images):
    scores, maps = fitted.score_and_maps(test_images)
    assert maps.shape == (2, 64, 96)
    row, column = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
    assert 36 <= row <= 52 and 66 <= column <= 82


def test_stitching_blends_overlaps_without_seams():
    layout = tile_layout((32, 48), 32, tile_overlap=0.5)  # tiles at columns 0 and 16
    same = MapStitcher(layout, sigma=0)
    same.add(np.full((2, 4, 4), 3.0), layout.origins)
    np.testing.assert_allclose(same.result(), 3.0, rtol=1e-6)  # weights sum to one everywhere
    differing = MapStitcher(layout, sigma=0)
    differing.add(np.stack([np.full((4, 4), 1.0), np.full((4, 4), 2.0)]), layout.origins)
    stitched = differing.result()
    assert stitched.shape == (32, 48)
    assert stitched[:, 0] == pytest.approx(1.0) and stitched[:, -1] == pytest.approx(2.0)
    steps = np.abs(np.diff(stitched, axis=1))
    # A cut (or a plain average) jumps by 0.5-1.0 at a tile border; the blend ramps over the overlap.
    assert steps.max() < 0.1


def test_smoothing_runs_across_tile_borders(fitted, test_images):
    """A map stitched from tiles equals one smoothed as a whole: no seam where tiles meet."""
    features, detector = fitted.steps[0][1], fitted.steps[-1][1]
    layout = features.tile_layout(test_images[1])
    grids = detector.patch_scores(features.transform(test_images[1:]))
    unsmoothed = MapStitcher(layout, sigma=0)
    unsmoothed.add(grids, layout.origins)
    from scipy.ndimage import gaussian_filter

    expected = gaussian_filter(unsmoothed.result(), detector.map_sigma)
    np.testing.assert_allclose(fitted.anomaly_maps(test_images[1:])[0], expected, rtol=1e-5, atol=1e-5)


def test_images_of_different_sizes_get_their_own_grids(fitted, test_images):
    rng = np.random.default_rng(2)
    images = [test_images[1], _texture(rng, 40, 50), _texture(rng, 20, 24)]  # the last: smaller than a tile
    scores, maps = fitted.score_and_maps(images, original_size=True)
    assert [m.shape for m in maps] == [(64, 96), (40, 50), (20, 24)]
    assert np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores[0], fitted.score_samples(images[:1])[0])
    with pytest.raises(ValueError, match="original_size=True"):
        fitted.score_and_maps(images)


def test_tile_scale_resizes_before_tiling_and_maps_come_back_at_image_size(train, test_images):
    model = tiled_model(tile_scale=0.5).fit([np.repeat(np.repeat(t, 2, 0), 2, 1) for t in train])
    assert model.steps[0][1].tile_layout(np.zeros((128, 192, 3), np.uint8)).scaled_size == (64, 96)
    scores, maps = model.score_and_maps([np.repeat(np.repeat(t, 2, 0), 2, 1) for t in test_images])
    assert maps.shape == (2, 128, 192) and scores[1] < scores[0]


# ---------------------------------------------------- budget, calibration, growth
def test_calibration_and_pvalues_leave_whole_images_out(fitted, train, test_images):
    detector = fitted.steps[-1][1]
    assert sorted(np.unique(detector.bank_image_index_)) == list(range(len(train)))
    assert detector.calibration_scores_.shape == (len(train),)  # one score per image, not per tile
    pvalues = fitted.pvalues(test_images)
    assert pvalues[1] == pytest.approx(1 / (len(train) + 1)) and pvalues[0] > pvalues[1]


def test_chunked_fit_and_scoring_count_tiles_in_the_budget(fitted, train, test_images):
    per_tile_mib = 16 * 4 * (128 + 256) * 4 / 2**20  # a 32 px tile's layer2 + layer3 features
    chunked = tiled_model(tile_overlap=0.25, working_memory=0.5 + 6 * per_tile_mib).fit(train)
    sampler = chunked.steps[1][1]
    assert sampler.n_images_seen_ == sum(fitted.steps[0][1].tile_layout(t).n_tiles for t in train)
    assert np.unique(chunked.steps[-1][1].bank_image_index_).tolist() == list(range(len(train)))
    wide = chunked.score_samples(test_images)
    chunked.set_params(working_memory=0.5)
    assert chunked._tiled_score_chunks(test_images)[1] < fitted.steps[0][1].tile_layout(test_images[0]).n_tiles
    np.testing.assert_allclose(chunked.score_samples(test_images), wide)
    with pytest.raises(ValueError, match="raise working_memory"):
        chunked.set_params(working_memory=0.01).score_samples(test_images)


def test_partial_fit_adds_images_numbered_after_the_old_ones(train, test_images):
    model = tiled_model(working_memory=2).fit(train[:3])
    before = model.steps[1][1].n_images_seen_
    model.partial_fit(train[3:])
    detector = model.steps[-1][1]
    assert model.steps[1][1].n_images_seen_ == before * 5 // 3
    assert set(np.unique(detector.bank_image_index_)) <= set(range(5))
    assert detector.bank_image_index_.max() >= 3
    assert model.predict(test_images).tolist() == [1, -1]


def test_the_pipeline_route_without_chunks_refuses_tiles(train):
    with pytest.raises(ValueError, match="needs the pipeline's own fit"):
        tiled_model().set_params(memory=str(REPO / ".cache-never-made")).fit(train)


# ------------------------------------------------------------- persistence
def test_safe_format_round_trip_keeps_the_tiling(fitted, test_images, tmp_path):
    skpatchcore.save(fitted, tmp_path / "tiled.skpc")
    loaded = skpatchcore.load(tmp_path / "tiled.skpc")
    assert loaded.steps[0][1].get_params()["tile_overlap"] == 0.25
    expected_scores, expected_maps = fitted.score_and_maps(test_images)
    scores, maps = loaded.score_and_maps(test_images)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(maps, expected_maps)


def test_a_format_4_file_without_tiling_still_loads(tmp_path):
    from tests.test_persistence import _rewrite

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    model = make_patchcore(backbone="resnet18", weights=None, resize=64, crop_size=None, random_state=0).fit(images)
    skpatchcore.save(model, tmp_path / "new.skpc")

    def as_format_4(metadata, description):
        description["model_format"] = 4
        params = description["estimator"]["steps"][0][1]["params"]
        for name in ("tile_size", "tile_overlap", "tile_scale"):
            params.pop(name)

    loaded = skpatchcore.load(_rewrite(tmp_path / "new.skpc", tmp_path / "old.skpc", as_format_4))
    assert loaded.steps[0][1].tile_size is None
    np.testing.assert_array_equal(loaded.score_samples(images), model.score_samples(images))


# ------------------------------------------------------- evaluation and CLI
@pytest.fixture(scope="module")
def pcb_category(tmp_path_factory):
    """An MVTec-layout folder of 64 x 96 px textures with small square defects and their masks."""
    root = tmp_path_factory.mktemp("tiled") / "pcb"
    rng = np.random.default_rng(3)
    for folder in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / folder).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(_texture(rng, 64, 96)).save(root / "train" / "good" / f"{i}.png")
    for i in range(2):
        Image.fromarray(_texture(rng, 64, 96)).save(root / "test" / "good" / f"{i}.png")
        image, mask = _texture(rng, 64, 96), np.zeros((64, 96), np.uint8)
        top, left = 10 + 20 * i, 20 + 30 * i
        image[top:top + 8, left:left + 8], mask[top:top + 8, left:left + 8] = 255, 255
        Image.fromarray(image).save(root / "test" / "defect" / f"{i}.png")
        Image.fromarray(mask).save(root / "ground_truth" / "defect" / f"{i}_mask.png")
    return root


def test_evaluate_measures_pixels_at_the_original_resolution(pcb_category, tmp_path):
    from skpatchcore.io.datasets import load_mvtec

    data = load_mvtec(pcb_category)
    model = tiled_model().fit(data.train_images)
    metrics = evaluate_model(model, data, output=tmp_path / "out", plots=True, heatmaps=True)
    assert metrics["map_size"] == "original"
    assert metrics["image_auroc"] == 1.0 and metrics["pixel_auroc"] > 0.9
    heatmaps = sorted((tmp_path / "out" / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 4
    with Image.open(heatmaps[0]) as heatmap:
        assert heatmap.size[0] >= 96  # drawn over the whole image, not a 32 px tile
    assert (tmp_path / "out" / "worst_examples.png").is_file()


def test_cli_fit_score_evaluate_with_tiles(pcb_category, tmp_path, capsys):
    model_path = tmp_path / "m.skpc"
    fast = ["--backbone", "resnet18", "--weights", "none", "--layers", "layer2", "layer3", "--quiet"]
    assert main(["fit", str(pcb_category / "train"), "-o", str(model_path), *fast,
                 "--tile-size", str(TILE), "--tile-overlap", "0.25"]) == 0
    loaded = skpatchcore.load(model_path)
    assert (loaded.steps[0][1].tile_size, loaded.steps[0][1].tile_overlap) == (TILE, 0.25)
    assert main(["score", str(model_path), str(pcb_category / "test"), "-o", str(tmp_path / "s"), "--quiet"]) == 0
    assert len(list((tmp_path / "s" / "heatmaps").glob("*.png"))) == 4
    assert main(["evaluate", str(model_path), str(pcb_category), "-o", str(tmp_path / "e"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["map_size"] == "original" and metrics["image_auroc"] == 1.0
    capsys.readouterr()
    assert main(["fit", str(pcb_category / "train"), "-o", str(model_path), *fast, "--tile-overlap", "1"]) == 2
    assert "--tile-overlap: expected a fraction in [0, 1), got '1'" in capsys.readouterr().err


# ------------------------------------------------------------- large images
LARGE_IMAGE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from torch import nn
    from skpatchcore import make_patchcore

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 8, stride=8)
            self.conv2 = nn.Conv2d(8, 8, 2, stride=2)

        def forward(self, x):
            return self.conv2(self.conv1(x))

    def status_mib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024

    torch.manual_seed(0)
    budget = float(sys.argv[1])
    rng = np.random.default_rng(0)
    model = make_patchcore(backbone=Tiny(), layers=("conv1", "conv2"), weights=None, tile_size=512,
                           aggregation="concat", sampling_ratio=0.1, random_state=0, working_memory=budget, n_jobs=1)
    model.fit([rng.integers(0, 255, (512, 512, 3), dtype=np.uint8) for _ in range(2)])
    image = np.full((6000, 8000, 3), 128, dtype=np.uint8)
    image[3000:3040, 5000:5040] = 255
    baseline = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:  # the peak (VmHWM) counts from here: not the fit's
        refs.write("5")
    (indices, scores, maps), = list(model.iter_score_and_maps([image], original_size=True))
    peak = status_mib("VmHWM")
    row, column = np.unravel_index(np.argmax(maps[0]), maps[0].shape)
    print(baseline, peak, maps[0].shape[0], maps[0].shape[1], row, column)
""")


def test_an_8000_x_6000_image_scores_within_the_memory_budget():
    budget = 512
    result = subprocess.run([sys.executable, "-c", LARGE_IMAGE_SCRIPT, str(budget)], capture_output=True,
                            text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    baseline, peak, height, width, row, column = (float(v) for v in result.stdout.split())
    assert (height, width) == (6000, 8000)
    assert 2950 <= row <= 3090 and 4950 <= column <= 5090  # the 40 px defect
    assert peak - baseline < budget, f"peak RSS grew by {peak - baseline:.0f} MiB over a {budget} MiB budget"


# ------------------------------------------------------ choosing without labels
def test_synthetic_defects_of_a_physical_size_keep_it_whatever_the_image_size():
    from skpatchcore.synthetic import add_synthetic_defects

    rng = np.random.default_rng(0)
    for side in (64, 256):
        images = [_texture(rng, side, side) for _ in range(6)]
        data = add_synthetic_defects(images, kinds=("intensity",), defect_size=12, random_state=0)
        areas = [int(mask.sum()) for mask, label in zip(data.masks, data.labels) if label]
        assert all(80 <= area <= 220 for area in areas), areas  # about 12 x 12 px at both image sizes
    with pytest.raises(ValueError, match="defect_size must be None"):
        add_synthetic_defects(images, defect_size=(8, 4))


def test_synthetic_selection_chooses_tiles_for_small_defects_in_large_images():
    from sklearn.model_selection import GridSearchCV

    from skpatchcore import NormalOnlyKFold, synthetic_defect_scorer

    rng = np.random.default_rng(4)
    images = [_texture(rng, 128, 128) for _ in range(12)]
    model = make_patchcore(backbone="resnet18", weights=None, resize=32, crop_size=None, sampling_ratio=0.25,
                           random_state=0, layers=("layer2", "layer3"))
    search = GridSearchCV(model, {"features__tile_size": [None, 32]}, cv=NormalOnlyKFold(2),
                          scoring=synthetic_defect_scorer("image_auroc", kinds=("intensity", "texture"),
                                                          defect_size=8))
    search.fit(images)
    assert search.best_params_ == {"features__tile_size": 32}
    scores = search.cv_results_["mean_test_score"]
    assert scores[1] > scores[0] + 0.1, scores


def test_a_layer_search_with_variant_folds_refits_tiled_models_on_the_chosen_layers():
    # Choosing layers without labels, holding out whole product variants (GroupKFold): both layer sets are
    # scored, and the refit tiled bank has the chosen layers' width (128 columns for layer2 alone; a layer
    # choice that did not reach the tiled fit would leave the 384 of layer2 + layer3).
    from sklearn.model_selection import GridSearchCV, GroupKFold

    from skpatchcore import synthetic_defect_scorer

    rng = np.random.default_rng(5)
    images = [_texture(rng, 64, 64) for _ in range(8)]
    variants = [0, 0, 1, 1, 2, 2, 3, 3]
    grid = {"features__layers": [("layer2", "layer3"), ("layer2",)]}
    search = GridSearchCV(tiled_model(aggregation="concat"), grid, cv=GroupKFold(2),
                          scoring=synthetic_defect_scorer("image_auroc", kinds=("intensity",), defect_size=8))
    search.fit(images, groups=variants)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    best = search.best_estimator_
    width = {("layer2", "layer3"): 128 + 256, ("layer2",): 128}[best.steps[0][1].layers]
    assert best.steps[-1][1].n_features_in_ == width
