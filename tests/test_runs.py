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
