"""One fitted model scored from many threads gives the results of serial scoring."""

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import skpatchcore
from skpatchcore import PatchCoreDetector, PatchFeatureTransformer
from skpatchcore.backbones import HookedLayers, TracingFallbackWarning
from skpatchcore.search import BFloat16Shortlist

from _helpers import small_model

N_THREADS = 8


def in_threads(function, n_calls: int = N_THREADS) -> list:
    """``function(i)`` for i in ``range(n_calls)`` on `N_THREADS` threads released together, results in order."""
    barrier = threading.Barrier(min(n_calls, N_THREADS))

    def call(i):
        if i < N_THREADS:
            barrier.wait(timeout=60)
        return function(i)

    with ThreadPoolExecutor(N_THREADS) as pool:
        return list(pool.map(call, range(n_calls)))


@pytest.fixture(scope="module")
def fitted(synthetic):
    # bf16 + reweight + k=2: every search structure is built lazily on first use (shortlist, bank neighbours).
    model = small_model(n_neighbors=2, resize=64)
    model.set_params(detector__algorithm="bf16", detector__reweight=True)
    return model.fit(synthetic.train_images[:8])


def assert_all_equal(results, expected):
    for scores, maps in results:
        np.testing.assert_array_equal(scores, expected[0])
        np.testing.assert_array_equal(maps, expected[1])


def test_threads_score_a_freshly_fitted_model_as_serial_scoring(fitted, synthetic):
    model = copy.deepcopy(fitted)  # no search structure built yet but the calibration's
    images = synthetic.test_images[:3]
    results = in_threads(lambda _: model.score_and_maps(images))
    assert_all_equal(results, fitted.score_and_maps(images))


def test_threads_score_a_freshly_loaded_model_as_serial_scoring(fitted, synthetic, tmp_path, monkeypatch):
    path = skpatchcore.save(fitted, tmp_path / "model.skpc")
    model = skpatchcore.load(path)  # nothing built: every thread arrives at empty caches
    images = synthetic.test_images[:3]
    expected = fitted.score_and_maps(images)
    builds = []
    build = BFloat16Shortlist.__init__

    def counted(self, *args, **kwargs):
        builds.append(1)
        build(self, *args, **kwargs)

    monkeypatch.setattr(BFloat16Shortlist, "__init__", counted)
    results = in_threads(lambda _: model.score_and_maps(images))
    assert_all_equal(results, expected)
    assert len(builds) == 1  # built by one thread, waited for by the others
    pvalues = in_threads(lambda _: model.pvalues(images))
    for got in pvalues:
        np.testing.assert_array_equal(got, fitted.pvalues(images))


class ShapeDependentNet(torch.nn.Module):
    """A network fx cannot trace: its layers are read by forward hooks (HookedLayers)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.layer1 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.layer2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = x[..., :-1]
        return self.layer2(self.layer1(self.stem(x)))


def test_threads_through_a_hooked_backbone_each_get_their_own_layers(rng):
    # The hooks sit on the shared network, so another thread's forward pass fires them as well.
    transformer = PatchFeatureTransformer(ShapeDependentNet(), layers=("layer1", "layer2"), weights=None,
                                          resize=64, crop_size=None, batch_size=1, random_state=0)
    with pytest.warns(TracingFallbackWarning, match="forward hooks"):
        transformer.fit()
    assert isinstance(transformer.backbone_, HookedLayers)
    images = [rng.integers(0, 256, (N_THREADS, 64, 64, 3), dtype=np.uint8) for _ in range(N_THREADS)]
    expected = [transformer.transform(batch) for batch in images]
    for i, got in enumerate(in_threads(lambda i: transformer.transform(images[i]))):
        np.testing.assert_array_equal(got, expected[i])


@pytest.mark.parametrize("algorithm", ["exact", "bf16"])
def test_threads_search_one_detector_as_serial_search(rng, algorithm):
    bank = rng.normal(size=(600, 16)).astype(np.float32)
    queries = [rng.normal(size=(50, 16)) for _ in range(N_THREADS)]
    detector = PatchCoreDetector(n_neighbors=3, algorithm=algorithm, reweight=True, random_state=0).fit(bank)
    expected = [copy.deepcopy(detector).score_samples(q) for q in queries]
    for i, got in enumerate(in_threads(lambda i: detector.score_samples(queries[i]))):
        np.testing.assert_array_equal(got, expected[i])


def test_pynndescent_indexes_are_built_once_and_queried_one_thread_at_a_time(rng, monkeypatch):
    # pynndescent's query writes into scratch arrays held by the index: concurrent queries would mix.
    import skpatchcore.search

    class Index:
        built, running, most = 0, 0, 0

        def __init__(self, bank):
            type(self).built += 1
            self.bank = bank

        def query(self, queries, k, epsilon):
            Index.running += 1
            Index.most = max(Index.most, Index.running)
            time.sleep(0.005)
            Index.running -= 1
            distances = np.linalg.norm(queries[:, None] - self.bank[None], axis=2)
            indices = np.argsort(distances, axis=1, kind="stable")[:, :k]
            return indices, np.take_along_axis(distances, indices, axis=1)

    monkeypatch.setattr(skpatchcore.search, "build_nndescent", lambda bank, *args: Index(bank))
    bank = rng.normal(size=(100, 4)).astype(np.float32)
    # Two detectors: their queries run numba's parallel loops, one call at a time in a process.
    detectors = [PatchCoreDetector(algorithm="pynndescent").fit(bank) for _ in range(2)]
    queries = rng.normal(size=(10, 4))
    expected = PatchCoreDetector(algorithm="exact").fit(bank).score_samples(queries)
    for got in in_threads(lambda i: detectors[i % 2].score_samples(queries), n_calls=32):
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert Index.built == 2 and Index.most == 1


def test_scoring_during_partial_fit_sees_the_old_or_the_new_model(fitted, synthetic):
    model = copy.deepcopy(fitted)
    images = synthetic.test_images[:2]
    more = synthetic.train_images[8:12]
    old = model.score_samples(images)
    grown = copy.deepcopy(model).partial_fit(more)
    new = grown.score_samples(images)
    assert not np.allclose(old, new)  # the bank changes the scores
    results, done = [], threading.Event()

    def score_until_done():
        while True:
            finished = done.is_set()
            results.append(model.score_samples(images))
            if finished:
                return

    with ThreadPoolExecutor(3) as pool:
        scorers = [pool.submit(score_until_done) for _ in range(3)]
        try:
            model.partial_fit(more)
        finally:
            done.set()
        for scorer in scorers:
            scorer.result()
    for got in results:
        assert np.array_equal(got, old) or np.array_equal(got, new), got
    np.testing.assert_array_equal(results[-1], new)
    np.testing.assert_array_equal(model.score_samples(images), new)
    assert model.steps[-1][1].offset_ == grown.steps[-1][1].offset_
