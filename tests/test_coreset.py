"""CoresetSampler: greedy picks against a naive reference, pooling, parameters."""

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from skpatchcore import CoresetSampler
from skpatchcore._greedy import greedy_numba, greedy_reference, greedy_torch, mean_distance_to_starts


def clustered(rng, n_points=3000, n_dims=16, n_clusters=25):
    centres = rng.normal(scale=10.0, size=(n_clusters, n_dims))
    labels = rng.integers(0, n_clusters, n_points)
    return (centres[labels] + rng.normal(size=(n_points, n_dims))).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["gaussian", "clustered"])
def test_lazy_kernel_picks_equal_naive_greedy(seed, kind):
    rng = np.random.default_rng(seed)
    points = clustered(rng) if kind == "clustered" else rng.normal(size=(2000, 8)).astype(np.float32)
    starts = rng.choice(len(points), 10, replace=False).astype(np.int64)
    radii = np.empty(150)
    picks, radius, n_computed = greedy_numba(points, starts, 150, radii=radii)
    expected = greedy_reference(points, starts, 150)
    np.testing.assert_array_equal(picks, expected)
    # The radius is the largest remaining distance to the coreset.
    direct = np.linalg.norm(points[:, None, :].astype(np.float64) - points[None, picks].astype(np.float64), axis=2)
    initial = mean_distance_to_starts(points, starts)
    remaining = np.minimum(direct.min(axis=1), initial)
    assert radius == pytest.approx(remaining.max(), rel=1e-12)
    # Each pick's radius is its distance to the picks before it (or its initial distance).
    before = [min([initial[p], *direct[p, :t]]) for t, p in enumerate(picks)]
    np.testing.assert_allclose(radii, before, rtol=1e-12)
    if kind == "clustered":
        assert n_computed < 0.5 * len(points) * 150  # lazy evaluation skipped work


def test_torch_kernel_matches_reference_on_separated_data():
    rng = np.random.default_rng(3)
    points = clustered(rng, n_points=1500)
    starts = rng.choice(len(points), 10, replace=False)
    numba_radii, torch_radii = np.empty(40), np.empty(40)
    picks, radius = greedy_torch(points, starts, 40, "cpu", radii=torch_radii)
    np.testing.assert_array_equal(picks, greedy_reference(points, starts, 40))
    assert radius > 0
    greedy_numba(points, starts.astype(np.int64), 40, radii=numba_radii)
    np.testing.assert_allclose(torch_radii, numba_radii, rtol=1e-4)


def test_initial_distance_is_mean_distance_to_starting_points():
    rng = np.random.default_rng(4)
    points = rng.normal(size=(50, 5)).astype(np.float32)
    starts = np.array([3, 7, 11])
    expected = np.mean([np.linalg.norm(points - points[s], axis=1) for s in starts], axis=0)
    np.testing.assert_allclose(mean_distance_to_starts(points, starts), expected, rtol=1e-6)


def test_sampler_count_reproducibility_and_radius(rng):
    X = clustered(rng, n_points=2000, n_dims=32)
    first = CoresetSampler(sampling_ratio=0.05, projection_dim=None, random_state=0).fit(X)
    again = CoresetSampler(sampling_ratio=0.05, projection_dim=None, random_state=0).fit(X)
    other = CoresetSampler(sampling_ratio=0.05, projection_dim=None, random_state=1).fit(X)
    assert first.coreset_indices_.shape == (int(2000 * 0.05),)
    np.testing.assert_array_equal(first.coreset_indices_, again.coreset_indices_)
    assert not np.array_equal(first.coreset_indices_, other.coreset_indices_)
    distances = np.linalg.norm(X[:, None, :] - X[None, first.coreset_indices_], axis=2).min(axis=1)
    assert first.coverage_radius_ == pytest.approx(distances.max(), rel=1e-5)
    # Greedy coverage beats a random subset of the same size.
    random = CoresetSampler(sampling_ratio=0.05, method="random", random_state=0).fit(X)
    random_radius = np.linalg.norm(X[:, None, :] - X[None, random.coreset_indices_], axis=2).min(axis=1).max()
    assert first.coverage_radius_ < random_radius


def test_projection_is_seeded_and_used(rng):
    X = rng.normal(size=(600, 256)).astype(np.float32)
    a = CoresetSampler(sampling_ratio=0.05, random_state=5).fit(X)
    b = CoresetSampler(sampling_ratio=0.05, random_state=5).fit(X)
    np.testing.assert_array_equal(a.coreset_indices_, b.coreset_indices_)
    # The projected picks are reproducible by hand: same projection, same starts.
    state = np.random.RandomState(5)
    starts = state.choice(600, 10, replace=False)
    matrix = state.uniform(-1 / 16, 1 / 16, size=(256, 128)).astype(np.float32)
    expected = greedy_reference(X @ matrix, starts, 30)
    np.testing.assert_array_equal(a.coreset_indices_, expected)


def test_four_d_features_are_pooled_with_their_source_image(rng):
    X = rng.normal(size=(5, 4, 3, 8)).astype(np.float32)
    sampler = CoresetSampler(sampling_ratio=0.2, random_state=0)
    bank = sampler.fit_transform(X)
    rows = X.reshape(-1, 8)
    np.testing.assert_array_equal(np.asarray(bank), rows[sampler.coreset_indices_])
    np.testing.assert_array_equal(bank.image_index, sampler.coreset_indices_ // 12)
    assert bank.shape == (12, 8)
    # transform passes features through unchanged (new images keep every patch)
    assert sampler.transform(X) is X


def test_ratio_one_keeps_everything_and_tiny_ratio_keeps_one(rng):
    X = rng.normal(size=(40, 3))
    assert len(CoresetSampler(sampling_ratio=1.0).fit(X).coreset_indices_) == 40
    assert len(CoresetSampler(sampling_ratio=1e-6).fit(X).coreset_indices_) == 1


def test_float64_input_keeps_dtype(rng):
    X = rng.normal(size=(100, 4))
    assert CoresetSampler(sampling_ratio=0.1).fit_transform(X).dtype == np.float64


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(sampling_ratio=0.0), "sampling_ratio"),
        (dict(sampling_ratio=1.5), "sampling_ratio"),
        (dict(method="kmeans"), "method"),
        (dict(projection_dim=0), "projection_dim"),
        (dict(n_starting_points=0), "n_starting_points"),
    ],
)
def test_bad_parameters(params, match, rng):
    with pytest.raises(ValueError, match=match):
        CoresetSampler(**params).fit(rng.normal(size=(20, 3)))


def test_bad_inputs(rng):
    with pytest.raises(ValueError, match="NaN"):
        CoresetSampler().fit(np.full((10, 3), np.nan))
    with pytest.raises(ValueError, match="3-D|shape"):
        CoresetSampler().fit(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="empty"):
        CoresetSampler().fit(np.zeros((0, 3, 3, 4)))
    sampler = CoresetSampler().fit(rng.normal(size=(20, 3)))
    with pytest.raises(ValueError, match="3 features"):
        sampler.transform(rng.normal(size=(5, 4)))
    with pytest.raises(NotFittedError):
        CoresetSampler().transform(rng.normal(size=(5, 4)))


def test_progress_bar_counts_every_pick(rng):
    import io

    from tqdm import tqdm

    points = rng.normal(size=(500, 8)).astype(np.float32)
    starts = np.arange(10, dtype=np.int64)
    with tqdm(total=37, file=io.StringIO()) as bar:
        picks, _, _ = greedy_numba(points, starts, 37, bar)
    assert bar.n == 37
    np.testing.assert_array_equal(picks, greedy_reference(points, starts, 37))


def test_memory_mapped_read_only_features_fit_without_warnings(tmp_path):
    """Features saved with np.save and loaded with mmap_mode="r" are read-only; fit must not warn."""
    import warnings

    rows = np.random.default_rng(0).normal(size=(4, 6, 6, 300)).astype(np.float32)
    np.save(tmp_path / "features.npy", rows)
    mapped = np.load(tmp_path / "features.npy", mmap_mode="r")
    assert not mapped.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bank = CoresetSampler(sampling_ratio=0.1, projection_dim=32, random_state=0).fit_transform(mapped)
    expected = CoresetSampler(sampling_ratio=0.1, projection_dim=32, random_state=0).fit_transform(rows)
    np.testing.assert_array_equal(np.asarray(bank), np.asarray(expected))
