"""PatchCoreDetector: search correctness, scores, maps, calibration, errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import CoresetSampler, PatchCoreDetector
from skpatchcore.coreset import PatchRows
from skpatchcore.detector import GROUPED_SCORES_ONLY_NNDESCENT_CANDIDATES, SCORES_ONLY_NNDESCENT_CANDIDATES
from skpatchcore.search import (
    MIN_NNDESCENT_CANDIDATES,
    BFloat16Shortlist,
    brute_force_kneighbors,
    build_nndescent,
    nndescent_kneighbors,
)


def brute_force(queries, bank, k):
    distances = np.linalg.norm(queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64), axis=2)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


@pytest.mark.parametrize("n_neighbors", [1, 3])
def test_exact_search_equals_brute_force(rng, monkeypatch, n_neighbors):
    import skpatchcore.search as search

    # Many blocks of queries and of bank rows (the last ones partial), merged into a running top-k.
    monkeypatch.setattr(search, "QUERY_BLOCK", 16)
    monkeypatch.setattr(search, "BANK_BLOCK", 70)
    bank = rng.normal(size=(300, 24)).astype(np.float32)
    queries = rng.normal(size=(70, 24)).astype(np.float32)
    distances, indices = brute_force_kneighbors(queries, bank, n_neighbors)
    expected_distances, expected_indices = brute_force(queries, bank, n_neighbors)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-5)
    # Ties go to the lowest row, across blocks too: every row duplicated 70 rows later.
    doubled = np.concatenate([bank[:70], bank[:70]])
    assert (brute_force_kneighbors(queries, doubled, 1)[1] < 70).all()
    # Leave-group-out: a whole block of the query's own group is skipped.
    query_groups, bank_groups = np.zeros(70, dtype=int), np.repeat(np.arange(5), 60)
    distances, indices = brute_force_kneighbors(queries, bank, n_neighbors, groups=(query_groups, bank_groups))
    expected_distances, expected_indices = brute_force(queries, bank[60:], n_neighbors)
    np.testing.assert_array_equal(indices, expected_indices + 60)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-5)


def test_pynndescent_agrees_with_exact(rng):
    # Patch features lie near a low-dimensional manifold: emulate with a
    # random 6-D subspace of a 64-D space plus a little noise.
    basis = rng.normal(size=(6, 64))
    bank = (rng.normal(size=(4000, 6)) @ basis + 0.05 * rng.normal(size=(4000, 64))).astype(np.float32)
    queries = (rng.normal(size=(500, 6)) @ basis + 0.05 * rng.normal(size=(500, 64))).astype(np.float32)
    exact_d, exact_i = brute_force_kneighbors(queries, bank, 1)
    approx_d, approx_i = nndescent_kneighbors(build_nndescent(bank, random_state=0), queries, 1)
    assert np.mean(approx_i[:, 0] == exact_i[:, 0]) > 0.95
    ratio = approx_d[:, 0] / exact_d[:, 0]
    assert ratio.min() >= 1 - 1e-5  # never closer than the true nearest neighbour
    assert np.quantile(ratio, 0.99) < 1.05


@pytest.mark.parametrize("n_jobs", [None, 1, 2, -1, -2])
def test_pynndescent_queries_on_n_jobs_threads_find_what_one_thread_finds(rng, n_jobs):
    import os

    import numba

    import skpatchcore.search

    bank = rng.normal(size=(3000, 16)).astype(np.float32)
    queries = rng.normal(size=(4, 6, 6, 16)).astype(np.float32)
    detector = PatchCoreDetector(algorithm="pynndescent", random_state=0, n_jobs=1).fit(bank)
    one_thread = detector.patch_scores(queries)  # builds the index
    detector.set_params(n_jobs=n_jobs)  # the same index, queried on other threads
    before = numba.get_num_threads()
    seen = []
    query = skpatchcore.search.nndescent_kneighbors

    def spy(*args, **kwargs):
        seen.append(numba.get_num_threads())
        return query(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(skpatchcore.search, "nndescent_kneighbors", spy)
        maps = detector.patch_scores(queries)
    np.testing.assert_array_equal(maps, one_thread)
    cores, cpus = numba.config.NUMBA_NUM_THREADS, os.cpu_count()
    expected = {None: torch.get_num_threads(), 1: 1, 2: 2, -1: cpus, -2: max(1, cpus - 1)}[n_jobs]
    assert seen and set(seen) == {max(1, min(expected, cores))}
    assert numba.get_num_threads() == before  # restored after the query


@pytest.mark.parametrize("n_jobs", [-1, -2])
def test_pynndescent_index_builds_with_negative_n_jobs(rng, n_jobs):
    # pynndescent itself refuses n_jobs=-2 (numba: "number of threads must be between 1 and ...").
    bank = rng.normal(size=(3000, 16)).astype(np.float32)
    queries = rng.normal(size=(200, 16)).astype(np.float32)
    scores = PatchCoreDetector(algorithm="pynndescent", random_state=0, n_jobs=n_jobs).fit(bank).score_samples(queries)
    exact = PatchCoreDetector(algorithm="exact").fit(bank).score_samples(queries)
    assert np.all(scores <= exact + 1e-4)  # never closer than the true nearest row (scores are negated)
    assert np.corrcoef(exact, scores)[0, 1] > 0.99


def test_detector_algorithms_give_close_scores(rng):
    bank = rng.normal(size=(3000, 16)).astype(np.float32)
    queries = rng.normal(size=(200, 16))
    exact = PatchCoreDetector(algorithm="exact").fit(bank).score_samples(queries)
    approx = PatchCoreDetector(algorithm="pynndescent", random_state=0).fit(bank).score_samples(queries)
    assert np.corrcoef(exact, approx)[0, 1] > 0.99


def test_image_score_is_largest_patch_distance(rng):
    train = rng.normal(size=(4, 5, 5, 6)).astype(np.float32)
    test = rng.normal(size=(3, 5, 5, 6)).astype(np.float32)
    detector = PatchCoreDetector().fit(train)
    patch, _ = brute_force(test.reshape(-1, 6), train.reshape(-1, 6), 1)
    grids = patch[:, 0].reshape(3, 5, 5)
    np.testing.assert_allclose(detector.patch_scores(test), grids, rtol=1e-5)
    np.testing.assert_allclose(detector.score_samples(test), -grids.max(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(detector.decision_function(test), detector.score_samples(test) - detector.offset_)


def test_k_neighbours_average(rng):
    bank = rng.normal(size=(100, 4))
    queries = rng.normal(size=(10, 4))
    expected, _ = brute_force(queries, bank, 3)
    got = PatchCoreDetector(n_neighbors=3).fit(bank).score_samples(queries)
    np.testing.assert_allclose(got, -expected.mean(axis=1), rtol=1e-5)


def test_anomaly_maps_follow_the_official_recipe(rng):
    train = rng.normal(size=(3, 7, 7, 8)).astype(np.float32)
    test = rng.normal(size=(2, 7, 7, 8)).astype(np.float32)
    test[1, 2, 5] += 25.0  # one anomalous patch
    detector = PatchCoreDetector().fit(train)
    grids = detector.patch_scores(test)
    upsampled = F.interpolate(torch.from_numpy(grids)[:, None], size=(56, 56), mode="bilinear", align_corners=False)
    expected = np.stack([gaussian_filter(m, sigma=4) for m in upsampled[:, 0].numpy()])
    scores, maps = detector.score_and_maps(test, 56)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, detector.score_samples(test))
    peak = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
    assert abs(peak[0] - (2 + 0.5) * 8) <= 8 and abs(peak[1] - (5 + 0.5) * 8) <= 8
    assert detector.anomaly_maps(test, (40, 30)).shape == (2, 40, 30)


def test_map_sigma_sets_the_smoothing_and_leaves_image_scores_alone(rng):
    train = rng.normal(size=(3, 7, 7, 8)).astype(np.float32)
    test = rng.normal(size=(2, 7, 7, 8)).astype(np.float32)
    test[1, 2, 5] += 25.0
    detector = PatchCoreDetector().fit(train)
    grids = detector.patch_scores(test)
    upsampled = F.interpolate(torch.from_numpy(grids)[:, None], size=(56, 56), mode="bilinear",
                              align_corners=False)[:, 0].numpy()
    scores = detector.score_samples(test)
    for sigma in (0, 1.5, 8):
        sigma_scores, maps = detector.set_params(map_sigma=sigma).score_and_maps(test, 56)
        expected = upsampled if sigma == 0 else np.stack([gaussian_filter(m, sigma=sigma) for m in upsampled])
        np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(sigma_scores, scores)
    for bad in (-1, float("nan"), float("inf"), "4", True):
        with pytest.raises(InvalidParameterError, match="'map_sigma' parameter of PatchCoreDetector must be"):
            PatchCoreDetector(map_sigma=bad).fit(train)


def test_reweighting_matches_equation_seven(rng):
    bank = rng.normal(size=(60, 5))
    query = rng.normal(size=(1, 5)) * 3
    detector = PatchCoreDetector(reweight=True, reweight_neighbors=4).fit(bank)
    distances = np.linalg.norm(bank - query, axis=1)
    nearest = np.argmin(distances)
    support = np.argsort(np.linalg.norm(bank - bank[nearest], axis=1), kind="stable")[:4]
    weights = np.exp(distances[support])
    expected = (1 - np.exp(distances[nearest]) / weights.sum()) * distances[nearest]
    assert -detector.score_samples(query)[0] == pytest.approx(expected, rel=1e-5)


def test_offset_comes_from_leave_image_out_scores(rng):
    train = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
    detector = PatchCoreDetector().fit(train)
    rows = train.reshape(6, 16, 3)
    expected = []
    for i in range(6):
        others = np.concatenate([rows[j] for j in range(6) if j != i])
        expected.append(brute_force(rows[i], others, 1)[0].max())
    np.testing.assert_allclose(np.sort(detector.calibration_scores_), np.sort(expected), rtol=1e-5)
    assert detector.offset_ == pytest.approx(-max(expected), rel=1e-5)
    # In-sample scores are zero; the calibrated threshold is far from them.
    assert np.all(detector.score_samples(train) == 0)
    assert detector.offset_ < -0.1


def test_coreset_rows_keep_their_image_for_calibration(rng):
    train = rng.normal(size=(8, 6, 6, 4)).astype(np.float32)
    bank = CoresetSampler(sampling_ratio=0.5, random_state=0).fit_transform(train)
    assert isinstance(bank, PatchRows)
    with_images = PatchCoreDetector().fit(bank)
    rows_only = PatchCoreDetector().fit(np.asarray(bank))
    assert len(with_images.calibration_scores_) == 8  # one score per training image
    assert len(rows_only.calibration_scores_) == len(bank)  # leave-one-out rows


def test_contamination_sets_the_quantile(rng):
    X = rng.normal(size=(400, 3))
    detector = PatchCoreDetector(contamination=0.1).fit(X)
    threshold = np.quantile(detector.calibration_scores_, 0.9)
    assert detector.offset_ == pytest.approx(-threshold)
    new = rng.normal(size=(2000, 3))
    rate = np.mean(detector.predict(new) == -1)
    assert 0.03 < rate < 0.25
    assert set(np.unique(PatchCoreDetector().fit(X).predict(np.vstack([X[:5], X[:5] + 50])))) == {-1, 1}


def test_no_fit_predict_for_a_novelty_detector():
    assert not hasattr(PatchCoreDetector(), "fit_predict")
    with pytest.raises(AttributeError) as error:
        _ = PatchCoreDetector().fit_predict
    assert "novelty detector" in str(error.value.__cause__)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(n_neighbors=0), "n_neighbors"),
        (dict(algorithm="faiss"), "algorithm"),
        (dict(contamination=0.7), "contamination"),
        (dict(reweight_neighbors=0), "reweight_neighbors"),
    ],
)
def test_bad_parameters(params, match, rng):
    with pytest.raises(ValueError, match=match):
        PatchCoreDetector(**params).fit(rng.normal(size=(20, 3)))


def test_bad_inputs(rng):
    detector = PatchCoreDetector().fit(rng.normal(size=(2, 3, 3, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="8 features"):
        detector.score_samples(rng.normal(size=(1, 3, 3, 16)))
    with pytest.raises(ValueError, match="NaN"):
        detector.score_samples(np.full((1, 3, 3, 8), np.nan))
    with pytest.raises(ValueError, match="4 dimensions|n_images, h, w"):
        detector.anomaly_maps(rng.normal(size=(5, 8)), 32)
    with pytest.raises(ValueError, match="shape"):
        detector.score_samples(rng.normal(size=(1, 3, 8)))
    with pytest.raises(NotFittedError):
        PatchCoreDetector().score_samples(rng.normal(size=(3, 8)))
    with pytest.raises(ValueError, match="at least two training images"):
        PatchCoreDetector().fit(rng.normal(size=(1, 3, 3, 8)))


def test_bfloat16_shortlist_finds_the_nearest_neighbours(rng):
    basis = rng.normal(size=(16, 256))
    bank = (rng.normal(size=(3000, 16)) @ basis + 5 + 0.1 * rng.normal(size=(3000, 256))).astype(np.float32)
    queries = (rng.normal(size=(400, 16)) @ basis + 5 + 0.1 * rng.normal(size=(400, 256))).astype(np.float32)
    exact_d, exact_i = brute_force_kneighbors(queries, bank, 2)
    shortlist = BFloat16Shortlist(bank)
    assert shortlist.n_components == 64  # 16 informative directions, at least 64 kept
    short_d, short_i = shortlist.kneighbors(queries, 2)
    assert np.mean(short_i[:, 0] == exact_i[:, 0]) > 0.99
    assert np.all(short_d[:, 0] >= exact_d[:, 0] - 1e-5)  # exact float32 distances
    np.testing.assert_allclose(np.median(short_d / exact_d, axis=0), 1.0, atol=1e-6)


@pytest.mark.parametrize("n_bank", [100, 1000, 1001])
def test_bfloat16_shortlist_selection_keeps_the_smallest_products(rng, n_bank):
    # Candidates come from the groups with the smallest minima, not from a
    # top-k over every row; they must still be the smallest products. 100
    # rows are too few for groups (8 candidates x 16 rows); 1001 pads the
    # last group with rows that must never be chosen.
    bank = rng.normal(size=(n_bank, 80)).astype(np.float32)
    queries = torch.from_numpy(rng.normal(size=(150, 80)).astype(np.float32))
    shortlist = BFloat16Shortlist(bank)
    with torch.inference_mode():
        products = (shortlist._query_operand(queries) @ shortlist.operand[:n_bank].T).float()
        chosen = shortlist._candidates(queries, 8)
    assert chosen.shape == (150, 8) and int(chosen.max()) < n_bank
    assert all(len(set(row)) == 8 for row in chosen.tolist())
    expected = torch.topk(products, 8, dim=1, largest=False).values
    torch.testing.assert_close(products.gather(1, chosen).sort(dim=1).values, expected, rtol=0, atol=0)


@pytest.mark.parametrize("n_neighbors", [1, 3])
def test_bfloat16_shortlist_exact_kneighbors_equals_brute_force(rng, n_neighbors):
    # Isotropic data with 64 of 128 axes kept: half the variance is left
    # out, so the shortlist misses neighbours and the PCA lower bound is
    # loose; the pruned search must still return what brute force returns.
    bank = rng.normal(size=(3000, 128)).astype(np.float32)
    queries = rng.normal(size=(200, 128)).astype(np.float32)
    shortlist = BFloat16Shortlist(bank, explained_variance=0.5)
    assert shortlist.n_components == 64
    exact_d, exact_i = brute_force_kneighbors(queries, bank, n_neighbors)
    short_d, short_i = shortlist.kneighbors(queries, n_neighbors)
    assert np.mean(short_i == exact_i) < 0.95  # the shortlist alone is not exact here
    for upper in (None, short_d[:, -1]):  # bounds found again, or given
        pruned_d, pruned_i = shortlist.exact_kneighbors(queries, n_neighbors, upper)
        np.testing.assert_array_equal(pruned_i, exact_i)
        np.testing.assert_allclose(pruned_d, exact_d, rtol=1e-6)


def test_bfloat16_shortlist_resolves_distances_far_smaller_than_the_norms(rng):
    # Tight clusters of 10 rows far from the origin: within a cluster the
    # values |b|^2 - 2 q.b differ by less than bfloat16 resolves at their
    # size (an earlier version found 37-51% of these neighbours); the product
    # of the augmented operands returns the small squared distance itself.
    centres = 1000 + 10 * rng.normal(size=(200, 4)) @ rng.normal(size=(4, 96))
    bank = (np.repeat(centres, 10, axis=0) + 0.3 * rng.normal(size=(2000, 96))).astype(np.float32)
    picks = rng.choice(2000, 300, replace=False)
    queries = (bank[picks] + 1e-3 * rng.normal(size=(300, 96))).astype(np.float32)
    short_d, short_i = BFloat16Shortlist(bank).kneighbors(queries, 1)
    assert np.mean(short_i[:, 0] == picks) > 0.99


def test_auto_rule(rng, monkeypatch):
    import skpatchcore.detector as detector_module

    detector = PatchCoreDetector(device="cpu").fit(rng.normal(size=(3000, 512)).astype(np.float32))
    assert detector.search_algorithm(10) == "exact"  # small call
    monkeypatch.setattr(detector_module, "bfloat16_speedup", lambda: 3.0)
    assert detector.search_algorithm(10_000) == "bf16"
    monkeypatch.setattr(detector_module, "bfloat16_speedup", lambda: 0.5)
    assert detector.search_algorithm(10_000) == "pynndescent"  # exact float32 is slower there
    monkeypatch.setattr(detector_module, "AUTO_NNDESCENT_BANK_ROWS", 2000)
    assert detector.search_algorithm(10_000) == "pynndescent"
    assert PatchCoreDetector(algorithm="bf16").fit(rng.normal(size=(50, 4))).search_algorithm(1) == "bf16"
    # A small bank (the demo's: 1,200 rows x 152 dims) is searched exactly however many queries come.
    small = PatchCoreDetector(device="cpu").fit(rng.normal(size=(1200, 152)).astype(np.float32))
    assert small.search_algorithm(1_000_000) == "exact"
    for bad in (True, -1, 2.5):
        with pytest.raises(ValueError, match="n_queries must be a non-negative int"):
            small.search_algorithm(bad)
    with pytest.raises(NotFittedError):
        PatchCoreDetector().search_algorithm(1)


def _count_queries(monkeypatch, method: str) -> list:
    """The number of queries of every call of ``BankSearch.<method>`` from now on, in a list."""
    from skpatchcore.search import BankSearch

    counts = []
    search = getattr(BankSearch, method)

    def spy(self, queries, *args, **kwargs):
        counts.append(len(queries))
        return search(self, queries, *args, **kwargs)

    monkeypatch.setattr(BankSearch, method, spy)
    return counts


def _patches_near_a_subspace(rng, n_test: int):
    """Training and test patch features near an 8-dimensional subspace of 64; every third test image has
    one outlying patch."""
    basis = rng.normal(size=(8, 64))
    train = (rng.normal(size=(30, 6, 6, 8)) @ basis + 0.3 * rng.normal(size=(30, 6, 6, 64))).astype(np.float32)
    test = (rng.normal(size=(n_test, 6, 6, 8)) @ basis + 0.3 * rng.normal(size=(n_test, 6, 6, 64))).astype(np.float32)
    test[::3, 2, 2] += 3.0
    return train, test


@pytest.mark.parametrize("algorithm", ["bf16", "pynndescent"])
def test_approximate_search_keeps_image_scores_exact(algorithm, rng):
    train, test = _patches_near_a_subspace(rng, n_test=20)
    exact = PatchCoreDetector(algorithm="exact").fit(train)
    approximate = PatchCoreDetector(algorithm=algorithm, random_state=0).fit(train)
    np.testing.assert_allclose(approximate.score_samples(test), exact.score_samples(test), rtol=1e-5)
    # Patch scores are upper bounds of the exact ones.
    assert np.all(approximate.patch_scores(test) >= exact.patch_scores(test) * (1 - 1e-5))


@pytest.mark.parametrize("reweight", [False, True])
@pytest.mark.parametrize("maps", [True, False])
def test_patch_scores_for_maxima_only_keep_image_scores_exact(maps, reweight, rng):
    train, test = _patches_near_a_subspace(rng, n_test=20)
    exact_scores, exact_grids = PatchCoreDetector(algorithm="exact", reweight=reweight).fit(
        train).score_and_patch_scores(test)
    scores, grids = PatchCoreDetector(algorithm="pynndescent", reweight=reweight, random_state=0).fit(
        train).score_and_patch_scores(test, maps=maps)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
    np.testing.assert_allclose(grids.max(axis=(1, 2)), exact_grids.max(axis=(1, 2)), rtol=1e-5)
    assert np.all(grids >= exact_grids * (1 - 1e-5))


@pytest.mark.parametrize("algorithm", ["bf16", "pynndescent"])
def test_grouped_images_get_their_group_maximum_exact(algorithm, rng):
    # Tiles of one image: only the image's (group's) largest patch score needs exact search.
    train, test = _patches_near_a_subspace(rng, n_test=12)
    groups = np.array([7, 7, 7, 2, 2, 9, 0, 0, 0, 0, 2, 5])  # any labels, groups of 1 to 4, one split in two runs
    exact_scores, exact_grids = PatchCoreDetector(algorithm="exact").fit(train).score_and_patch_scores(test)
    scores, grids = PatchCoreDetector(algorithm=algorithm, random_state=0).fit(train).score_and_patch_scores(
        test, maps=False, groups=groups)
    assert np.all(grids >= exact_grids * (1 - 1e-5))  # upper bounds everywhere
    for label in np.unique(groups):
        mine = np.flatnonzero(groups == label)
        top = mine[np.argmax(grids[mine].max(axis=(1, 2)))]
        np.testing.assert_allclose(grids[top].max(), exact_grids[mine].max(), rtol=1e-5)
        np.testing.assert_allclose(scores[top], exact_scores[mine].min(), rtol=1e-5)


def test_grouped_images_are_certified_once_per_group(rng, monkeypatch):
    from skpatchcore.detector import EXACT_MAXIMA_PATCHES

    searched = _count_queries(monkeypatch, "exact_kneighbors")
    detector = PatchCoreDetector(algorithm="pynndescent", random_state=0).fit(
        rng.normal(size=(30, 6, 6, 8)).astype(np.float32))
    test = rng.normal(size=(8, 6, 6, 8)).astype(np.float32)
    searched.clear()
    detector.score_and_patch_scores(test, maps=False)
    assert searched[0] == 8 * EXACT_MAXIMA_PATCHES  # every image's first patches
    searched.clear()
    detector.score_and_patch_scores(test, maps=False, groups=np.repeat([0, 1], 4))
    assert searched[0] == 2 * EXACT_MAXIMA_PATCHES  # every group's


def test_certification_searches_only_patches_that_can_beat_the_best_exact_score():
    # One group of 12 patches with approximate scores 12, 11, ..., 1 (upper bounds) and exact scores 1,
    # except patch 0 (exact 9.5). Round 1 searches the 2 highest bounds (patches 0, 1) and cannot
    # certify (9.5 < the bound 10 of patch 2); round 2 takes the 4 highest bounds (patches 2, 0, 3, 4)
    # but searches only patch 2: patch 0 is exact already and 3, 4 (bounds 9, 8) cannot beat 9.5. The
    # highest bound left is then 7, so 9.5 is certified.
    from skpatchcore.detector import _patches_by_group

    exact_scores = np.ones(12, dtype=np.float32)
    exact_scores[0] = 9.5
    searched_rounds = []

    class Search:
        def exact_kneighbors(self, queries, n_neighbors, device):
            positions = queries[:, 0].astype(int)
            searched_rounds.append(positions.tolist())
            return exact_scores[positions][:, None], positions[:, None]

    def certify(patch_scores, searched):
        distances, indices = patch_scores[:, None].copy(), np.zeros((12, 1), dtype=np.int64)
        searched_rounds.clear()
        PatchCoreDetector(device="cpu")._make_maxima_exact(
            Search(), np.arange(12, dtype=np.float32)[:, None], _patches_by_group(np.zeros(1), 12),
            patch_scores, distances, indices, searched, "pynndescent")
        return distances

    patch_scores = np.arange(12, 0, -1).astype(np.float32)
    searched = np.zeros(12, dtype=bool)
    distances = certify(patch_scores, searched)
    assert searched_rounds == [[0, 1], [2]]
    assert patch_scores.max() == 9.5 and np.argmax(patch_scores) == 0
    np.testing.assert_array_equal(distances[:3, 0], exact_scores[:3])
    np.testing.assert_array_equal(patch_scores[3:], np.arange(9, 0, -1))  # bounds left as they were
    np.testing.assert_array_equal(np.flatnonzero(searched), [0, 1, 2])

    # A patch that an earlier search made exact (flagged in `searched`) counts from the start, and is
    # not searched again: patches 1, 2 (bounds 11, 10) are searched, then patch 0's 9.5 is certified.
    patch_scores = np.array([9.5, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1], dtype=np.float32)
    searched = np.zeros(12, dtype=bool)
    searched[0] = True
    certify(patch_scores, searched)
    assert searched_rounds == [[1, 2]]
    assert patch_scores.max() == 9.5


@pytest.mark.parametrize("algorithm", ["exact", "bf16", "pynndescent"])
@pytest.mark.parametrize("n_neighbors", [1, 3])
@pytest.mark.parametrize("grid", [(5, 7), (6, 4), (1, 6), (6, 1), (2, 2), (1, 1)])
def test_image_maxima_off_the_sparse_grid_are_exact(grid, n_neighbors, algorithm, rng):
    # Scores without maps search every second row and column first (exact search too, on a CPU); an
    # image's largest patch may lie off that grid (odd rows and columns, the last row and column of odd
    # and even grids).
    height, width = grid
    basis = rng.normal(size=(8, 32))
    train = (rng.normal(size=(40, height, width, 8)) @ basis + 0.3 * rng.normal(size=(40, height, width, 32)))
    test = (rng.normal(size=(6, height, width, 8)) @ basis + 0.3 * rng.normal(size=(6, height, width, 32)))
    test[0, height - 1, width - 1] += 3.0
    test[1, height // 2 * 2 - 1 if height > 1 else 0, 1 if width > 1 else 0] += 3.0
    train, test = train.astype(np.float32), test.astype(np.float32)
    exact_scores, exact_grids = PatchCoreDetector(algorithm="exact", n_neighbors=n_neighbors,
                                                  device="cpu").fit(train).score_and_patch_scores(test)
    for groups in (None, [0, 0, 1, 1, 1, 2]):
        scores, grids = PatchCoreDetector(algorithm=algorithm, n_neighbors=n_neighbors, random_state=0,
                                          device="cpu").fit(train).score_and_patch_scores(test, maps=False,
                                                                                          groups=groups)
        assert np.all(grids >= exact_grids * (1 - 1e-5))  # upper bounds everywhere
        if groups is None and algorithm == "exact":  # the same distances, computed directly
            np.testing.assert_array_equal(scores, exact_scores)
        elif groups is None:
            np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
        else:
            for label in range(3):
                mine = np.flatnonzero(np.asarray(groups) == label)
                np.testing.assert_allclose(grids[mine].max(), exact_grids[mine].max(), rtol=1e-5)


def test_scores_without_maps_search_the_sparse_grid_and_what_it_cannot_bound(rng, monkeypatch):
    # Features constant over each 2 x 2 cell: a cell's top-left patch (on the sparse grid) bounds the
    # cell's other patches by its own score, so only the sparse grid is searched, and the one patch
    # off it that differs from its cell.
    cells = rng.normal(size=(34, 4, 4, 16)).astype(np.float32)
    features = np.repeat(np.repeat(cells, 2, axis=1), 2, axis=2)  # 8 x 8 grids
    train, test = features[:30], features[30:].copy()
    test[1, 3, 5] += 4.0
    searched = _count_queries(monkeypatch, "nndescent_kneighbors")
    detector = PatchCoreDetector(algorithm="pynndescent", random_state=0).fit(train)
    searched.clear()
    scores, grids = detector.score_and_patch_scores(test, maps=False)
    assert searched == [4 * 16, 1]
    exact_scores, exact_grids = PatchCoreDetector(algorithm="exact").fit(train).score_and_patch_scores(test)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
    assert np.argmax(grids[1]) == 3 * 8 + 5


def test_sparse_grid_anchors_are_the_searched_corners_around_each_patch():
    from skpatchcore.detector import _sparse_grid_anchors

    # A 3 x 3 grid: the sparse grid is positions 0, 2, 6, 8; the centre has all four as corners.
    np.testing.assert_array_equal(_sparse_grid_anchors(3, 3), [
        [0, -1, -1, -1], [0, -1, 2, -1], [2, -1, -1, -1],
        [0, 6, -1, -1], [0, 6, 2, 8], [2, 8, -1, -1],
        [6, -1, -1, -1], [6, -1, 8, -1], [8, -1, -1, -1]])
    # The last row and column of an even grid have only the sparse patches before them.
    anchors = _sparse_grid_anchors(4, 4)
    np.testing.assert_array_equal(anchors[[5, 15, 12]], [[0, 8, 2, 10], [10, -1, -1, -1], [8, -1, -1, -1]])
    np.testing.assert_array_equal(_sparse_grid_anchors(1, 1), [[0, -1, -1, -1]])


def test_patches_by_group_lists_each_groups_patch_positions():
    from skpatchcore.detector import _patches_by_group

    members = _patches_by_group(np.array([4, 1, 4, 4]), n_patches=2)
    np.testing.assert_array_equal(members, [[2, 3, -1, -1, -1, -1], [0, 1, 4, 5, 6, 7]])


def test_groups_need_one_label_per_image(rng):
    detector = PatchCoreDetector().fit(rng.normal(size=(4, 3, 3, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="groups must hold one label per image of X \\(2\\)"):
        detector.score_and_patch_scores(rng.normal(size=(2, 3, 3, 8)).astype(np.float32), groups=[0, 0, 1])


def test_scores_without_maps_search_fewer_candidates(rng, monkeypatch):
    # Image scores are made exact after the search, so score_samples may search coarsely; maps and
    # rows' scores (2-D input, not made exact) keep the full candidate list.
    import skpatchcore.search as search_module

    tracked = []
    query = search_module.nndescent_kneighbors

    def spy(index, queries, n_neighbors, epsilon=0.1, n_candidates=None):
        tracked.append(search_module.MIN_NNDESCENT_CANDIDATES if n_candidates is None else n_candidates)
        return query(index, queries, n_neighbors, epsilon, n_candidates)

    monkeypatch.setattr(search_module, "nndescent_kneighbors", spy)
    train = rng.normal(size=(30, 6, 6, 8)).astype(np.float32)
    test = rng.normal(size=(4, 6, 6, 8)).astype(np.float32)
    detector = PatchCoreDetector(algorithm="pynndescent", random_state=0).fit(train)
    tracked.clear()
    detector.score_samples(test)
    assert tracked[0] == SCORES_ONLY_NNDESCENT_CANDIDATES < MIN_NNDESCENT_CANDIDATES
    tracked.clear()
    detector.score_and_patch_scores(test, maps=False, groups=[0, 0, 1, 1])  # tiles sharing one certification
    assert tracked[0] == GROUPED_SCORES_ONLY_NNDESCENT_CANDIDATES < SCORES_ONLY_NNDESCENT_CANDIDATES
    for call in (detector.patch_scores, detector.score_and_patch_scores,
                 lambda X: detector.score_samples(X.reshape(-1, 8))):
        tracked.clear()
        call(test)
        assert tracked[0] == MIN_NNDESCENT_CANDIDATES


def test_huge_values_are_refused_instead_of_an_infinite_threshold(rng):
    with pytest.raises(ValueError, match="overflow float32.*StandardScaler"):
        PatchCoreDetector().fit(rng.normal(size=(50, 4)) * 1e20)
    detector = PatchCoreDetector().fit(rng.normal(size=(50, 4)))
    assert np.isfinite(detector.offset_)
    # A huge outlier scores as infinitely far, and is flagged.
    np.testing.assert_array_equal(detector.predict([[1e25, 0, 0, 0], [0, 0, 0, 0]]), [-1, 1])


@pytest.mark.parametrize("algorithm", ["auto", "exact", "bf16"])
def test_calibration_leaves_each_training_image_out(rng, algorithm):
    images = rng.normal(size=(6, 4, 4, 8)).astype(np.float32)
    detector = PatchCoreDetector(n_neighbors=2, random_state=0, algorithm=algorithm).fit(images)
    rows, groups = images.reshape(-1, 8).astype(np.float64), np.repeat(np.arange(6), 16)
    distances = np.linalg.norm(rows[:, None] - rows[None], axis=2)
    distances[groups[:, None] == groups[None]] = np.inf  # never an image's own rows
    row_scores = np.sort(distances, axis=1)[:, :2].mean(axis=1)
    expected = [row_scores[groups == g].max() for g in range(6)]
    np.testing.assert_allclose(detector.calibration_scores_, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="Too few bank rows outside each training image"):
        PatchCoreDetector(n_neighbors=20, algorithm=algorithm).fit(images[:2])


def test_a_coreset_bank_is_stored_without_a_copy_other_input_is_copied(rng):
    from skpatchcore import CoresetSampler

    X = rng.normal(size=(4, 6, 6, 8)).astype(np.float32)
    bank = CoresetSampler(sampling_ratio=0.5, random_state=0).fit_transform(X)
    detector = PatchCoreDetector(random_state=0).fit(bank)
    assert np.shares_memory(detector.memory_bank_, bank) and type(detector.memory_bank_) is np.ndarray
    rows = X.reshape(-1, 8)
    detector = PatchCoreDetector(random_state=0).fit(rows)
    assert not np.shares_memory(detector.memory_bank_, rows)
    rows[:] = 0  # the caller's array may change afterwards
    assert np.any(detector.memory_bank_ != 0)
