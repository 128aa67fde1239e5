import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hostile import rehash

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
                 "samples.png", "latent.png", "manifold.png"):  # fmt: skip
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "digits" and config["binarize"] == "threshold"
    assert config["x_shape"] == [1, 8, 8]
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[-1]["val_elbo"]) < 0
    # the ELBO's parts on validation images (one draw: about the validation ELBO) and the
    # active units of the 2-D latent
    rec, kl = float(rows[-1]["val_reconstruction"]), float(rows[-1]["val_kl"])
    assert rec < 0 <= kl and abs(rec - kl - float(rows[-1]["val_elbo"])) < 2
    assert 0 <= int(rows[-1]["active_units"]) <= config["z_dim"] == 2
    for png in run.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli.main(["evaluate", str(run), "--num-samples", "20", "--split", "valid"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert {"log_likelihood", "elbo", "num_samples", "split", "n"} <= set(result)
    assert result["split"] == "valid" and result["n"] == 180 and result["num_samples"] == 20
    assert result["elbo"] <= result["log_likelihood"] < 0
    assert (run / "log_px.png").read_bytes()[:4] == b"\x89PNG"
    per_image = torch.tensor(np.loadtxt(run / "log_px.csv", delimiter=",", usecols=0))
    assert per_image.shape == (180,)
    assert per_image.mean().item() == pytest.approx(result["log_likelihood"], abs=1e-5)
    se = per_image.std().item() / 180**0.5
    assert result["log_likelihood_se"] == pytest.approx(se, rel=1e-4)
    assert "log p(x)" in capsys.readouterr().out
    assert cli.main(["evaluate", str(run), "--num-samples", "5", "--limit", "7"]) == 0
    assert json.loads((run / "eval.json").read_text())["n"] == 7

    out = tmp_path / "grid.png"
    assert cli.main(["sample", str(run), "--out", str(out), "-n", "9"]) == 0
    assert "decoder means" in capsys.readouterr().out
    # --draw: x ~ p(x|z), binary pixels from the Bernoulli likelihood; means are grey values
    from pyrovae import plots

    drawn = {}
    real = plots.plot_images
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "plot_images", lambda x, *a, **k: drawn.setdefault(a[1], x) is None
                   or real(x, *a, **k))  # fmt: skip
        for flag in ("--mean", "--draw"):
            assert cli.main(["sample", str(run), "--out", str(out), "-n", "9", flag]) == 0
    assert "draws" in capsys.readouterr().out
    means, draws = (drawn[cli.SAMPLE_TITLES[k]] for k in ("mean", "draw"))
    assert set(draws.unique().tolist()) <= {0.0, 1.0} and len(means.unique()) > 2
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_gaussian_and_conv_options(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--likelihood", "gaussian", "--variance", "0.05",
            "--net", "mlp", "--gated", "--loss", "meanfield", "--device", "cpu", *FAST]  # fmt: skip
    assert cli.main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["binarize"] == "none" and config["variance"] == 0.05 and config["gated"]


@pytest.mark.parametrize("argv, match", [
    (["train", "--prior", "vamp"], "invalid choice: 'vamp' (choose from 'normal', 'learned'"),
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
    (["train", "--z-dim", "0"], "--z-dim must be a positive integer"),
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
    _one_line_error(capsys, ["evaluate", str(run)], "does not match its hash in manifest.json")
    rehash(run, WEIGHTS)  # as whoever handed the run over could: the file's own checks hold
    _one_line_error(capsys, ["evaluate", str(run)], "not a readable safetensors checkpoint")
    torch.save({"w": torch.zeros(1)}, run / WEIGHTS)
    rehash(run, WEIGHTS)
    _one_line_error(capsys, ["sample", str(run), "--out", str(tmp_path / "s.png")], "pickle")


def test_non_finite_loss_keeps_last_good_checkpoint(capsys, tmp_path, monkeypatch):
    # The decoder diverges right after epoch 1 is saved: the CLI says where, in one line, and
    # the checkpoint written after epoch 1 is left intact.
    import pyrovae.checkpoint

    original, saved = pyrovae.checkpoint.save_state, []

    def save_then_diverge(run_dir, vae, *args):
        original(run_dir, vae, *args)
        saved.append({k: v.clone() for k, v in vae.state_dict().items()})
        with torch.no_grad():
            vae.decoder.out.bias.fill_(float("nan"))

    monkeypatch.setattr(pyrovae.checkpoint, "save_state", save_then_diverge)
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--epochs", "3", "--hidden", "32", "--no-progress"]
    err = _one_line_error(capsys, argv, "non-finite loss at epoch 2, step 1")
    assert "checkpoint of epoch 1 is kept" in err
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 1
    from pyrovae import load_run

    vae, _ = load_run(run)
    state = vae.state_dict()
    assert len(saved) == 1 and all(torch.equal(state[k], saved[0][k]) for k in state)


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


def test_hvae_vampprior_warmup_and_test_curve(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--model", "hvae", "--prior", "vampprior",
            "--components", "10", "--warmup", "2", "--epochs", "3", "--hidden", "32",
            "--z-dim", "2", "--train-limit", "300", "--test-every", "2", "--test-samples", "10",
            "--test-limit", "40", "--gated", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "hvae" and config["prior"] == "vampprior"
    assert config["components"] == 10 and config["warmup"] == 2 and config["train_limit"] == 300
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [float(r["beta"]) for r in rows] == [0.5, 1.0, 1.0]
    assert [r["test_ll"] != "" for r in rows] == [False, True, False]
    assert float(rows[1]["test_ll"]) < 0
    summary = json.loads((run / "train.json").read_text())
    best = max(range(3), key=lambda i: float(rows[i]["val_elbo"])) + 1
    assert summary["best_epoch"] == best and summary["epochs_run"] == 3
    assert cli.main(["evaluate", str(run), "--num-samples", "200", "--limit", "100"]) == 0
    result = json.loads((run / "eval.json").read_text())
    # after 3 epochs on 300 images q(z|x) is close to the posterior (the two estimates differ by
    # 5e-5 nats here, less than their Monte Carlo noise): the ELBO may not come out below
    assert result["elbo"] < result["log_likelihood"] + 0.01 and result["log_likelihood"] < 0
    assert result["n"] == 100


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    # With a learning rate too small to matter, the validation ELBO only moves with Monte-Carlo
    # noise: patience 1 stops at the first epoch that does not improve on the best so far.
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--epochs", "40", "--lr", "1e-9", "--patience", "1",
            "--prior", "learned", "--loss", "iwae", "--particles", "3", *FAST[2:]]  # fmt: skip
    assert cli.main(argv) == 0
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    vals = [float(r["val_elbo"]) for r in rows]
    summary = json.loads((run / "train.json").read_text())
    assert summary["stopped_early"] and len(rows) < 40 and vals[-1] <= max(vals[:-1])
    assert summary["best_epoch"] == vals.index(max(vals)) + 1
    assert summary["best_val_elbo"] == max(vals)
    from pyrovae import load_run

    vae, config = load_run(run)
    assert config.patience == 1 and config.loss == "iwae" and config.particles == 3


@pytest.mark.parametrize("argv, match", [
    (["train", "--particles", "0"], "particles must be a positive integer, got 0"),
    (["train", "--components", "0", "--prior", "mog"], "components must be a positive integer"),
    (["train", "--patience", "0"], "patience must be a positive integer, got 0"),
    (["train", "--beta", "0"], "beta (the KL weight) must be > 0"),
    (["train", "--loss", "iwae", "--warmup", "5"], "the iwae loss uses the model's unscaled"),
    (["train", "--model", "hvae", "--net", "conv"], "the hvae model is built from dense networks"),
    (["train", "--prior", "flow", "--z-dim", "1"], "the flow prior needs z_dim >= 2"),
    (["train", "--test-samples", "0"], "--test-samples must be >= 1, got 0"),
])  # fmt: skip
def test_bad_model_settings_fail_before_training(capsys, tmp_path, argv, match):
    _one_line_error(capsys, [*argv, "--out", str(tmp_path / "o")], match)
    assert not (tmp_path / "o").exists()  # nothing was trained or written


def test_resume_repeats_the_uninterrupted_run(tmp_path, capsys):
    # train 2 epochs, `pyrovae resume` to 4 == train 4: the same weights, metrics and selection,
    # with warm-up, early-stopping bookkeeping and the test curve carried across the break
    opts = ["--hidden", "32", "--z-dim", "3", "--no-progress", "--prior", "vampprior",
            "--components", "8", "--warmup", "3", "--patience", "5", "--test-every", "1",
            "--test-samples", "5", "--test-limit", "20"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli.main(["train", "--out", str(whole), "--epochs", "4", *opts]) == 0
    assert cli.main(["train", "--out", str(parts), "--epochs", "2", *opts]) == 0
    assert cli.main(["resume", str(parts), "--epochs", "4", "--no-progress"]) == 0
    assert "continuing from epoch 2" in capsys.readouterr().out
    from safetensors.torch import load_file

    for name in (WEIGHTS, "last.safetensors"):
        a, b = load_file(whole / name), load_file(parts / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def metrics(run):
        rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert metrics(parts) == metrics(whole) and len(metrics(whole)) == 4
    assert [r["beta"] for r in metrics(parts)] == ["0.3333333333333333", "0.6666666666666666",
                                                   "1.0", "1.0"]  # fmt: skip
    a, b = (json.loads((run / "train.json").read_text()) for run in (whole, parts))
    assert {k: a[k] for k in a if k != "train_seconds"} == {
        k: b[k] for k in b if k != "train_seconds"
    }
    assert json.loads((parts / "config.json").read_text())["epochs"] == 4
    # a run cut off after its last epoch was saved, before its summary (its manifest still at
    # the training stage): resume only finishes it
    from pyrovae import rundir

    summary = (parts / "train.json").read_text()
    rundir.update_manifest(parts, stage="training")
    (parts / "elbo.png").unlink()
    assert cli.main(["resume", str(parts), "--no-progress"]) == 0
    assert json.loads((parts / "train.json").read_text())["epochs_run"] == 4
    assert (parts / "elbo.png").is_file() and metrics(parts) == metrics(whole)
    b = load_file(parts / WEIGHTS)
    assert all(torch.equal(load_file(whole / WEIGHTS)[k], b[k]) for k in b)
    assert (
        json.loads(summary)["best_epoch"]
        == json.loads((parts / "train.json").read_text())["best_epoch"]
    )
    # ... and one cut off after early stopping ended it: no further epoch, even with more allowed
    from pyrovae.checkpoint import load_run, load_state, save_state

    vae, _ = load_run(parts)
    state, extra = load_state(parts, vae)
    extra["stopper"]["stopped_epoch"] = 4
    save_state(parts, vae, state, extra)
    assert cli.main(["resume", str(parts), "--epochs", "9", "--no-progress"]) == 0
    done = json.loads((parts / "train.json").read_text())
    assert done["stopped_early"] and done["epochs_run"] == 4 and metrics(parts) == metrics(whole)
    assert json.loads((parts / "config.json").read_text())["epochs"] == 9  # the budget it had
    # nothing left to do, and runs that cannot be continued, each in one line
    _one_line_error(capsys, ["resume", str(parts), "--epochs", "9"], "stopped early at epoch 4")
    _one_line_error(
        capsys, ["resume", str(whole), "--epochs", "4"], "has trained 4 epochs already; give"
    )
    (whole / "state.safetensors").unlink()
    missing = "state.safetensors is missing, though manifest.json"
    _one_line_error(capsys, ["resume", str(whole), "--epochs", "9"], missing)
    _one_line_error(capsys, ["resume", str(tmp_path / "nope")], "does not exist")


def test_rgb_folder_trains_evaluates_in_bits_per_dim_and_samples(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(24):  # two classes of 10×10 RGB images, resized to 8×8; one corrupt file
        base = np.array([200, 40, 40] if i % 2 else [40, 40, 200], dtype=np.int64)
        pixels = np.clip(base + rng.integers(-30, 30, (10, 10, 3)), 0, 255).astype(np.uint8)
        folder = tmp_path / "imgs" / ("red" if i % 2 else "blue")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (tmp_path / "imgs" / "red" / "bad.png").write_bytes(b"\x89PNG truncated")
    run = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--out",
            str(run), "--image-size", "8", "--net", "conv", "--widths", "8", "16",
            "--likelihood", "discretized-logistic", "--mixtures", "2", "--batch-size", "8",
            *FAST]  # fmt: skip
    _one_line_error(capsys, args, "cannot read image")
    assert cli.main([*args, "--skip-bad-files"]) == 0
    assert json.loads((run / "train.json").read_text())["skipped_files"] == 1
    config = json.loads((run / "config.json").read_text())
    assert config["x_shape"] == [3, 8, 8] and config["likelihood"] == "discretized-logistic"
    for name in ("samples.png", "reconstructions.png", "latent.png"):
        assert (run / name).read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["evaluate", str(run), "--num-samples", "10", "--split", "test"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["n"] == 2 and result["log_likelihood"] < 0
    bits = -result["log_likelihood"] / (3 * 8 * 8 * np.log(2))
    assert result["bits_per_dim"] == pytest.approx(bits, rel=1e-6) and 0 < bits
    assert "bits/dim" in capsys.readouterr().out
    out = tmp_path / "samples.png"
    assert cli.main(["sample", str(run), "--out", str(out), "-n", "4"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    # streamed: the training images decoded by a DataLoader worker while training, not up front
    _one_line_error(capsys, [*args, "--skip-bad-files", "--stream", "yes", "--overwrite"],
                    "--skip-bad-files needs the training images decoded up front")  # fmt: skip
    (tmp_path / "imgs" / "red" / "bad.png").unlink()
    streamed = tmp_path / "streamed"
    argv = [*args, "--stream", "yes", "--workers", "1", "--out", str(streamed)]
    assert cli.main(argv) == 0
    rows = list(csv.DictReader((streamed / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 2 and float(rows[-1]["val_elbo"]) < 0
    assert json.loads((streamed / "config.json").read_text())["stream"] == "yes"
    _one_line_error(capsys, ["train", "--stream", "yes", *FAST],
                    "--stream yes: only --dataset folder streams, not digits")  # fmt: skip
    _one_line_error(capsys, [*argv, "--binarize", "static", "--likelihood", "bernoulli",
                             "--overwrite"], "--binarize static draws each image once")  # fmt: skip


def test_likelihood_that_does_not_fit_the_data_fails_before_training(tmp_path, capsys):
    err = _one_line_error(capsys, ["train", "--likelihood", "discretized-gaussian", "--out",
                                   str(tmp_path / "r"), *FAST], "needs 8-bit pixels")  # fmt: skip
    assert not (tmp_path / "r" / "metrics.csv").exists(), err
    _one_line_error(capsys, ["train", "--dataset", "folder", "--data-dir", str(tmp_path),
                             *FAST], "no images")  # fmt: skip
    _one_line_error(capsys, ["train", "--image-size", "4", *FAST],
                    "the digits dataset takes no image_size option (--image-size)")  # fmt: skip


def test_version_and_every_option_has_help_with_its_default(capsys):
    import argparse

    import pyrovae

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pyrovae {pyrovae.__version__}"
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        text = parser.format_help()
        assert ":param" not in text and "``" not in text, name  # no reST markup
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (name, action.option_strings)
            if action.default not in (None, False):
                assert "default" in action.help or "default" in text, (name, action.dest)
    assert "--batch-size BATCH_SIZE" in sub.choices["train"].format_help()
    assert "(default: 64)" in " ".join(sub.choices["train"].format_help().split())


def test_train_ends_with_where_things_are_and_what_to_do_next(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), *FAST]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(run) in last and f"pyrovae evaluate {run} --split test" in last


def test_plots_and_metrics_load_lazily_from_the_package():
    import subprocess
    import sys

    code = ("import sys, pyrovae; assert 'matplotlib' not in sys.modules; "
            "pyrovae.plots.plot_history, pyrovae.metrics.elbo_parts")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("user, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_makes_openmp_wait_passively_unless_told(user, expected):
    # set before torch loads (importing pyrovae.cli loads no torch), never over the user's value
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user:
        env["OMP_WAIT_POLICY"] = user
    code = ("import os, sys, pyrovae.cli as cli; assert 'torch' not in sys.modules; "
            "cli._quiet_openmp(); print(os.environ['OMP_WAIT_POLICY'])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == expected, out.stderr


def test_threads_option(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert cli.main(["train", "--out", str(tmp_path / "r"), "--threads", "1", *FAST]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    _one_line_error(capsys, ["train", "--threads", "0", *FAST], "--threads must be >= 1, got 0")


def test_errors_name_the_flag_and_suggest_close_choices(capsys):
    _one_line_error(capsys, ["train", "--batch-size", "0", *FAST],
                    "--batch-size must be a positive integer, got 0")  # fmt: skip
    _one_line_error(capsys, ["train", "--device", "foo", *FAST],
                    "unknown device 'foo': use auto, cpu, cuda or cuda:N")  # fmt: skip
    assert "Expected one of" not in capsys.readouterr().err  # not torch's list of device types
    with pytest.raises(SystemExit):
        cli.main(["train", "--prior", "vamprior"])
    assert capsys.readouterr().err.strip().endswith("did you mean 'vampprior'?")
    with pytest.raises(SystemExit):
        cli.main(["trian"])
    assert capsys.readouterr().err.strip().endswith("did you mean 'train'?")


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_config_file_with_flags_overriding_it_and_the_config_echoed(tmp_path, capsys, suffix):
    path = tmp_path / f"settings{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"z_dim": 3, "epochs": 1, "hidden": [16], "lr": 0.002}))
    else:
        path.write_text("z_dim = 3\nepochs = 1\nhidden = [16]\nlr = 0.002\n")
    run = tmp_path / "run"
    argv = ["train", "--config", str(path), "--epochs", "2", "--out", str(run), "--no-progress"]
    assert cli.main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["z_dim"], config["hidden"], config["lr"]) == (3, [16], 0.002)  # the file
    assert config["epochs"] == 2  # the flag wins
    assert (
        "config: binarize=threshold hidden=(16,) z_dim=3 epochs=2 lr=0.002"
        in capsys.readouterr().out
    )
    path.write_text('{"z_dimm": 3}' if suffix == ".json" else "z_dimm = 3\n")
    _one_line_error(capsys, ["train", "--config", str(path), *FAST],
                    f"--config {path}: unknown config keys: z_dimm")  # fmt: skip
    _one_line_error(capsys, ["train", "--config", str(tmp_path / "none.json"), *FAST],
                    "cannot read it (No such file or directory)")  # fmt: skip


def test_completion_script_completes_commands_options_and_choices(capsys, tmp_path):
    import shutil
    import subprocess

    assert cli.main(["completion", "bash"]) == 0
    script = tmp_path / "pyrovae.bash"
    script.write_text(capsys.readouterr().out)
    assert cli.main(["completion", "zsh"]) == 0
    assert capsys.readouterr().out.startswith("autoload -U +X bashcompinit")
    if shutil.which("bash") is None:
        pytest.skip("no bash to run the script")
    cases = {"pyrovae tr": "train", "pyrovae train --pri": "--prior",
             "pyrovae train --prior vam": "vampprior",
             "pyrovae evaluate --no-pro": "--no-progress"}  # fmt: skip
    for line, expected in cases.items():
        words = line.split()
        code = (f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
                "_pyrovae; echo ${COMPREPLY[@]}")  # fmt: skip
        out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.split() == [expected], (line, out.stdout, out.stderr)


def test_a_folder_of_six_images_trains_and_draws_every_plot(tmp_path):
    # 4 training, 1 validation, 1 test image: one code is too few for a PCA or a traversal range
    from pyrovae.data import write_folder

    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    write_folder(images, torch.tensor([0, 1] * 3), ["cat", "dog"], tmp_path / "imgs")
    run = tmp_path / "run"
    argv = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--out",
            str(run), "--likelihood", "gaussian", *FAST]  # fmt: skip
    assert cli.main(argv) == 0
    for name in ("elbo.png", "latent.png", "samples.png", "reconstructions.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert rows[-1]["active_units"] == ""  # a variance over one validation image is undefined


def _subparsers():
    import argparse

    parser = cli.build_parser()
    return parser, next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_train_options_are_configs_fields_with_their_defaults_and_choices():
    from dataclasses import fields

    from pyrovae.config import Config

    _, sub = _subparsers()
    train = sub.choices["train"]
    flags = {a.dest: a for a in train._actions if a.option_strings}
    for f in fields(Config):
        if f.name == "x_shape":  # the data decide it
            assert f.name not in flags
            continue
        setting, action = f.metadata["setting"], flags[f.name]
        assert action.option_strings == ["--" + f.name.replace("_", "-")]
        assert action.help.startswith(setting.help), f.name
        assert tuple(action.choices or ()) == setting.choices, f.name
    args = vars(train.parse_args([]))
    assert Config.from_dict({f.name: args[f.name] for f in fields(Config) if f.name in args}) \
        == Config()  # fmt: skip


def test_help_version_and_completion_import_neither_torch_nor_pyro():
    # they answer at once (issue 26): no torch, no Pyro, whatever they print
    code = """
import contextlib, io, sys
from pyrovae import cli
for argv in (["--version"], ["--help"], ["train", "--help"], ["evaluate", "--help"],
             ["completion", "bash"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        cli.main(argv)
print(sorted(m for m in ("torch", "pyro", "numpy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
    version = subprocess.run([sys.executable, "-m", "pyrovae", "--version"], capture_output=True,
                             text=True, check=True)  # fmt: skip
    assert version.stdout.startswith("pyrovae ")


def test_help_lists_every_command_and_every_option_says_its_default():
    parser, sub = _subparsers()
    text = parser.format_help()
    assert "`" not in text and all(name in text for name in cli.COMMANDS), text
    assert set(sub.choices) == set(cli.COMMANDS)
    formatter = cli._DefaultsFormatter("pyrovae")
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.dest == "help":
                continue
            assert action.help, (name, action.dest)  # run_dir too
            takes_value = action.option_strings and action.nargs != 0
            if takes_value and not action.required:
                assert "default" in formatter._get_help_string(action), (name, action.dest)
    assert "--threads" not in sub.choices["completion"].format_help()
    assert "(default: 0)" in " ".join(sub.choices["evaluate"].format_help().split())
