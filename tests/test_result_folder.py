"""``score -o OUT`` / ``evaluate -o OUT`` publish their output folder as one unit."""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from skpatchcore.cli import main
from skpatchcore.io.result_folder import staged_result_folder


def _state(out: Path):
    """(scored image stems, heatmap stems) of an output folder."""
    with open(out / "scores.csv", newline="", encoding="utf-8") as handle:
        scored = sorted(Path(row["path"]).stem for row in csv.DictReader(handle))
    heatmaps = sorted(p.stem for p in (out / "heatmaps").iterdir())
    return scored, heatmaps


def _stale_siblings(out: Path):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# Runs `score` in a child process that is SIGKILLed right after its first rename that puts
# something into OUT or moves OUT itself: where a file-by-file publication leaves a mix.
_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    out = os.path.realpath(sys.argv[1])
    if sys.argv[2] == "no-exchange":
        import skpatchcore.io.result_folder as result_folder
        result_folder._exchange = lambda first, second: False
    for name in ("rename", "replace"):
        real = getattr(os, name)
        def killing(src, dst, *a, _real=real, **k):
            _real(src, dst, *a, **k)
            touched = {os.path.realpath(src), os.path.realpath(dst)}
            if out in touched or any(os.path.dirname(p) == out for p in touched):
                os.kill(os.getpid(), signal.SIGKILL)
        setattr(os, name, killing)
    from skpatchcore.cli import main
    main(["score", *sys.argv[3:], "-o", out, "-q"])
""")


@pytest.mark.parametrize("how", ["exchange", "no-exchange"])
def test_a_run_killed_while_publishing_leaves_old_or_new_results_never_a_mix(model_path, category, tmp_path, how):
    out = tmp_path / "out"
    good, crack = category / "test" / "good", category / "test" / "crack"
    assert main(["score", str(model_path), str(good), "-o", str(out), "-q"]) == 0
    old = _state(out)
    subprocess.run([sys.executable, "-c", _KILLED_RUN, str(out), how, str(model_path), str(crack)],
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, check=False)
    new_stems = sorted(p.stem for p in crack.iterdir())
    if out.exists():
        scored, heatmaps = _state(out)
        assert scored == heatmaps and scored in (old[0], new_stems)
    else:  # killed between the two renames of the fallback: the old results wait beside OUT
        assert how == "no-exchange" and len(_stale_siblings(out)) >= 1
    # The next run puts aside results back / removes the killed run's staging folder, then publishes.
    assert main(["score", str(model_path), str(good), "-o", str(out), "-q"]) == 0
    assert _state(out) == old and _stale_siblings(out) == []


def test_two_runs_into_one_folder_publish_one_complete_set(model_path, category, tmp_path):
    out = tmp_path / "out"
    runs = [category / "test" / "good", category / "test" / "crack"]
    children = [
        subprocess.Popen([sys.executable, "-m", "skpatchcore", "score", str(model_path), str(folder), "-o", str(out),
                          "-q"], env={**os.environ, "OMP_NUM_THREADS": "1"})
        for folder in runs
    ]
    assert [child.wait(timeout=600) for child in children] == [0, 0]
    scored, heatmaps = _state(out)
    assert scored == heatmaps and scored in [sorted(p.stem for p in folder.iterdir()) for folder in runs]
    assert _stale_siblings(out) == []


def test_interleaved_runs_never_mix(tmp_path):
    out = tmp_path / "out"
    first, second = staged_result_folder(out), staged_result_folder(out)
    staging_1 = first.__enter__()
    staging_2 = second.__enter__()
    for staging, names in ((staging_1, "ab"), (staging_2, "cde")):
        (staging / "heatmaps").mkdir()
        for name in names:
            (staging / "heatmaps" / f"{name}.png").write_bytes(b"png")
        (staging / "scores.csv").write_text(names)
    second.__exit__(None, None, None)
    assert (out / "scores.csv").read_text() == "cde"
    first.__exit__(None, None, None)
    assert (out / "scores.csv").read_text() == "ab"
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["a.png", "b.png"]
    assert _stale_siblings(out) == []


def test_a_failed_run_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    with staged_result_folder(out) as staging:
        (staging / "scores.csv").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_result_folder(out) as staging:
            (staging / "scores.csv").write_text("new")
            raise RuntimeError("scoring failed")
    assert (out / "scores.csv").read_text() == "old" and _stale_siblings(out) == []


def test_stale_staging_of_a_killed_process_is_removed_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp_path / f".out.skpatchcore-staging-{int(dead.stdout)}-x"
    live = tmp_path / f".out.skpatchcore-staging-{os.getppid()}-y"
    stale.mkdir(), live.mkdir()
    with staged_result_folder(out) as staging:
        (staging / "scores.csv").write_text("x")
    assert not stale.exists() and live.exists()


def test_a_folder_with_other_files_is_refused_before_any_work(model_path, category, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["score", str(model_path), str(category / "test" / "good"), "-o", str(out), "-q"]) == 1
    assert "notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and _stale_siblings(out) == []


def test_a_folder_that_cannot_be_swapped_is_updated_entry_by_entry(tmp_path, monkeypatch):
    import skpatchcore.io.result_folder as result_folder

    out = tmp_path / "out"
    monkeypatch.setattr(result_folder, "_swappable", lambda target: False)  # as for a mount point
    for names in ("abc", "d"):
        with staged_result_folder(out) as staging:
            assert staging.parent == out
            (staging / "heatmaps").mkdir()
            for name in names:
                (staging / "heatmaps" / f"{name}.png").write_bytes(b"png")
            (staging / "scores.csv").write_text(names)
    assert (out / "scores.csv").read_text() == "d" and [p.name for p in (out / "heatmaps").iterdir()] == ["d.png"]
    assert sorted(p.name for p in out.iterdir()) == ["heatmaps", "scores.csv"] and _stale_siblings(out) == []
