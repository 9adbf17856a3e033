"""scikit-learn conventions: set_output, random_state, argument checks, pickling, HTML repr, tags."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import get_tags

from skpatchcore import CoresetSampler, PatchCoreDetector, PatchCorePipeline, make_patchcore

from _helpers import small_transformer


@pytest.fixture
def table(rng):
    pd = pytest.importorskip("pandas")
    columns = ["width", "height", "weight"]
    return pd.DataFrame(rng.normal(size=(120, 3)), columns=columns, index=[f"part{i}" for i in range(120)])


# ------------------------------------------------------------------ set_output
def test_sampler_feature_names_out(table):
    sampler = CoresetSampler(sampling_ratio=0.25, random_state=0).fit(table)
    np.testing.assert_array_equal(sampler.feature_names_in_, table.columns)
    np.testing.assert_array_equal(sampler.get_feature_names_out(), table.columns)
    unnamed = CoresetSampler(sampling_ratio=0.25, random_state=0).fit(table.to_numpy())
    np.testing.assert_array_equal(unnamed.get_feature_names_out(), ["x0", "x1", "x2"])
    with pytest.raises(ValueError, match="input_features"):
        sampler.get_feature_names_out(["a", "b", "c"])


def test_sampler_set_output_pandas_keeps_the_selected_rows_labels(table):
    import pandas as pd

    sampler = CoresetSampler(sampling_ratio=0.25, random_state=0).set_output(transform="pandas")
    bank = sampler.fit_transform(table)
    assert isinstance(bank, pd.DataFrame)
    assert list(bank.columns) == list(table.columns)
    assert list(bank.index) == list(table.index[sampler.coreset_indices_])
    np.testing.assert_array_equal(bank.to_numpy(), table.to_numpy()[sampler.coreset_indices_])
    passed = sampler.transform(table)
    assert isinstance(passed, pd.DataFrame) and passed.index.equals(table.index)


def test_set_output_pandas_through_a_pipeline_reaches_the_detector(table):
    model = make_pipeline(
        StandardScaler(), CoresetSampler(sampling_ratio=0.5, random_state=0), PatchCoreDetector(random_state=0)
    ).set_output(transform="pandas")
    model.fit(table)
    np.testing.assert_array_equal(model[-1].feature_names_in_, table.columns)
    assert model.predict(table).shape == (len(table),)
    # The same pipeline class the package builds.
    pipeline = PatchCorePipeline(clone(model).steps).set_output(transform="pandas").fit(table)
    np.testing.assert_array_equal(pipeline[-1].feature_names_in_, table.columns)
    np.testing.assert_allclose(pipeline.score_samples(table), model.score_samples(table))


def test_image_features_pass_through_under_a_global_pandas_output(rng):
    from sklearn import config_context

    features = rng.normal(size=(3, 4, 4, 8)).astype(np.float32)
    with config_context(transform_output="pandas"):
        sampler = CoresetSampler(sampling_ratio=0.25, random_state=0)
        bank = sampler.fit_transform(features)
        assert isinstance(bank, np.ndarray) and bank.image_index is not None
        assert sampler.transform(features) is features
    assert not hasattr(sampler, "get_feature_names_out")  # no column names for image features


# ---------------------------------------------------------------- random_state
def test_feature_transformer_accepts_a_random_state_instance():
    first = small_transformer(random_state=np.random.RandomState(0)).fit()
    second = small_transformer(random_state=np.random.RandomState(0)).fit()
    torch.testing.assert_close(first.backbone_.conv1.weight, second.backbone_.conv1.weight)
    third = small_transformer(random_state=np.random.RandomState(1)).fit()
    assert not torch.equal(first.backbone_.conv1.weight, third.backbone_.conv1.weight)


@pytest.mark.parametrize("random_state", [0, np.random.RandomState(0)])
def test_random_state_instances_everywhere(rng, random_state):
    X = rng.normal(size=(300, 4))
    bank = CoresetSampler(sampling_ratio=0.2, random_state=random_state).fit_transform(X)
    detector = PatchCoreDetector(random_state=random_state).fit(bank)
    assert detector.pvalues(X[:5]).shape == (5,)


def test_make_patchcore_gives_each_step_its_own_seed_from_a_random_state():
    state = np.random.RandomState(0)
    model = make_patchcore(backbone="resnet18", weights=None, random_state=state)
    seeds = [step.random_state for _, step in model.steps]
    assert all(isinstance(seed, int) for seed in seeds)
    assert len(set(seeds)) == 3  # independent streams, not one shared object
    # An int reaches every step unchanged (recorded results stay reproducible);
    # None leaves the steps unseeded.
    again = [s.random_state for _, s in make_patchcore(backbone="resnet18", weights=None, random_state=7).steps]
    assert again == [7, 7, 7]
    assert [s.random_state for _, s in make_patchcore(random_state=None).steps] == [None] * 3


# ----------------------------------------------------------------- kneighbors
@pytest.mark.parametrize("n_neighbors", [0, -1, 2.5, "3", True, 1000])
def test_kneighbors_refuses_bad_n_neighbors(rng, n_neighbors):
    detector = PatchCoreDetector().fit(rng.normal(size=(50, 3)))
    with pytest.raises(ValueError, match="n_neighbors must be an int in \\[1, 50\\]"):
        detector.kneighbors(rng.normal(size=(4, 3)), n_neighbors=n_neighbors)


def test_kneighbors_none_means_the_parameter(rng):
    detector = PatchCoreDetector(n_neighbors=3).fit(rng.normal(size=(50, 3)))
    distances, indices = detector.kneighbors(rng.normal(size=(4, 3)))
    assert distances.shape == indices.shape == (4, 3)
    assert detector.kneighbors(rng.normal(size=(4, 3)), n_neighbors=np.int64(5))[0].shape == (4, 5)


# ------------------------------------------------------------------- pickling
def test_pickling_leaves_the_live_backbone_alone(monkeypatch):
    transformer = small_transformer().fit()
    network = transformer.backbone_
    parameters = list(network.parameters())
    devices = [p.device for p in parameters]

    def refuse(*args, **kwargs):
        raise AssertionError("pickling moved the live backbone")

    # On the module's own class (a traced GraphModule has a class of its own): the pickle holds no trace of it.
    monkeypatch.setattr(type(network), "to", refuse)
    monkeypatch.setattr(type(network), "cpu", refuse)
    blob = pickle.dumps(transformer)
    monkeypatch.undo()
    assert transformer.backbone_ is network
    assert all(a is b for a, b in zip(network.parameters(), parameters))
    assert [p.device for p in network.parameters()] == devices
    restored = pickle.loads(blob)
    for a, b in zip(restored.backbone_.parameters(), parameters):
        assert a.device.type == "cpu"
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pickling_a_model_on_the_gpu_leaves_it_there():
    from skpatchcore.backbones import cpu_copy

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).to("cuda")
    module[1].weight.requires_grad_(False)
    copy = cpu_copy(module)
    assert copy is not module
    assert all(t.device.type == "cuda" for t in [*module.parameters(), *module.buffers()])
    assert all(t.device.type == "cpu" for t in [*copy.parameters(), *copy.buffers()])
    for original, moved in zip(module.state_dict().values(), copy.state_dict().values()):
        torch.testing.assert_close(moved, original.cpu())
    assert [p.requires_grad for p in copy.parameters()] == [p.requires_grad for p in module.parameters()]
    transformer = small_transformer(device="cuda").fit()
    transformer.transform(np.zeros((1, 64, 64, 3), dtype=np.uint8))  # moves the backbone to the GPU
    restored = pickle.loads(pickle.dumps(transformer))
    assert next(transformer.backbone_.parameters()).device.type == "cuda"
    assert next(restored.backbone_.parameters()).device.type == "cpu"


# ------------------------------------------------------------------ HTML repr
@pytest.mark.parametrize("estimator", [
    CoresetSampler(), PatchCoreDetector(), small_transformer(), make_patchcore(backbone="resnet18", weights=None),
])
def test_html_repr_links_to_the_api_reference(estimator):
    html = estimator._repr_html_()
    link = f"https://skpatchcore.readthedocs.io/en/latest/api.html#skpatchcore.{type(estimator).__name__}"
    assert link in html


# ----------------------------------------------------------------------- tags
def test_pipeline_tags_follow_its_steps():
    image_tags = get_tags(make_patchcore(backbone="resnet18", weights=None))
    assert not image_tags.input_tags.two_d_array and image_tags.input_tags.three_d_array
    assert image_tags.estimator_type == "outlier_detector"
    tabular = get_tags(PatchCorePipeline([("scale", StandardScaler()), ("detector", PatchCoreDetector())]))
    assert tabular.input_tags.two_d_array
