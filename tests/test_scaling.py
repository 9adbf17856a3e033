"""Bounded-memory fit and scoring, composable coresets, partial_fit and torch threads."""

import numpy as np
import pytest
import sklearn
import torch
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import CoresetSampler, PatchCoreDetector, make_patchcore
from skpatchcore._threads import effective_n_jobs, torch_threads
from skpatchcore.coreset import _project
from skpatchcore.evaluation.metrics import image_auroc

# A 96 px resnet18 image has 12 x 12 patches of 1024 float32: 0.56 MiB of features.
ONE_IMAGE_MIB = 12 * 12 * 1024 * 4 / 2**20
# Fitting holds features, the chunk's greedy picks (0.5 of the rows), projection and greedy
# state: 0.92 MiB an image, so this budget takes 4 images a chunk.
FOUR_IMAGES_MIB = 4.0


def small_model(**params):
    defaults = dict(backbone="resnet18", weights=None, resize=96, crop_size=None, sampling_ratio=0.25,
                    random_state=0, n_jobs=1)
    defaults.update(params)
    return make_patchcore(**defaults)


def count_transform_calls(model, monkeypatch) -> list[int]:
    """Record the number of images of every feature extraction."""
    sizes = []
    transformer = model[0]
    original = type(transformer).transform

    def spy(self, X):
        sizes.append(len(X))
        return original(self, X)

    monkeypatch.setattr(type(transformer), "transform", spy)
    return sizes


@pytest.fixture(scope="module")
def chunked(synthetic):
    """Fitted with a budget of 4 images: 4 chunks of the 16 training images."""
    return small_model(working_memory=FOUR_IMAGES_MIB).fit(synthetic.train_images)


def test_fit_within_the_budget_is_the_single_greedy_pass(synthetic):
    model = small_model().fit(synthetic.train_images)
    params = model.get_params()
    plain = Pipeline([(name, sklearn.clone(step)) for name, step in model.steps]).fit(synthetic.train_images)
    np.testing.assert_array_equal(model[-1].memory_bank_, plain[-1].memory_bank_)
    np.testing.assert_array_equal(model[1].coreset_indices_, plain[1].coreset_indices_)
    assert model[-1].offset_ == plain[-1].offset_
    np.testing.assert_array_equal(model.score_samples(synthetic.test_images),
                                  plain.score_samples(synthetic.test_images))
    assert params["working_memory"] is None


def test_chunked_fit_reads_chunks_and_keeps_the_ratio(synthetic, monkeypatch):
    model = small_model(working_memory=FOUR_IMAGES_MIB)
    sizes = count_transform_calls(model, monkeypatch)
    model.fit(synthetic.train_images)
    assert sizes == [4, 4, 4, 4]  # never more than the budget's images at once
    sampler, detector = model[1], model[-1]
    n_rows = 16 * 12 * 12
    assert sampler.n_rows_seen_ == n_rows and sampler.n_images_seen_ == 16
    assert detector.memory_bank_.shape == (int(n_rows * 0.25), 1024)
    assert set(np.unique(detector.bank_image_index_)) == set(range(16))
    # Global row numbers: every bank row is the row of its image that it claims to be.
    np.testing.assert_array_equal(sampler.coreset_indices_ // 144, detector.bank_image_index_)
    features = model[0].transform(synthetic.train_images).reshape(-1, 1024)
    np.testing.assert_array_equal(features[sampler.coreset_indices_], detector.memory_bank_)


def test_chunked_fit_spreads_the_remainder_over_the_chunks(synthetic, monkeypatch):
    # 5 images under a 4-image budget: two chunks of 3 and 2, not 4 and 1, since a
    # chunk's greedy order costs its rows times its picks (the larger chunk sets the cost).
    model = small_model(working_memory=FOUR_IMAGES_MIB)
    sizes = count_transform_calls(model, monkeypatch)
    model.fit(synthetic.train_images[:5])
    assert sizes == [3, 2]
    assert model[1].n_images_seen_ == 5 and set(np.unique(model[-1].bank_image_index_)) <= set(range(5))
    assert model._fit_chunk(16) == 4 and model._fit_chunk(4) == 4 and model._fit_chunk(9) == 3


def test_chunked_coverage_radius_bounds_every_training_row(chunked, synthetic):
    assert np.isnan(chunked[1].coverage_radius_)  # the radius merge computes no bound
    greedy = small_model(working_memory=FOUR_IMAGES_MIB).set_params(coreset__merge_method="greedy")
    greedy.fit(synthetic.train_images)
    sampler, bank = greedy[1], greedy[-1].memory_bank_
    rows = greedy[0].transform(synthetic.train_images).reshape(-1, 1024)
    projection = sampler._shared_projection(1024)
    projected_rows, projected_bank = _project(rows, projection), _project(bank, projection)
    nearest = torch.cdist(torch.from_numpy(projected_rows).double(),
                          torch.from_numpy(projected_bank).double()).min(dim=1).values
    assert float(nearest.max()) <= sampler.coverage_radius_ * (1 + 1e-5)
    assert 0 < sampler.coverage_radius_ < np.inf


def test_chunked_fit_detects_like_the_single_pass(chunked, synthetic):
    single = small_model().fit(synthetic.train_images)
    chunked_auroc = image_auroc(synthetic.test_labels, -chunked.score_samples(synthetic.test_images))
    single_auroc = image_auroc(synthetic.test_labels, -single.score_samples(synthetic.test_images))
    assert chunked_auroc >= single_auroc - 0.05 and chunked_auroc > 0.9


def test_chunk_coresets_depend_only_on_seed_and_first_image(chunked, synthetic):
    sampler = CoresetSampler(sampling_ratio=0.05, random_state=0).begin_chunks()  # keeps 20% of a chunk
    features = chunked[0].transform(synthetic.train_images[4:8])
    first = sampler.chunk_coreset(features, first_image=4)
    again = sampler.chunk_coreset(features, first_image=4)
    np.testing.assert_array_equal(first.rows, again.rows)
    np.testing.assert_array_equal(first.row_index, again.row_index)
    assert first.image_index.min() >= 4 and first.row_index.min() >= 4 * 144
    other = sampler.chunk_coreset(features, first_image=8)  # other starting points
    assert not np.array_equal(first.row_index - 4 * 144, other.row_index - 8 * 144)


def test_chunk_coresets_keep_four_times_the_ratio_by_default(synthetic):
    assert CoresetSampler(sampling_ratio=0.01).chunk_ratio() == 0.04
    assert CoresetSampler(sampling_ratio=0.005).chunk_ratio() == 0.02
    assert CoresetSampler(sampling_ratio=0.02).chunk_ratio() == 0.04
    assert CoresetSampler(sampling_ratio=0.1).chunk_ratio() == pytest.approx(0.15)  # room to drop repeats
    assert CoresetSampler(sampling_ratio=0.8).chunk_ratio() == 1.0
    assert CoresetSampler(sampling_ratio=0.1, chunk_sampling_ratio=0.3).chunk_ratio() == 0.3
    model = small_model(working_memory=FOUR_IMAGES_MIB, sampling_ratio=0.1)
    model.set_params(coreset__chunk_sampling_ratio=0.1).fit(synthetic.train_images)  # no merge pass
    assert model._fit_chunk(16) < 16
    assert model[-1].memory_bank_.shape[0] == int(16 * 144 * 0.1)
    assert image_auroc(synthetic.test_labels, -model.score_samples(synthetic.test_images)) > 0.9


def spread_part(sampler, X, first_image):
    part = sampler.chunk_coreset(X, first_image=first_image)
    assert np.all(np.diff(part.radii) <= 0)  # greedy radii never grow
    return part


def test_allocation_takes_more_rows_from_varied_chunks_by_one_threshold(rng):
    varied = rng.normal(size=(2, 10, 10, 8)).astype(np.float32)
    plain = (0.01 * rng.normal(size=(2, 10, 10, 8))).astype(np.float32)
    sampler = CoresetSampler(sampling_ratio=0.1, random_state=0).begin_chunks()
    parts = [spread_part(sampler, varied, 0), spread_part(sampler, plain, 2)]
    assert [len(part.rows) for part in parts] == [45, 45]  # greedy order to 1.5 times the union's share
    kept = sampler.allocate(parts, n_rows_total=400)
    assert sum(len(part.rows) for part in kept) == 60
    assert len(kept[0].rows) > 40 and len(kept[1].rows) >= 1
    for part, whole in zip(kept, parts):
        n = len(part.rows)
        np.testing.assert_array_equal(part.row_index, whole.row_index[:n])  # a prefix of the greedy order
        assert part.radius == (whole.radii[n] if n < len(whole.rows) else whole.radius)
    # One threshold: no dropped pick (after a chunk's first) lies above a kept one.
    dropped = np.concatenate([whole.radii[len(part.rows):] for part, whole in zip(kept, parts)])
    kept_radii = np.concatenate([part.radii[1:] for part in kept])
    assert dropped.max() <= kept_radii.min()
    # Arrival order does not matter (Dask results come as they finish).
    again = sampler.allocate(parts[::-1], n_rows_total=400)
    for a, b in zip(kept, again):
        np.testing.assert_array_equal(a.row_index, b.row_index)
    # Rows without radii (an existing bank) are all kept.
    bank = parts[1]._replace(radii=None, rows=parts[1].rows[:20], row_index=parts[1].row_index[:20],
                             image_index=parts[1].image_index[:20], projected=None)
    with_bank = sampler.allocate([bank, parts[0]], n_rows_total=400)
    assert len(with_bank[1].rows) == 20 and len(with_bank[0].rows) == 40


def test_scoring_in_chunks_gives_the_same_scores_and_maps(chunked, synthetic, monkeypatch):
    whole = chunked.score_and_maps(synthetic.test_images)
    chunked.set_params(working_memory=3 * ONE_IMAGE_MIB)
    try:
        sizes = count_transform_calls(chunked, monkeypatch)
        scores, maps = chunked.score_and_maps(synthetic.test_images)
        assert max(sizes) <= 3 and sum(sizes) == len(synthetic.test_images)
        np.testing.assert_array_equal(scores, whole[0])
        np.testing.assert_array_equal(maps, whole[1])
        np.testing.assert_array_equal(chunked.score_samples(synthetic.test_images), whole[0])
        decision = chunked.decision_function(synthetic.test_images)
        np.testing.assert_allclose(decision, whole[0] - chunked[-1].offset_)
        np.testing.assert_array_equal(chunked.predict(synthetic.test_images), np.where(decision < 0, -1, 1))
        chunks = list(chunked.iter_score_and_maps(synthetic.test_images, maps=False))
        step = chunked._score_chunk()  # features plus search results and maps: 2 images
        assert 1 < step <= 3
        assert [len(indices) for indices, _, _ in chunks] == [len(r) for r in np.array_split(
            np.arange(20), range(step, 20, step))]
        assert all(maps is None for _, _, maps in chunks)
    finally:
        chunked.set_params(working_memory=None)


def test_detector_scores_four_d_input_in_chunks(chunked, synthetic):
    detector = chunked[-1]
    features = chunked[0].transform(synthetic.test_images[:6])
    whole = detector.score_and_maps(features, 96)
    detector.set_params(working_memory=0.2)  # a map pair is 72 kB: two images a chunk
    try:
        scores, maps = detector.score_and_maps(features, 96)
        np.testing.assert_array_equal(scores, whole[0])
        np.testing.assert_array_equal(maps, whole[1])
        np.testing.assert_array_equal(detector.score_samples(features), whole[0])
    finally:
        detector.set_params(working_memory=None)


def test_a_budget_below_one_image_is_a_clear_error(synthetic):
    with pytest.raises(ValueError, match=r"working_memory=0.1 MiB is smaller than one image.*raise working_memory"):
        small_model(working_memory=0.1).fit(synthetic.train_images[:4])
    with pytest.raises(InvalidParameterError, match="'working_memory' parameter of PatchCorePipeline must be"):
        small_model(working_memory=-1).fit(synthetic.train_images[:4])
    model = small_model().fit(synthetic.train_images[:4])
    with pytest.raises(ValueError, match="smaller than one image"):
        model.set_params(working_memory=0.1).score_samples(synthetic.test_images[:2])


def test_sklearn_working_memory_setting_is_the_default_budget(synthetic, monkeypatch):
    model = small_model()
    sizes = count_transform_calls(model, monkeypatch)
    with sklearn.config_context(working_memory=FOUR_IMAGES_MIB):
        model.fit(synthetic.train_images[:8])
    assert sizes == [4, 4]


def test_partial_fit_adds_images_without_reading_the_old_ones(synthetic, monkeypatch):
    model = small_model(working_memory=FOUR_IMAGES_MIB).fit(synthetic.train_images[:8])
    offset_before = model[-1].offset_
    sizes = count_transform_calls(model, monkeypatch)
    model.partial_fit(synthetic.train_images[8:])
    assert sizes == [4, 4]  # only the new images
    sampler, detector = model[1], model[-1]
    assert sampler.n_images_seen_ == 16 and sampler.n_rows_seen_ == 16 * 144
    assert detector.memory_bank_.shape[0] == int(16 * 144 * 0.25)
    assert set(np.unique(detector.bank_image_index_)) == set(range(16))
    assert detector.offset_ != offset_before  # recalibrated on the new bank
    assert image_auroc(synthetic.test_labels, -model.score_samples(synthetic.test_images)) > 0.9


def test_partial_fit_keeps_the_random_rows_of_the_bank(synthetic):
    model = small_model(working_memory=FOUR_IMAGES_MIB).set_params(coreset__random_fraction=0.2)
    model.fit(synthetic.train_images[:8])
    sampler, detector = model[1], model[-1]
    random_rows = set(sampler.coreset_indices_[np.isinf(sampler.coreset_radii_)])
    assert random_rows  # a chunked fit of 8 x 144 rows at 25% draws about 58 of them
    model.partial_fit(synthetic.train_images[8:])
    kept = sampler.coreset_indices_[np.isinf(sampler.coreset_radii_)]
    assert random_rows < set(kept)  # the old random rows stay, the new images add theirs
    assert detector.memory_bank_.shape[0] == int(16 * 144 * 0.25)


def test_partial_fit_on_an_unfitted_model_fits(synthetic):
    first = small_model(working_memory=FOUR_IMAGES_MIB).partial_fit(synthetic.train_images[:8])
    fitted = small_model(working_memory=FOUR_IMAGES_MIB).fit(synthetic.train_images[:8])
    np.testing.assert_array_equal(first[-1].memory_bank_, fitted[-1].memory_bank_)


def test_partial_fit_skips_anomalous_samples_and_needs_the_patchcore_steps(synthetic):
    model = small_model(sampling_ratio=1.0).fit(synthetic.train_images[:4])
    model.partial_fit(np.concatenate([synthetic.train_images[4:6], synthetic.test_images[-2:]]), y=[0, 0, 1, 1])
    assert model[1].n_images_seen_ == 6
    tabular = Pipeline([("detector", PatchCoreDetector())])
    from skpatchcore import PatchCorePipeline

    with pytest.raises(AttributeError, match="has no attribute 'partial_fit'") as error:
        PatchCorePipeline(tabular.steps).partial_fit(np.zeros((5, 2)))
    assert "PatchFeatureTransformer -> CoresetSampler -> PatchCoreDetector" in str(error.value.__cause__)
    assert not hasattr(PatchCorePipeline(tabular.steps), "partial_fit")


def test_detector_partial_fit_appends_rows_and_recalibrates(rng):
    X = rng.normal(size=(200, 4))
    detector = PatchCoreDetector(random_state=0).fit(X[:100])
    detector.partial_fit(X[100:])
    full = PatchCoreDetector(random_state=0).fit(X)
    np.testing.assert_array_equal(detector.memory_bank_, full.memory_bank_)
    assert detector.offset_ == full.offset_
    images = rng.normal(size=(3, 4, 4, 4)).astype(np.float32)
    detector = PatchCoreDetector(random_state=0).fit(images[:2]).partial_fit(images[2:])
    np.testing.assert_array_equal(detector.bank_image_index_, np.repeat([0, 1, 2], 16))


def test_sampler_merge_of_one_chunk_equals_its_coreset(rng):
    X = rng.normal(size=(2, 10, 10, 8)).astype(np.float32)
    sampler = CoresetSampler(sampling_ratio=0.1, chunk_sampling_ratio=0.1, random_state=0).begin_chunks()
    part = sampler.chunk_coreset(X, first_image=0)
    assert len(part.rows) == 30  # the greedy order runs to 1.5 times the chunk ratio
    bank = sampler.merge([part])
    np.testing.assert_array_equal(bank, part.rows[:20])
    assert sampler.n_rows_seen_ == 200 and sampler.n_features_in_ == 8
    # At 2% the union keeps 4%; the merge keeps 2% of all rows among them: within one chunk
    # no row is nearer an earlier pick than its radius, so the radius merge keeps the greedy prefix.
    sampler = CoresetSampler(sampling_ratio=0.02, random_state=0).begin_chunks()
    part = sampler.chunk_coreset(X, first_image=0)
    assert len(part.rows) == 12
    bank = sampler.merge([part])
    np.testing.assert_array_equal(bank.row_index, part.row_index[:4])
    greedy = CoresetSampler(sampling_ratio=0.02, random_state=0, merge_method="greedy").begin_chunks()
    greedy.seed_ = sampler.seed_
    bank = greedy.merge([part])
    assert len(bank) == 4 and set(bank.row_index) <= set(part.row_index[:8])
    with pytest.raises(ValueError, match="n_images, h, w, n_features"):
        sampler.chunk_coreset(X[0])
    with pytest.raises(ValueError, match="at least one"):
        sampler.merge([])
    with pytest.raises(InvalidParameterError, match="'chunk_sampling_ratio' parameter of CoresetSampler must be"):
        CoresetSampler(chunk_sampling_ratio=2.0).begin_chunks()


def test_torch_threads_follow_n_jobs():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert effective_n_jobs(None) is None
    assert effective_n_jobs(-1) >= 1 and effective_n_jobs(3) == 3
    with pytest.raises(ValueError, match="n_jobs"):
        effective_n_jobs(0)


def test_feature_extraction_runs_with_n_jobs_threads(synthetic, monkeypatch):
    seen = []
    model = small_model(n_jobs=1)
    original = torch.nn.functional.conv2d

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    model.fit(synthetic.train_images[:4])
    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)  # the patch aggregation's convolution
    model.score_samples(synthetic.test_images[:2])
    assert seen and set(seen) == {1}


def test_a_fit_that_cannot_fit_in_memory_fails_before_reading_images(synthetic, monkeypatch):
    import skpatchcore._budget

    model = small_model(working_memory=1e6)  # one chunk: everything in memory
    sizes = count_transform_calls(model, monkeypatch)
    monkeypatch.setattr(skpatchcore._budget, "available_memory", lambda: 1_000_000)
    with pytest.raises(MemoryError, match=r"Fitting 16 images \(16 at a time.*Lower working_memory"):
        model.fit(synthetic.train_images)
    assert sizes == []
