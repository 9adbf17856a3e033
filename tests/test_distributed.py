"""Chunked fit and scoring on a 2-worker Dask LocalCluster, with a worker killed mid-run."""

import copy
import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

distributed = pytest.importorskip("distributed", reason="needs the dask extra: pip install 'skpatchcore[dask]'")
import dask  # noqa: E402
import dask.bag as db  # noqa: E402

from skpatchcore import make_patchcore  # noqa: E402
from skpatchcore.cli import main  # noqa: E402
from skpatchcore.distributed import connect, thread_plan  # noqa: E402

#: About 4 of the 96 px training images per fit chunk.
FOUR_IMAGES_MIB = 4 * 0.8
#: Seconds each task is slowed down by in the worker-failure tests.
TASK_DELAY = 0.4


def small_model(**params):
    defaults = dict(backbone="resnet18", weights=None, resize=96, crop_size=None, sampling_ratio=0.25,
                    random_state=0, n_jobs=1, working_memory=FOUR_IMAGES_MIB)
    defaults.update(params)
    return make_patchcore(**defaults)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
    ) as local_cluster:
        yield local_cluster


@pytest.fixture(scope="module")
def client(cluster):
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as control:
        yield control


@pytest.fixture(scope="module")
def local_fit(synthetic):
    return small_model().fit(synthetic.train_images)


@pytest.fixture(scope="module")
def image_files(synthetic, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(synthetic.test_images):
        paths.append(str(folder / f"test_{i:02d}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths


def test_distributed_fit_gives_the_local_bank(cluster, synthetic, local_fit):
    model = small_model(scheduler=cluster.scheduler_address).fit(synthetic.train_images)
    np.testing.assert_array_equal(model[-1].memory_bank_, local_fit[-1].memory_bank_)
    np.testing.assert_array_equal(model[-1].bank_image_index_, local_fit[-1].bank_image_index_)
    assert model[-1].offset_ == local_fit[-1].offset_


def test_distributed_scoring_of_lists_bags_and_dataframe_columns(cluster, local_fit, image_files):
    import dask.dataframe as dd
    import pandas as pd

    expected = local_fit.score_samples(image_files)
    remote = local_fit.set_params(scheduler=cluster.scheduler_address)
    try:
        np.testing.assert_array_equal(remote.score_samples(image_files), expected)
        scores, maps = remote.score_and_maps(image_files)
        np.testing.assert_array_equal(scores, expected)
        assert maps.shape == (len(image_files), 96, 96)
        np.testing.assert_array_equal(remote.predict(image_files), local_fit.predict(image_files))
    finally:
        local_fit.set_params(scheduler=None)
    with distributed.Client(cluster.scheduler_address):  # the current client computes collections
        bag = db.from_sequence(image_files, npartitions=3)
        lazy = local_fit.score_samples(bag)
        assert isinstance(lazy, db.Bag)
        np.testing.assert_array_equal(np.array(lazy.compute()), expected)
        frame = dd.from_pandas(pd.DataFrame({"path": image_files}), npartitions=2)
        decisions = local_fit.decision_function(frame["path"]).compute()
        np.testing.assert_allclose(decisions.to_numpy(), expected - local_fit[-1].offset_)
        predictions = local_fit.predict(frame["path"]).compute()
        np.testing.assert_array_equal(predictions.to_numpy(), local_fit.predict(image_files))


def test_dask_bag_on_the_local_scheduler(local_fit, image_files):
    bag = db.from_sequence(image_files[:4], npartitions=2)
    with dask.config.set(scheduler="synchronous"):
        scores = local_fit.score_samples(bag).compute(scheduler="synchronous")
    np.testing.assert_array_equal(np.array(scores), local_fit.score_samples(image_files[:4]))
    with pytest.raises(TypeError, match="dask.bag of image paths"):
        from skpatchcore.distributed import score_collection

        score_collection(local_fit, dask.delayed([1]), "score_samples")


def test_the_configured_scheduler_wins_over_an_active_client(cluster, local_fit, image_files):
    with distributed.Client(cluster.scheduler_address), dask.config.set(scheduler="synchronous"):
        bag = db.from_sequence(image_files[:2], npartitions=1)
        scores = local_fit.score_samples(bag).compute()
    np.testing.assert_array_equal(np.array(scores), local_fit.score_samples(image_files[:2]))


def test_finished_calls_release_their_futures_without_cancelling(cluster, local_fit, synthetic, image_files):
    """A cancel request makes the scheduler message every client, which breaks one that is connecting."""
    user = connect(cluster.scheduler_address)

    def cancels():
        return sum(event.get("action") == "cancel" for _, event in user.get_events(user.id))

    before = cancels()
    remote = local_fit.set_params(scheduler=cluster.scheduler_address)
    try:
        remote.score_samples(image_files[:4])
        small_model(scheduler=cluster.scheduler_address).fit(synthetic.train_images[:8])
    finally:
        local_fit.set_params(scheduler=None)
    assert cancels() == before
    assert not user.futures  # everything released


def test_workers_share_the_cores(client):
    plan = thread_plan(client)
    assert len(plan) == 2
    assert set(plan.values()) == {max(1, (os.cpu_count() or 1) // 2)}


def test_workers_keep_large_freed_blocks_where_dask_trims_memory():
    """Dask sets MALLOC_TRIM_THRESHOLD_ on workers, which freezes glibc's mmap threshold."""
    from skpatchcore._malloc import M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES, unfreeze_mmap_threshold

    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    assert unfreeze_mmap_threshold({"MALLOC_TRIM_THRESHOLD_": "65536"}, FakeLibc)
    assert calls == [(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)]
    # Left alone: no Dask trimming, a threshold the user chose, no glibc.
    assert not unfreeze_mmap_threshold({}, FakeLibc)
    assert not unfreeze_mmap_threshold({"MALLOC_TRIM_THRESHOLD_": "1", "MALLOC_MMAP_THRESHOLD_": "1"}, FakeLibc)
    assert not unfreeze_mmap_threshold({"MALLOC_TRIM_THRESHOLD_": "1"}, lambda: object())
    assert len(calls) == 1


def test_workers_run_tasks_with_large_blocks_kept(client):
    from skpatchcore.distributed import _prepare_process

    def prepared():
        import skpatchcore.distributed as distributed

        _prepare_process()
        return distributed._large_blocks_reused, "MALLOC_TRIM_THRESHOLD_" in os.environ

    assert set(client.run(prepared).values()) == {(True, True)}


# ------------------------------------------------------------ worker failure
def _slow_down_tasks():
    """Run on each worker: make chunk coresets and scoring chunks take TASK_DELAY longer."""
    import skpatchcore.pipeline
    from skpatchcore.coreset import CoresetSampler

    if getattr(CoresetSampler, "_original_chunk_coreset", None) is None:
        CoresetSampler._original_chunk_coreset = CoresetSampler.chunk_coreset
        skpatchcore.pipeline._original_score_chunk = skpatchcore.pipeline.score_chunk

    def slow_chunk_coreset(self, X, first_image=0):
        time.sleep(TASK_DELAY)
        return CoresetSampler._original_chunk_coreset(self, X, first_image)

    def slow_score_chunk(*args):
        time.sleep(TASK_DELAY)
        return skpatchcore.pipeline._original_score_chunk(*args)

    CoresetSampler.chunk_coreset = slow_chunk_coreset
    skpatchcore.pipeline.score_chunk = slow_score_chunk


def _restore_tasks():
    """Undo :func:`_slow_down_tasks` on a worker."""
    import skpatchcore.pipeline
    from skpatchcore.coreset import CoresetSampler

    if getattr(CoresetSampler, "_original_chunk_coreset", None) is not None:
        CoresetSampler.chunk_coreset = CoresetSampler._original_chunk_coreset
        skpatchcore.pipeline.score_chunk = skpatchcore.pipeline._original_score_chunk
        CoresetSampler._original_chunk_coreset = None


def _kill_a_busy_worker(client, running: threading.Thread) -> None:
    """SIGKILL the process of a worker that is running a task, while `running` goes on."""
    pids = client.run(os.getpid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = [address for address, keys in client.processing().items() if keys]
        if busy:
            os.kill(pids[busy[0]], signal.SIGKILL)
            break
        time.sleep(0.02)
    else:
        pytest.fail("no task started within 60 s")
    assert running.is_alive(), "the run ended before a worker was killed"


def _in_thread(function) -> tuple[threading.Thread, dict]:
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def test_a_worker_killed_during_fit_and_scoring_changes_nothing(cluster, client, synthetic, local_fit,
                                                                 image_files):
    remote = copy.deepcopy(local_fit).set_params(scheduler=cluster.scheduler_address, working_memory=0.7)
    assert remote._score_chunk() == 1  # 20 scoring tasks
    expected_scores = remote.score_samples(image_files)  # the same run without a failure
    client.run(_slow_down_tasks)
    try:
        model = small_model(scheduler=cluster.scheduler_address)
        thread, outcome = _in_thread(lambda: model.fit(synthetic.train_images))
        _kill_a_busy_worker(client, thread)
        thread.join(timeout=300)
        assert "error" not in outcome, outcome.get("error")
        np.testing.assert_array_equal(model[-1].memory_bank_, local_fit[-1].memory_bank_)
        assert model[-1].offset_ == local_fit[-1].offset_

        client.wait_for_workers(2, timeout=120)
        client.run(_slow_down_tasks)  # the restarted worker too
        thread, outcome = _in_thread(lambda: remote.score_samples(image_files))
        _kill_a_busy_worker(client, thread)
        thread.join(timeout=300)
        assert "error" not in outcome, outcome.get("error")
        np.testing.assert_array_equal(outcome["value"], expected_scores)
    finally:
        client.wait_for_workers(2, timeout=120)
        client.run(_restore_tasks)


# ------------------------------------------------------------- bad input
def test_unreachable_scheduler_is_a_clear_error(synthetic):
    with dask.config.set({"skpatchcore.connect-timeout": "1s"}):
        with pytest.raises(ConnectionError, match="Cannot reach a Dask scheduler at 'tcp://127.0.0.1:9'"):
            small_model(scheduler="tcp://127.0.0.1:9").fit(synthetic.train_images[:4])
        with pytest.raises(TypeError, match="address string"):
            connect(8786)


def test_a_worker_that_cannot_read_an_image_names_it(cluster, synthetic, image_files, tmp_path):
    missing = str(tmp_path / "gone.png")
    model = small_model(scheduler=cluster.scheduler_address)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        model.fit([*image_files[:3], missing])


def test_cli_fit_and_score_on_the_cluster(cluster, image_files, tmp_path, capsys):
    train = tmp_path / "train"
    train.mkdir()
    for path in image_files[:8]:
        os.link(path, train / os.path.basename(path))
    model_file = tmp_path / "model.skpc"
    common = ["--scheduler", cluster.scheduler_address, "--n-jobs", "1", "--working-memory", "2"]
    assert main(["fit", str(train), "-o", str(model_file), "--backbone", "resnet18", "--weights", "none",
                 "--resize", "96", "--no-crop", "--quiet", *common]) == 0
    out = tmp_path / "out"
    assert main(["score", str(model_file), *image_files[8:12], "-o", str(out), "--no-images", "--quiet",
                 *common]) == 0
    assert len((out / "scores.csv").read_text().splitlines()) == 5
    with dask.config.set({"skpatchcore.connect-timeout": "1s"}):
        assert main(["fit", str(train), "-o", str(tmp_path / "never.skpc"), "--quiet",
                     "--scheduler", "tcp://127.0.0.1:9"]) == 1
    assert "Cannot reach a Dask scheduler" in capsys.readouterr().err
    assert not (tmp_path / "never.skpc").exists()


def test_tiled_fit_and_scoring_on_the_cluster(cluster, synthetic, image_files):
    model = small_model(tile_size=48, scheduler=cluster.scheduler_address).fit(synthetic.train_images)
    n_train = len(synthetic.train_images)
    detector = model[-1]
    assert model[1].n_images_seen_ == 4 * n_train  # the coreset counts 2 x 2 tiles per 96 px image
    assert np.unique(detector.bank_image_index_).tolist() == list(range(n_train))  # the bank counts images
    assert detector.calibration_scores_.shape == (n_train,)
    remote_scores, remote_maps = model.score_and_maps(image_files)
    local = copy.copy(model).set_params(scheduler=None)
    local_scores, local_maps = local.score_and_maps(image_files)
    np.testing.assert_allclose(remote_scores, local_scores, rtol=1e-6)
    np.testing.assert_allclose(remote_maps, local_maps, rtol=1e-5, atol=1e-6)
    assert remote_maps.shape[1:] == (96, 96)
