"""The union of chunk coresets: effective-radius merge, rows on disk, and what fit holds in memory."""

import os

import numpy as np
import pytest
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import CoresetSampler
from skpatchcore._union import SpilledUnion, gather_rows, largest_effective_radii
from skpatchcore.coreset import ChunkCoreset


def reference_effective_radii(points, radii):
    """Every row's effective radius by brute force in float64 (no early stop)."""
    order = np.argsort(-radii, kind="stable")
    effective = np.empty(len(radii))
    for rank, row in enumerate(order):
        earlier = points[order[:rank]].astype(np.float64)
        nearest = np.sqrt(((earlier - points[row]) ** 2).sum(axis=1)).min() if rank else np.inf
        effective[row] = radii[row] if np.isinf(radii[row]) else min(radii[row], nearest)
    return effective


@pytest.mark.parametrize("n_keep", [1, 37, 150, 300])
def test_effective_radii_match_brute_force_despite_the_early_stop(rng, monkeypatch, n_keep):
    import skpatchcore._union

    monkeypatch.setattr(skpatchcore._union, "QUERY_BLOCK", 16)  # many blocks: the stop is exercised
    monkeypatch.setattr(skpatchcore._union, "EARLIER_BLOCK", 40)
    points = rng.normal(size=(300, 6)).astype(np.float32)
    radii = rng.uniform(0.5, 3.0, size=300)
    picks, effective = largest_effective_radii([points[:100], points[100:]], radii, n_keep)
    expected = reference_effective_radii(points, radii)
    assert len(picks) == n_keep == len(np.unique(picks))
    np.testing.assert_allclose(effective, expected[picks], rtol=1e-4)
    # The kept rows are the n_keep largest effective radii, in that order.
    np.testing.assert_allclose(effective, np.sort(expected)[::-1][:n_keep], rtol=1e-4)
    assert np.all(np.diff(effective) <= 0)


def test_a_pattern_repeated_by_chunks_is_kept_once(rng):
    pattern = rng.normal(size=(20, 8)).astype(np.float32) * 10
    copies = np.concatenate([pattern, pattern + 1e-3, pattern - 1e-3])  # three chunks picked the same rows
    radii = np.concatenate([np.linspace(5, 1, 20)] * 3)
    picks, effective = largest_effective_radii([copies], radii, 20)
    assert sorted(picks % 20) == list(range(20))  # one copy of every pattern row, no repeats
    # A greedy-merge-free prefix would have kept the three copies of the 7 largest radii instead.
    assert np.all(effective > 0.5)


def test_rows_with_infinite_radius_are_always_kept(rng):
    points = rng.normal(size=(50, 4)).astype(np.float32)
    radii = rng.uniform(1, 2, size=50)
    radii[[3, 30]] = np.inf
    points[30] = points[3]  # even an exact duplicate of another kept row
    picks, effective = largest_effective_radii([points], radii, 10)
    assert {3, 30} <= set(picks) and np.isinf(effective[:2]).all()


def test_gather_rows_reads_memory_maps_in_pick_order(tmp_path, rng):
    rows = rng.normal(size=(30, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", rows[:12])
    part = ChunkCoreset(np.load(tmp_path / "a.npy", mmap_mode="r"), np.zeros(12, int), np.arange(12), 100, 1, 1.0)
    parts = [part, ChunkCoreset(rows[12:], np.ones(18, int), np.arange(12, 30), 100, 1, 1.0)]
    picks = np.array([29, 3, 11, 12, 0, 20])
    gathered = gather_rows(parts, picks)
    assert type(gathered) is np.ndarray
    np.testing.assert_array_equal(gathered, rows[picks])


def test_spilled_union_keeps_rows_on_disk_and_removes_them(rng):
    X = rng.normal(size=(4, 10, 10, 8)).astype(np.float32)
    sampler = CoresetSampler(sampling_ratio=0.02, random_state=0).begin_chunks()  # union of 4%: 16 rows
    with SpilledUnion(sampler, n_rows_total=400) as union:
        folder = union._folder.name
        for first in (0, 2):
            union.add(sampler.chunk_coreset(X[first:first + 2], first))
        assert all(isinstance(part.rows, np.memmap) for part in union.parts)
        assert sum(len(part.rows) for part in union.parts) == 16
        assert len(os.listdir(folder)) == 2
        bank = sampler.merge(union.parts)
    assert not os.path.exists(folder)
    assert type(np.asarray(bank)) is np.ndarray and len(bank) == 8
    np.testing.assert_array_equal(bank, X.reshape(-1, 8)[bank.row_index])
    with pytest.raises(RuntimeError, match="stop"):  # a failed fit removes the folder too
        with SpilledUnion(sampler, n_rows_total=400) as union:
            union.add(sampler.chunk_coreset(X[:2], 0))
            folder = union._folder.name
            raise RuntimeError("stop")
    assert not os.path.exists(folder)


def test_radius_merge_keeps_the_union_rows_of_largest_effective_radius(rng):
    X = rng.normal(size=(4, 10, 10, 8)).astype(np.float32)
    X[2:] = X[:2] + 1e-3  # the second chunk repeats the first
    sampler = CoresetSampler(sampling_ratio=0.02, random_state=0).begin_chunks()
    parts = [sampler.chunk_coreset(X[:2], 0), sampler.chunk_coreset(X[2:], 2)]
    bank = sampler.merge(parts)
    assert len(bank) == 8
    # Repeats are dropped: no two bank rows are copies of each other.
    local = np.asarray(bank.row_index) % 200
    assert len(np.unique(local)) == len(local)
    assert np.all(np.diff(sampler.coreset_radii_) <= 0) and np.isnan(sampler.coverage_radius_)
    greedy = CoresetSampler(sampling_ratio=0.02, random_state=0, merge_method="greedy").begin_chunks()
    greedy.seed_ = sampler.seed_
    greedy_bank = greedy.merge(parts)
    assert len(greedy_bank) == 8 and np.isfinite(greedy.coverage_radius_)
    with pytest.raises(InvalidParameterError, match="'merge_method' parameter of CoresetSampler must be"):
        CoresetSampler(merge_method="kmeans").begin_chunks()


def test_chunked_fit_merges_rows_from_disk(synthetic, monkeypatch):
    from skpatchcore import make_patchcore

    seen = []
    original = CoresetSampler.merge

    def spy(self, parts):
        seen.extend(type(part.rows) for part in parts)
        return original(self, parts)

    monkeypatch.setattr(CoresetSampler, "merge", spy)
    model = make_patchcore(backbone="resnet18", weights=None, resize=96, crop_size=None, sampling_ratio=0.05,
                           random_state=0, n_jobs=1, working_memory=4.0)
    model.fit(synthetic.train_images)
    assert seen and set(seen) == {np.memmap}
    sampler, detector = model[1], model[-1]
    assert detector.memory_bank_.shape[0] == int(16 * 144 * 0.05) == len(sampler.coreset_radii_)
    assert np.all(np.diff(sampler.coreset_radii_) <= 0)  # the order partial_fit ranks the bank by
    assert type(detector.memory_bank_) is np.ndarray
    features = model[0].transform(synthetic.train_images).reshape(-1, 1024)  # one batch: float rounding
    np.testing.assert_allclose(features[sampler.coreset_indices_], detector.memory_bank_, atol=1e-5)
    # partial_fit ranks the current bank by its radii: old rows compete with the new ones.
    model.partial_fit(synthetic.train_images[:4])
    assert sampler.n_images_seen_ == 20 and detector.memory_bank_.shape[0] == int(20 * 144 * 0.05)
    assert len(np.unique(sampler.coreset_indices_)) == len(sampler.coreset_indices_)
    assert np.all(np.diff(sampler.coreset_radii_) <= 0)
    # A union no larger than the bank is kept whole, also by decreasing radius.
    sampler.set_params(chunk_sampling_ratio=0.05)
    model.partial_fit(synthetic.train_images[4:8])
    assert np.all(np.diff(sampler.coreset_radii_) <= 0) and sampler.n_images_seen_ == 24


def small_chunked_model(**params):
    from skpatchcore import make_patchcore

    return make_patchcore(backbone="resnet18", weights=None, resize=96, crop_size=None, sampling_ratio=0.05,
                          random_state=0, n_jobs=1, working_memory=4.0, **params)


def test_a_chunked_fit_without_temporary_disk_space_fails_before_reading_images(synthetic, monkeypatch):
    from collections import namedtuple

    import skpatchcore._budget

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(skpatchcore._budget.shutil, "disk_usage", lambda folder: usage(10**9, 10**9, 1000))
    model = small_chunked_model()
    read = []
    monkeypatch.setattr(type(model[0]), "transform", lambda self, X: read.append(len(X)))
    with pytest.raises(OSError, match=r"temporary folder .* needs about .* GB there .*Point TMPDIR"):
        model.fit(synthetic.train_images)
    assert read == []  # refused before any image was read


def test_partial_fit_of_a_model_without_bank_radii_keeps_the_bank_whole(synthetic):
    model = small_chunked_model().fit(synthetic.train_images[:8])
    old_rows = set(model[1].coreset_indices_.tolist())
    del model[1].coreset_radii_  # as in a model saved before the attribute existed
    model.partial_fit(synthetic.train_images[8:])
    assert old_rows <= set(model[1].coreset_indices_.tolist())
    assert model[-1].memory_bank_.shape[0] == int(16 * 144 * 0.05)


def test_grouped_radius_merge_is_exact_for_one_group_and_compares_within_groups(rng):
    from skpatchcore._union import largest_effective_radii_by_group

    points = rng.normal(size=(300, 6)).astype(np.float32)
    radii = np.sort(rng.uniform(0.5, 3.0, size=300))[::-1]
    parts = [points[:100], points[100:200], points[200:]]
    single = largest_effective_radii(parts, radii, 40)
    grouped = largest_effective_radii_by_group(parts, radii, 40, group_rows=300)
    np.testing.assert_array_equal(single[0], grouped[0])
    # Groups of one part: effective radii against the rows of the own part only.
    picks, effective = largest_effective_radii_by_group(parts, radii, 40, group_rows=150)
    expected = np.concatenate([largest_effective_radii([part], radii[i * 100:(i + 1) * 100], 100)[1]
                               for i, part in enumerate(parts)])
    np.testing.assert_allclose(effective, np.sort(expected)[::-1][:40])
    assert len(np.unique(picks)) == 40 and np.all(np.diff(effective) <= 0)
    # A pattern repeated in two groups is kept once per group, not once in all.
    copies = (rng.normal(size=(1, 6)) + 1e-3 * rng.normal(size=(4, 6))).astype(np.float32)
    far = 50 + rng.normal(size=(4, 6)).astype(np.float32)
    blocks = [np.concatenate([copies[:2], far[:2]]), np.concatenate([copies[2:], far[2:]])]
    radii = np.array([9.0, 1.0, 2.0, 1.5, 8.0, 0.9, 1.9, 1.4])
    picks, _ = largest_effective_radii_by_group(blocks, radii, 3, group_rows=4)
    assert set(picks) == {0, 4, 2}
