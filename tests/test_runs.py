"""Runs (pyrovae.runs, pyrovae.runpair). Any pair is a run: a user's own pair trained through the
CLI (``--pair FILE.py:NAME``, on a dataset or on arrays from an .npz file) or from Python
(``fit(run_dir=...)``) gets the built-in VAE's run directory: crash-consistent, continued
exactly, evaluated, plotted; and bad input is one line before any training step. A run finds
its data from any folder."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pyrovae
from pyrovae import cli
from pyrovae.data import write_folder
from pyrovae.runs import absolute_dir

HERE = Path(__file__).parent
PAIRS = HERE / "pairs.py"
sys.path.insert(0, str(HERE))
import pairs  # noqa: E402

SMALL = ["--batch-size", "64", "--no-progress", "--seed", "2"]


def _train(run, *extra):
    return cli.main(["train", "--out", str(run), *SMALL, *extra])


def _rows(run):
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_tutorial_pair_is_a_run_trained_resumed_evaluated_and_plotted(tmp_path, capsys):
    run = tmp_path / "vae"
    assert _train(run, "--pair", f"{PAIRS}:tutorial_vae", "--epochs", "2") == 0
    source = json.loads((run / "pair.json").read_text())
    assert source["file"] == str(PAIRS) and source["name"] == "tutorial_vae"
    for name in ("model.safetensors", "last.safetensors", "state.safetensors", "elbo.png"):
        assert (run / name).is_file(), name
    weights = load_file(run / "model.safetensors")
    assert any(k.startswith("mods.0.encoder.") for k in weights), sorted(weights)[:4]
    rows = _rows(run)
    assert len(rows) == 2 and all(r["val_reconstruction"] and r["val_kl"] for r in rows)
    assert cli.main(["resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    assert [r["epoch"] for r in _rows(run)] == ["1", "2", "3"]
    assert cli.main(["evaluate", str(run), "--num-samples", "20", "--limit", "30",
                     "--no-progress"]) == 0  # fmt: skip
    result = json.loads((run / "eval.json").read_text())
    assert result["n"] == 30 and result["log_likelihood"] >= result["elbo"] - 1.0
    assert cli.main(["plot", str(run)]) == 0
    assert cli.main(["sample", str(run), "--out", str(tmp_path / "s.png")]) == 1
    assert "pyro.infer.Predictive" in capsys.readouterr().err


def test_a_pair_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    # SIGKILL while epoch 3 or later trains (after epoch 2 is committed), then resume: the
    # weights equal an uninterrupted run's bit for bit.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    args = [sys.executable, "-m", "pyrovae", "train", "--pair", f"{PAIRS}:tutorial_vae",
            "--epochs", "8", *SMALL]  # fmt: skip
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        manifest = killed / "manifest.json"
        try:
            if json.loads(manifest.read_text())["epoch"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch = json.loads((killed / "manifest.json").read_text())["epoch"]
    assert 2 <= epoch < 8, epoch
    assert cli.main(["resume", str(killed), "--no-progress"]) == 0
    whole = tmp_path / "whole"
    subprocess.run([*args, "--out", str(whole)], env=env, check=True, capture_output=True)
    a, b = load_file(killed / "last.safetensors"), load_file(whole / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in _rows(killed)] == [str(i) for i in range(1, 9)]


def test_a_topic_model_on_arrays_from_a_file_is_a_run(tmp_path):
    counts = tmp_path / "bow.npz"
    pairs.bag_of_words(counts)
    run = tmp_path / "lda"
    assert _train(run, "--pair", f"{PAIRS}:prodlda", "--data", str(counts), "--epochs", "3",
                  "--lr", "3e-3") == 0  # fmt: skip
    source = json.loads((run / "pair.json").read_text())
    assert source["data"] == str(counts) and len(source["data_sha256"]) == 64
    rows = _rows(run)
    assert float(rows[-1]["val_elbo"]) > float(rows[0]["val_elbo"])
    assert cli.main(["evaluate", str(run), "--num-samples", "50", "--no-progress"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["n"] == 24 and torch.isfinite(torch.tensor(result["log_likelihood"]))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.py:tutorial_vae", "there is no file"),
        (f"{PAIRS}:nothing", "defines no callable 'nothing'"),
        (f"{PAIRS}:encoder_only", "it must return an nn.Module"),
        (f"{PAIRS}:Encoder", "Encoder() raised TypeError"),
        (f"{PAIRS}", "give FILE.py:NAME"),
    ],
)
def test_bad_pairs_are_one_line_before_training(tmp_path, capsys, spec, message):
    assert _train(tmp_path / "r", "--pair", spec, "--epochs", "1") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_a_pair_file_that_imports_what_is_missing_is_one_line(tmp_path, capsys):
    # as Pyro's examples/vae/vae.py imports visdom: named, before any training step; the file's
    # folder is on sys.path while it loads (its own utils/ import, as when run as a script)
    (tmp_path / "helpers.py").write_text("WIDTH = 8\n")
    (tmp_path / "mine.py").write_text("from helpers import WIDTH\nimport not_installed_xyz\n")
    assert _train(tmp_path / "r", "--pair", f"{tmp_path / 'mine.py'}:make", "--epochs", "1") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "imports not_installed_xyz, which is not installed" in err


def test_arrays_whose_first_dimensions_differ_are_refused(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "bad.npz", x=np.zeros((10, 3)), y=np.zeros(9))
    assert _train(tmp_path / "r", "--pair", f"{PAIRS}:prodlda", "--data",
                  str(tmp_path / "bad.npz"), "--epochs", "1") == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "x (10 rows), y (9 rows)" in err and "bad.npz" in err
    assert _train(tmp_path / "r", "--data", str(tmp_path / "bad.npz")) == 1
    assert "give --pair" in capsys.readouterr().err


def test_a_run_whose_pair_file_changed_or_went_is_refused(tmp_path, capsys):
    mine = tmp_path / "mine.py"
    shutil.copy(PAIRS, mine)
    run = tmp_path / "run"
    assert _train(run, "--pair", f"{mine}:tutorial_vae", "--epochs", "1") == 0
    mine.write_text(mine.read_text() + "\n# edited\n")
    for command in (["resume", str(run), "--epochs", "2"], ["evaluate", str(run)]):
        assert cli.main([*command, "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert "changed since" in err and str(mine) in err and len(err.splitlines()) == 1
    mine.unlink()
    assert cli.main(["evaluate", str(run), "--no-progress"]) == 1
    assert "which is gone" in capsys.readouterr().err


def test_fit_with_a_run_dir_continues_exactly(tmp_path):
    # pyrovae.fit(run_dir=...) on a pair of plain functions with a free pyro.param: the run
    # directory holds its modules' weights and the param; called again with more epochs it
    # continues where it stopped, equal to one uninterrupted call.
    x = pyrovae.data.load("digits", "train", binarize="threshold").images.flatten(1)[:256]
    val = pyrovae.data.load("digits", "valid", binarize="threshold").images.flatten(1)

    def trained(run_dir, calls):
        import pyro

        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae = pairs.VAE()

        def guide(x):
            pyro.param(
                "temperature", torch.ones(()), constraint=pyro.distributions.constraints.positive
            )
            vae.guide(x)

        for epochs in calls:
            pyrovae.fit(vae.model, guide, x, epochs=epochs, batch_size=64, seed=1, val_data=val,
                        progress=False, run_dir=run_dir)  # fmt: skip
        return load_file(Path(run_dir) / "last.safetensors")

    two_calls = trained(tmp_path / "a", [2, 4])
    one_call = trained(tmp_path / "b", [4])
    assert two_calls.keys() == one_call.keys()
    assert all(torch.equal(two_calls[k], one_call[k]) for k in one_call)
    assert len(_rows(tmp_path / "a")) == 4 and (tmp_path / "a" / "elbo.png").is_file()
    with pytest.raises(ValueError, match="not both"):
        pyrovae.fit(lambda x: None, lambda x: None, x, run_dir=tmp_path / "c",
                    state=pyrovae.TrainState())  # fmt: skip


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
