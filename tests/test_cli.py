import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from pyrovae import cli
from pyrovae.checkpoint import WEIGHTS

FAST = ["--epochs", "2", "--hidden", "32", "--z-dim", "2", "--no-progress"]


def _one_line_error(capsys, argv, match, code=1):
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def test_train_evaluate_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), *FAST]) == 0
    for name in ("config.json", WEIGHTS, "metrics.csv", "elbo.png", "reconstructions.png",
                 "samples.png", "latent.png"):  # fmt: skip
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "digits" and config["binarize"] == "threshold"
    assert config["x_shape"] == [1, 8, 8]
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[-1]["val_elbo"]) < 0
    for png in run.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli.main(["evaluate", str(run), "--num-samples", "20", "--split", "valid"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert {"log_likelihood", "elbo", "num_samples", "split", "n"} <= set(result)
    assert result["split"] == "valid" and result["n"] == 180 and result["num_samples"] == 20
    assert result["elbo"] <= result["log_likelihood"] < 0
    assert "log p(x)" in capsys.readouterr().out
    assert cli.main(["evaluate", str(run), "--num-samples", "5", "--limit", "7"]) == 0
    assert json.loads((run / "eval.json").read_text())["n"] == 7

    out = tmp_path / "grid.png"
    assert cli.main(["sample", str(run), "--out", str(out), "-n", "9"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_gaussian_and_conv_options(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--likelihood", "gaussian", "--variance", "0.05",
            "--net", "mlp", "--gated", "--loss", "meanfield", "--device", "cpu", *FAST]  # fmt: skip
    assert cli.main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["binarize"] == "none" and config["variance"] == 0.05 and config["gated"]


@pytest.mark.parametrize("argv, match", [
    (["train", "--prior", "vamp"], "invalid choice: 'vamp' (choose from 'normal')"),
    (["train", "--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["train", "--likelihood", "poisson"], "invalid choice: 'poisson'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])  # fmt: skip
def test_unknown_names(capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


@pytest.mark.parametrize("argv, match", [
    (["train", "--z-dim", "0"], "z_dim must be a positive integer"),
    (["train", "--epochs", "0"], "epochs must be a positive integer"),
    (["train", "--binarize", "none"], "binary pixels"),
    (["train", "--dataset", "binarized-mnist", "--data-dir", "/nonexistent"],
     "found neither /nonexistent/binarized_mnist.npz"),
    (["evaluate", "/nonexistent/run"], "run directory /nonexistent/run does not exist"),
    (["sample", "/nonexistent/run", "--out", "x.png"], "does not exist"),
])  # fmt: skip
def test_bad_input_is_one_line(capsys, tmp_path, argv, match):
    argv = [*argv, "--out", str(tmp_path / "o")] if argv[0] == "train" else argv
    _one_line_error(capsys, argv, match)


def test_evaluate_corrupt_checkpoint_and_pickle(capsys, tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), *FAST]) == 0
    (run / WEIGHTS).write_bytes(b"garbage!")
    _one_line_error(capsys, ["evaluate", str(run)], "not a readable safetensors checkpoint")
    torch.save({"w": torch.zeros(1)}, run / WEIGHTS)
    _one_line_error(capsys, ["sample", str(run), "--out", str(tmp_path / "s.png")], "pickle")


def test_non_finite_loss_keeps_last_good_checkpoint(capsys, tmp_path, monkeypatch):
    # The decoder diverges in epoch 2: the CLI says where, in one line, and the checkpoint
    # written after epoch 1 is left intact.
    from pyrovae.vae import VAE

    original, calls = VAE.model, {"n": 0}
    per_epoch = 20 + 3  # 1257 training digits and 180 validation digits, batch 64

    def diverging(self, x):
        calls["n"] += 1
        if calls["n"] == per_epoch + 3:
            with torch.no_grad():
                self.decoder.out.bias.fill_(float("nan"))
        return original(self, x)

    monkeypatch.setattr(VAE, "model", diverging)
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--epochs", "3", "--hidden", "32", "--no-progress"]
    with pytest.warns(UserWarning, match="NaN"):
        err = _one_line_error(capsys, argv, "non-finite loss at epoch 2, step 3")
    assert "checkpoint of epoch 1 is kept" in err
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 1
    monkeypatch.setattr(VAE, "model", original)
    from pyrovae import load_run

    vae, _ = load_run(run)
    assert all(torch.isfinite(p).all() for p in vae.parameters())


def test_default_train_runs_offline_under_a_minute(tmp_path):
    # `pyrovae train` with no options, as a user runs it: the console entry point, a fresh
    # process, the default run directory under ./runs.
    env = {**os.environ, "PYROVAE_DATA": str(tmp_path / "no-data-needed")}
    exe = os.path.join(os.path.dirname(sys.executable), "pyrovae")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "pyrovae.cli"]
    proc = subprocess.run([*cmd, "train", "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert {"config.json", WEIGHTS, "metrics.csv", "latent.png"} <= {p.name for p in run.iterdir()}
    assert "done in" in proc.stdout


def test_import_does_not_import_torchvision():
    code = "import sys, pyrovae, pyrovae.cli; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
