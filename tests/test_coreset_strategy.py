"""Fast fit: the coreset strategy (one greedy pass or chunk coresets in threads)."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import CoresetSampler, PatchCoreDetector, coreset_strategy
from skpatchcore._greedy import _pick, greedy_reference
from skpatchcore.coreset import _project
from skpatchcore.coreset_strategy import chunk_bounds, resolve_strategy


@pytest.fixture
def images(rng):
    """24 images of 6 x 6 patches of 12 features, with one group of images unlike the others."""
    X = rng.normal(size=(24, 6, 6, 12)).astype(np.float32)
    X[18:] += 4.0
    return X


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 images of 36 rows, and chunks for any selection under "auto"."""
    monkeypatch.setattr(coreset_strategy, "CHUNK_ROWS", 144)
    monkeypatch.setattr(coreset_strategy, "SINGLE_PASS_WORK", 0)


def test_auto_rule_runs_one_pass_for_small_work_and_chunks_beyond(monkeypatch):
    assert resolve_strategy("auto", 597_408, 59_740) == "chunks"  # MTD at 10%: 3.6e10 rows x picks
    assert resolve_strategy("auto", 597_408, 5_974) == "single_pass"  # MTD at 1%: 3.6e9
    assert resolve_strategy("auto", 3_000 * 784, 23_520) == "chunks"  # 3,000 images at 1%
    assert resolve_strategy("auto", 16_384, 16_000) == "single_pass"  # one chunk's rows at most
    assert resolve_strategy("single_pass", 10**7, 10**6) == "single_pass"
    assert resolve_strategy("chunks", 100, 10) == "chunks"


def test_chunk_bounds_spread_whole_images_evenly():
    assert chunk_bounds(10, 36, chunk_rows=144) == [(0, 3), (3, 6), (6, 10)]
    assert chunk_bounds(3, 100, chunk_rows=50) == [(0, 1), (1, 2), (2, 3)]  # at least one image each
    assert chunk_bounds(5, 1, chunk_rows=100) == [(0, 5)]
    bounds = chunk_bounds(762, 784)
    sizes = [stop - start for start, stop in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == 762 and max(sizes) - min(sizes) <= 1
    assert max(sizes) * 784 <= coreset_strategy.CHUNK_ROWS


def test_small_fits_keep_the_single_greedy_pass(images):
    auto = CoresetSampler(sampling_ratio=0.1, random_state=0).fit(images)
    single = CoresetSampler(sampling_ratio=0.1, random_state=0, strategy="single_pass").fit(images)
    np.testing.assert_array_equal(auto.coreset_indices_, single.coreset_indices_)
    np.testing.assert_array_equal(auto.coreset_radii_, single.coreset_radii_)
    assert auto.coverage_radius_ == single.coverage_radius_ and auto.seed_ == single.seed_
    # ...which is the official algorithm's picks (the kernel's parity with the naive loop).
    rng = np.random.RandomState(0)
    starts = rng.choice(len(images.reshape(-1, 12)), 10, replace=False)
    rows = images.reshape(-1, 12)
    np.testing.assert_array_equal(single.coreset_indices_, greedy_reference(rows, starts, len(single.coreset_indices_)))


def test_chunks_are_the_chunk_coresets_of_a_chunked_fit_merged(images, small_chunks):
    sampler = CoresetSampler(sampling_ratio=0.1, random_state=0).fit(images)
    manual = CoresetSampler(sampling_ratio=0.1, random_state=0).begin_chunks()
    assert manual.seed_ == sampler.seed_
    parts = [manual.chunk_coreset(images[start:stop], first_image=start) for start, stop in chunk_bounds(24, 36)]
    assert len(parts) == 6
    bank = manual.merge(parts)
    np.testing.assert_array_equal(sampler.coreset_indices_, manual.coreset_indices_)
    np.testing.assert_array_equal(sampler.coreset_radii_, manual.coreset_radii_)
    assert len(sampler.coreset_indices_) == int(24 * 36 * 0.1)
    assert sampler.n_rows_seen_ == 24 * 36 and sampler.n_images_seen_ == 24
    # The bank keeps every row's source image, as the chunked fit and the Dask fit do.
    selected = sampler.fit_transform(images)
    np.testing.assert_array_equal(selected.image_index, sampler.coreset_indices_ // 36)
    np.testing.assert_array_equal(selected.image_index, bank.image_index)
    np.testing.assert_array_equal(selected, images.reshape(-1, 12)[sampler.coreset_indices_])


def test_chunk_coresets_do_not_depend_on_the_threads(images, small_chunks):
    banks = [CoresetSampler(sampling_ratio=0.1, random_state=0, n_jobs=n_jobs).fit(images).coreset_indices_
             for n_jobs in (1, 2, 3)]
    np.testing.assert_array_equal(banks[0], banks[1])
    np.testing.assert_array_equal(banks[0], banks[2])
    sampler = CoresetSampler(sampling_ratio=0.1, random_state=0, n_jobs=2).begin_chunks()
    parts = sampler.chunk_coresets(images[4:16], first_image=4)
    assert [part.n_images for part in parts] == [4, 4, 4]
    for part, start in zip(parts, (4, 8, 12)):
        alone = sampler.chunk_coreset(images[start:start + 4], first_image=start)
        np.testing.assert_array_equal(part.row_index, alone.row_index)
        np.testing.assert_array_equal(part.rows, alone.rows)


def test_chunk_coresets_keep_one_chunk_when_the_work_is_small(images):
    sampler = CoresetSampler(sampling_ratio=0.1, random_state=0).begin_chunks()
    parts = sampler.chunk_coresets(images, first_image=2)
    alone = sampler.chunk_coreset(images, first_image=2)
    assert len(parts) == 1
    np.testing.assert_array_equal(parts[0].row_index, alone.row_index)


def test_chunked_selection_covers_every_row_within_its_bound(images, small_chunks):
    sampler = CoresetSampler(sampling_ratio=0.1, merge_method="greedy", projection_dim=8, random_state=0)
    sampler.fit(images)
    rows = images.reshape(-1, 12)
    projection = sampler._shared_projection(12)
    nearest = torch.cdist(torch.from_numpy(_project(rows, projection)).double(),
                          torch.from_numpy(_project(rows[sampler.coreset_indices_], projection)).double())
    assert float(nearest.min(dim=1).values.max()) <= sampler.coverage_radius_ * (1 + 1e-5)
    assert np.isnan(CoresetSampler(sampling_ratio=0.1, random_state=0).fit(images).coverage_radius_)


def test_chunked_selection_keeps_rare_patterns_and_calibrates_by_image(images, small_chunks):
    bank = CoresetSampler(sampling_ratio=0.1, random_state=0).fit_transform(images)
    assert np.count_nonzero(bank.image_index >= 18) >= 5  # the unusual images are covered
    detector = PatchCoreDetector(random_state=0).fit(bank)  # leave-image-out calibration
    assert detector.calibration_scores_.shape == (len(np.unique(bank.image_index)),)
    assert np.all(detector.calibration_scores_ > 0)


def test_two_d_rows_are_chunked_by_rows(rng, small_chunks):
    rows = rng.normal(size=(600, 5))
    sampler = CoresetSampler(sampling_ratio=0.05, random_state=0)
    selected = sampler.fit_transform(rows)
    assert selected.shape == (30, 5) and selected.dtype == np.float64
    assert sampler.n_images_seen_ is None and sampler.n_rows_seen_ == 600
    np.testing.assert_array_equal(selected, rows[sampler.coreset_indices_])
    assert len(np.unique(sampler.coreset_indices_)) == 30


def test_random_method_ignores_the_strategy(images, small_chunks):
    sampler = CoresetSampler(sampling_ratio=0.1, method="random", random_state=0).fit(images)
    assert len(sampler.coreset_indices_) == 86 and np.isnan(sampler.coverage_radius_)


def test_progress_counts_every_chunk_pick(images, small_chunks, capsys):
    sampler = CoresetSampler(sampling_ratio=0.1, random_state=0, n_jobs=2, progress=True).begin_chunks()
    parts = sampler.chunk_coresets(images)
    err = capsys.readouterr().err
    total = sum(len(part.rows) for part in parts)
    assert f"{total}/{total}" in err


def test_greedy_kernel_releases_the_gil():
    assert _pick.targetoptions.get("nogil") is True


@pytest.mark.parametrize(("params", "match"), [
    (dict(strategy="fast"), "'strategy' parameter of CoresetSampler must be a str among"),
    (dict(n_jobs=0), "'n_jobs' parameter of CoresetSampler must be"),
    (dict(n_jobs=1.5), "'n_jobs' parameter of CoresetSampler must be"),
])
def test_bad_strategy_parameters(images, params, match):
    with pytest.raises(InvalidParameterError, match=match):
        CoresetSampler(**params).fit(images)


def test_chunks_hold_fewer_rows_above_a_10_percent_ratio(images, small_chunks):
    # A chunk keeps 1.5 x chunk_ratio() of its rows: 22.5% at 10%, 56% at 25%; its greedy order costs
    # rows x picks, so above 10% chunks get fewer rows, keeping their picks near those of a 10% chunk.
    assert coreset_strategy.chunk_rows(0.2) == coreset_strategy.CHUNK_ROWS
    assert coreset_strategy.chunk_rows(0.45) == coreset_strategy.CHUNK_ROWS // 2
    counts = {}
    for ratio in (0.1, 0.25):
        sampler = CoresetSampler(sampling_ratio=ratio, random_state=0).begin_chunks()
        counts[ratio] = [part.n_images for part in sampler.chunk_coresets(images[:12])]
    assert counts[0.1] == [4, 4, 4]  # 144 rows
    assert counts[0.25] == [1] * 12  # 144 x 0.225 / 0.5625 = 57 rows: one image of 36 rows each
    bank = CoresetSampler(sampling_ratio=0.25, random_state=0).fit_transform(images)
    assert len(bank) == int(images.shape[0] * 36 * 0.25)


# ------------------------------------------------------------------ random_fraction
@pytest.fixture
def flat_background(rng):
    """40 images of 6 x 6 patches: half of every image is one identical pattern, the rest varied."""
    X = (3.0 * rng.normal(size=(40, 6, 6, 12))).astype(np.float32)
    X[:, :3] = 0.0
    return X


def _distance_to_bank(X, bank):
    rows = torch.from_numpy(X.reshape(-1, X.shape[-1])).double()
    return torch.cdist(rows, torch.from_numpy(np.asarray(bank)).double()).min(dim=1).values.numpy()


def test_greedy_alone_keeps_no_row_of_the_dense_pattern_and_random_rows_cover_it(flat_background):
    X = flat_background
    greedy = CoresetSampler(sampling_ratio=0.05, projection_dim=None, strategy="single_pass", random_state=0)
    mixed = clone(greedy).set_params(random_fraction=0.2)
    background = (X.reshape(-1, 12) == 0).all(axis=1)
    assert _distance_to_bank(X, greedy.fit_transform(X))[background].min() > 1.0
    bank = mixed.fit_transform(X)
    assert _distance_to_bank(X, bank)[background].max() == 0.0
    n_selected, n_random = int(X[..., 0].size * 0.05), int(int(X[..., 0].size * 0.05) * 0.2)
    assert len(bank) == n_selected and len(np.unique(mixed.coreset_indices_)) == n_selected
    # The random rows come first (radius inf), then the first greedy picks of the paper's coreset.
    assert np.all(np.isinf(mixed.coreset_radii_[:n_random])) and np.all(np.isfinite(mixed.coreset_radii_[n_random:]))
    np.testing.assert_array_equal(mixed.coreset_indices_[n_random:], greedy.coreset_indices_[:n_selected - n_random])
    assert mixed.coverage_radius_ >= _distance_to_bank(X, bank).max() * (1 - 1e-6)


@pytest.mark.parametrize("merge_method", ["radius", "greedy"])
def test_chunked_fits_keep_every_random_row_through_the_merge(flat_background, small_chunks, merge_method):
    X = flat_background
    sampler = CoresetSampler(sampling_ratio=0.1, random_fraction=0.3, merge_method=merge_method, random_state=0)
    bank = sampler.fit_transform(X)
    parts = clone(sampler).begin_chunks().chunk_coresets(X)
    drawn = np.concatenate([part.row_index[np.isinf(part.radii)] for part in parts])
    n_rows = X[..., 0].size
    assert len(parts) > 1 and 0.5 * n_rows * 0.03 < len(drawn) < 1.5 * n_rows * 0.03
    assert set(drawn) <= set(sampler.coreset_indices_)
    assert np.count_nonzero(np.isinf(sampler.coreset_radii_)) == len(drawn)
    assert len(bank) == int(n_rows * 0.1)
    background = (X.reshape(-1, 12) == 0).all(axis=1)
    assert _distance_to_bank(X, bank)[background].max() == 0.0


@pytest.mark.parametrize("value", [1.0, -0.1, True, "0.1"])
def test_bad_random_fraction(flat_background, value):
    with pytest.raises(InvalidParameterError, match="random_fraction"):
        CoresetSampler(random_fraction=value).fit(flat_background)
