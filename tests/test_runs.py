"""A run directory's own small helpers (pyrovae.runs): where a run finds its data."""

import json
import shutil

import torch

from pyrovae import cli
from pyrovae.data import write_folder
from pyrovae.runs import absolute_dir

FAST = ["--epochs", "1", "--hidden", "8", "--z-dim", "2", "--no-progress"]


def test_absolute_dir():
    assert absolute_dir(None) is None
    assert absolute_dir("~/x").startswith("/") and absolute_dir("~/x").endswith("/x")


def test_a_run_records_its_data_dir_absolute_and_names_it_when_moved(tmp_path, monkeypatch,
                                                                     capsys):  # fmt: skip
    # `--data-dir ../imgs` typed in one folder: the run works from any other, and a folder that
    # moved since is one line naming the recorded path and --data-dir
    images = torch.rand(12, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    write_folder(images, torch.tensor([0, 1] * 6), ["a", "b"], tmp_path / "imgs")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    argv = ["train", "--dataset", "folder", "--data-dir", "../imgs", "--out", "run",
            "--likelihood", "gaussian", *FAST]  # fmt: skip
    assert cli.main(argv) == 0
    run = tmp_path / "work" / "run"
    recorded = json.loads((run / "config.json").read_text())["data_dir"]
    assert recorded == str(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)  # elsewhere: plot and evaluate find the data
    assert cli.main(["plot", "work/run"]) == 0
    assert cli.main(["evaluate", "work/run", "--num-samples", "3", "--no-progress"]) == 0
    shutil.move(tmp_path / "imgs", tmp_path / "moved")
    capsys.readouterr()
    for command in (["evaluate", "work/run", "--no-progress"], ["plot", "work/run"],
                    ["resume", "work/run", "--epochs", "2", "--no-progress"]):  # fmt: skip
        assert cli.main(command) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"trained on data in {recorded}, which no longer exists" in err, err
        assert "pass --data-dir to point to where the data is now" in err, err
    # told where it is now, relative to this folder: resume records it, absolute
    assert cli.main(["resume", "work/run", "--epochs", "2", "--data-dir", "moved",
                     "--no-progress"]) == 0  # fmt: skip
    assert json.loads((run / "config.json").read_text())["data_dir"] == str(tmp_path / "moved")
    assert "s in all, with earlier calls)" in capsys.readouterr().out  # this call's time first


def test_binarization_is_said_at_the_start():
    from pyrovae import Config
    from pyrovae.runs import binarize_note

    note = binarize_note(Config(dataset="folder", binarize="dynamic"))
    assert note.startswith("pixels: folder's images are binarized dynamically")
    assert "--binarize none" in note
    assert "binarized at 0.5 (--binarize threshold)" in binarize_note(Config(binarize="threshold"))
    assert binarize_note(Config(binarize="none", likelihood="gaussian")) == ""


def test_a_continued_run_says_this_calls_seconds_and_the_total():
    from pyrovae.runs import took

    assert took(12.34, 0.0) == "12.3 s"
    assert took(60.0, 57.9) == "2.1 s (60.0 s in all, with earlier calls)"


def test_a_collapsed_run_says_so_with_what_to_try():
    from pyrovae.runs import collapse_note

    assert collapse_note([{"epoch": 3, "active_units": 2}]) == ""
    assert collapse_note([{"epoch": 3, "active_units": None}]) == ""
    assert collapse_note([]) == ""
    note = collapse_note([{"epoch": 1, "active_units": 1}, {"epoch": 2, "active_units": 0}])
    assert note.startswith("warning: 0 active latent units at epoch 2")
    assert "--warmup" in note and "--beta" in note and "--z-dim" in note
