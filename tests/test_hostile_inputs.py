"""Odd inputs of ``score`` and the Python API: linked folders, broken links, FIFOs, devices, file names
that spreadsheets would run, colliding stems, DataFrames."""

import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import skpatchcore
from skpatchcore import CorruptModelError
from skpatchcore.cli import main
from skpatchcore.cli._common import collect_images
from skpatchcore.io.images import list_images

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="symbolic links and FIFOs")


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@posix_only
def test_images_in_linked_folders_are_found_once_and_loops_end(category, tmp_path):
    real = category / "test" / "crack"
    top = tmp_path / "top"
    (top / "own").mkdir(parents=True)
    shutil.copy(category / "test" / "good" / "000.png", top / "own" / "x.png")
    (top / "linked").symlink_to(real, target_is_directory=True)
    (top / "loop").symlink_to(top, target_is_directory=True)
    found = collect_images([top])
    assert sorted(Path(p).name for p in found) == sorted(["x.png", *(p.name for p in real.iterdir())])
    assert len(found) == len(set(found))


@posix_only
def test_broken_links_and_fifos_become_error_rows_not_silence(model_path, category, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(category / "test" / "good" / "000.png", folder / "ok.png")
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(folder / "fifo.png")
    assert [p.name for p in list_images(folder)] == ["dangling.png", "fifo.png", "ok.png"]
    out = tmp_path / "out"
    assert main(["score", str(model_path), str(folder), "-o", str(out), "--no-images", "-q"]) == 3
    errors = {Path(row["path"]).name: row["error"] for row in _rows(out / "scores.csv")}
    assert errors["ok.png"] == ""
    assert "broken symbolic link" in errors["dangling.png"] and "not a regular file" in errors["fifo.png"]
    assert "2 of 3 images could not be read" in capsys.readouterr().err


@posix_only
@pytest.mark.parametrize("kind, message", [("folder", "it is a folder"), ("fifo", "not a regular file"),
                                           ("device", "not a regular file")])
def test_a_model_path_that_is_not_a_file_says_what_it_is(model_path, category, tmp_path, capsys, kind, message):
    if kind == "folder":
        path = tmp_path
    elif kind == "fifo":
        path = tmp_path / "model.skpc"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    assert main(["score", str(path), str(category / "test" / "good"), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert message in err and "not found" not in err
    with pytest.raises(CorruptModelError, match=message):
        skpatchcore.load(path)


def test_file_names_that_spreadsheets_would_run_are_escaped(model_path, category, tmp_path, monkeypatch):
    name = '=HYPERLINK("example.invalid","x").png'
    shutil.copy(category / "test" / "good" / "000.png", tmp_path / name)
    monkeypatch.chdir(tmp_path)  # the path as given on the command line, relative
    out = tmp_path / "out"
    assert main(["score", str(model_path), name, "-o", str(out), "-q"]) == 0
    (row,) = _rows(out / "scores.csv")
    assert row["path"] == "'" + name
    assert row["heatmap"] == "heatmaps/" + Path(name).stem + ".png"


def test_heatmaps_of_colliding_stems_are_named_in_scores_csv(model_path, category, tmp_path):
    a, b = tmp_path / "one" / "same.png", tmp_path / "two" / "same.png"
    for target, source in ((a, "good/000.png"), (b, "good/001.png")):
        target.parent.mkdir()
        shutil.copy(category / "test" / source, target)
    out = tmp_path / "out"
    assert main(["score", str(model_path), str(a), str(b), "-o", str(out), "-q"]) == 0
    rows = {row["path"]: row["heatmap"] for row in _rows(out / "scores.csv")}
    assert rows == {str(a): "heatmaps/same.png", str(b): "heatmaps/same_2.png"}
    assert all((out / heatmap).is_file() for heatmap in rows.values())
    assert main(["score", str(model_path), str(a), "-o", str(out), "--no-images", "-q"]) == 0
    assert [row["heatmap"] for row in _rows(out / "scores.csv")] == [""]


def test_a_dataframe_of_paths_is_scored_by_its_path_column(model_path, category):
    pd = pytest.importorskip("pandas")
    model = skpatchcore.load(model_path)
    paths = [str(p) for p in sorted((category / "test" / "good").iterdir())]
    expected = model.score_samples(paths)
    np.testing.assert_array_equal(model.score_samples(pd.DataFrame({"path": paths, "label": 0})), expected)
    np.testing.assert_array_equal(model.score_samples(pd.DataFrame({"file": paths})), expected)
    with pytest.raises(TypeError, match="'path' column"):
        model.score_samples(pd.DataFrame({"a": paths, "b": paths}))
