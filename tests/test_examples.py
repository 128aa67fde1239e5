"""Every script in examples/ runs with tiny arguments on the bundled digits (or synthetic data),
offline, and says in one line when it is given a dataset it cannot use."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrovae

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PNG = b"\x89PNG\r\n\x1a\n"
QUIET = ("--no-progress",)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The examples' tiny models are too small for a second thread to pay off: on a busy two-core
    # machine it spins, and steps get several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str, args: str, *extra: str):
    """Run ``examples/NAME.py``'s ``main`` in this process with ``args.split() + extra``."""
    module = _load(name)
    return module.main(module.build_parser().parse_args([*args.split(), *extra]))


def _pngs(folder: Path, *names: str) -> None:
    for name in names:
        assert (folder / name).read_bytes()[:8] == PNG, name


@pytest.fixture
def unlabelled_data(tmp_path):
    """A synthetic binarized-mnist folder: binary images, no labels (like the real one)."""
    rng = np.random.default_rng(0)
    arrays = {s: (rng.random((30, 784)) < 0.2).astype(np.uint8) for s in pyrovae.data.SPLITS}
    np.savez(tmp_path / "binarized_mnist.npz", **arrays)
    return tmp_path


def test_vae(tmp_path, capsys):
    out = tmp_path / "out"
    args = "--dataset digits --epochs 1 --hidden 16 --z-dim 3 --limit 500 --eval-n 40"
    r = _run("vae", args, "--num-samples", "50", "--embedding", "pca", "--out", str(out), *QUIET)
    assert r["n_test"] == 40 and r["num_samples"] == 50
    assert r["test_elbo"] < r["test_log_px"] < 0  # the bound sits below the estimate
    printed = capsys.readouterr().out
    assert f"log p(x) {r['test_log_px']:.2f} nats (K=50" in printed
    _pngs(out, "elbo.png", "recon.png", "samples.png", "latent.png", "traversals.png",
          "interpolations.png", "log_px.png")  # fmt: skip


def test_dmm(tmp_path, capsys):
    args = ("--train-n 12 --test-n 6 --min-length 3 --max-length 6 --z-dim 2 --emission-dim 8 "
            "--transition-dim 8 --rnn-dim 8 --epochs 2 --batch-size 6 --num-samples 20 "
            "--draws 2")  # fmt: skip
    r = _run("dmm", args, "--out", str(tmp_path), *QUIET)
    # per timestep: the ELBO bounds the importance-sampled log p(x) from below
    assert r["test_elbo_per_step"] < r["test_log_px_per_step"] < 0
    printed = capsys.readouterr().out
    assert f"log p(x) per timestep {r['test_log_px_per_step']:.3f} nats (K=20" in printed
    _pngs(tmp_path, "draws.png", "elbo.png")


def test_custom_pair_matches_the_exact_log_likelihood(capsys):
    args = "--epochs 30 --batch-size 32 --z-dim 3 --limit 300 --num-samples 300"
    r = _run("custom_model_guide", args, *QUIET)
    # The linear-Gaussian posterior is in the guide's family: importance sampling is near exact.
    assert abs(r["test_log_px"] - r["test_exact"]) < 0.05
    assert abs(r["train_log_px"] - r["train_exact"]) < 0.05
    assert r["train_elbo"] <= r["train_exact"] + 0.05  # a lower bound
    assert r["train_exact"] <= r["train_mle"] + 1e-6  # nothing beats the closed-form maximum
    assert r["train_exact"] > r["train_mle"] - 1.0  # and training got close to it
    assert "exact log p(x), trained model" in capsys.readouterr().out


def test_custom_pair_student_t_prior():
    args = "--prior student-t --epochs 3 --z-dim 2 --limit 200 --num-samples 200"
    r = _run("custom_model_guide", args, *QUIET)
    (train1, test1), (train100, test100) = r["iwae_1"], r["iwae_100"]
    assert train1 < train100 + 0.05 and test1 < test100 + 0.05  # the IWAE bound rises with K
    assert math.isfinite(r["test_log_px"])


def _titles(monkeypatch) -> list:
    # the titles of the figures pyrovae.plots draws, as they are saved
    from pyrovae import plots

    titles = []
    real = plots._figure

    def figure(*args):
        fig = real(*args)
        save = fig.savefig
        fig.savefig = lambda *a, **k: (
            titles.extend(ax.get_title() for ax in fig.axes) or save(*a, **k)
        )
        return fig

    monkeypatch.setattr(plots, "_figure", figure)
    return titles


def test_cvae_quadrants_and_classes(tmp_path, monkeypatch):
    titles = _titles(monkeypatch)
    out = tmp_path / "out"
    common = "--dataset digits --epochs 1 --hidden 32 --z-dim 2 --limit 400 --eval-n 30"
    r = _run("cvae", common, "--num-samples", "20", "--out", str(out), *QUIET)
    assert r["cvae_elbo"] < r["cvae_log_p"] < 0 and r["baseline_log_p"] < 0
    _pngs(out, "completions.png")
    r = _run("cvae", common, "--task", "class", "--label", "3", "--out", str(out), *QUIET)
    assert math.isfinite(r["cvae_log_p"])
    _pngs(out, "classes.png")
    # the completions are means of p(y|z, c), one per z ~ p(z|c): the titles say so
    assert "the mean of p(y|z, c)" in titles[0] and "not draws" in titles[0]
    assert "the mean of p(x|z, c) (not a draw)" in titles[1]


def test_cvae_bad_input(unlabelled_data):
    with pytest.raises(pyrovae.DataError, match="--task class needs class labels"):
        _run("cvae", "--dataset binarized-mnist --task class --data-dir", str(unlabelled_data))
    with pytest.raises(ValueError, match="--label takes a class"):
        _run("cvae", "--dataset digits --label 3")


def test_quadrant_task_splits_images():
    cvae = _load("cvae")
    data = pyrovae.data.load("digits", "test", binarize="threshold")
    context, target = cvae.make_task(data, "quadrants", visible=1)
    assert context.shape == (360, 64) and target.shape == (360, 48)
    mask = cvae.quadrant_mask((1, 8, 8), 1).flatten()
    assert (context[:, ~mask] == -1).all()  # hidden pixels are marked, not leaked
    assert (context[:, mask] == data.images.flatten(1)[:, mask]).all()


def test_ss_vae_m2(tmp_path, capsys):
    args = "--dataset digits --labels 100 --unlabelled 500 --epochs 2 --batch-size 32 --lr 3e-3"
    args += " --hidden 64 --z-dim 4 --label-repeat 2 --baseline"
    r = _run("ss_vae_m2", args, "--out", str(tmp_path), *QUIET)
    assert r["labelled"] == 100 and r["unlabelled"] == 500
    assert r["test_accuracy"] > 0.5  # chance is 0.1; 100 labels and 2 epochs reach about 0.7
    assert 0 <= r["baseline_accuracy"] <= 1
    assert "labelled images alone" in capsys.readouterr().out
    _pngs(tmp_path, "analogies.png")


def test_ss_vae_m2_digits_command_of_the_docs(tmp_path, monkeypatch):
    # docs/examples.md quotes a command and its accuracy: this runs that command, as written
    # there, and checks the number the page states, within the ± 3 points it states
    import re

    page = (EXAMPLES.parent / "docs" / "examples.md").read_text()
    command = re.search(r"python examples/ss_vae_m2\.py (--dataset digits[^`]*?)\n```", page)
    quoted = re.search(r"reaches \*\*([\d.]+) %\*\* test accuracy on the 360 test digits", page)
    assert command and quoted and "accepts ± 3 points" in page
    args = command.group(1).replace("\\\n", " ")
    titles = _titles(monkeypatch)
    r = _run("ss_vae_m2", args, "--out", str(tmp_path), *QUIET)
    assert abs(100 * r["test_accuracy"] - float(quoted.group(1))) <= 3, (args, r)
    _pngs(tmp_path, "analogies.png")
    assert "the mean of p(x|z, y), not a draw" in titles[-1]


def test_m2_labels_are_balanced_and_hidden():
    m2 = _load("ss_vae_m2")
    labels = pyrovae.data.load("digits", "train").labels
    mask = m2.choose_labelled(labels, 50)
    assert mask.sum() == 50 and (labels[mask].bincount(minlength=10) == 5).all()
    with pytest.raises(ValueError, match="multiple of 10"):
        m2.choose_labelled(labels, 55)
    with pytest.raises(ValueError, match="fewer than"):
        m2.choose_labelled(labels, 10000)


def test_conv_vae(tmp_path):
    args = "--dataset digits --epochs 1 --channels 4 --hidden 16 --z-dim 2 --limit 300"
    args += " --eval-n 20 --num-samples 10 --likelihood gaussian"
    r = _run("conv_vae", args, "--out", str(tmp_path), *QUIET)
    assert r["test_elbo"] < r["test_log_px"]
    _pngs(tmp_path, "samples.png", "recon.png", "elbo.png", "manifold.png")


def test_walkthrough(tmp_path, capsys):
    args = "--dataset digits --epochs 2 --hidden 16 --limit 400 --eval-n 60 --lines 10 --grid 4"
    args += " --judge-steps 30 --variances 0.1 1"
    r = _run("walkthrough", args, "--out", str(tmp_path), *QUIET)
    variants = r["variants"]
    assert [v["variant"] for v in variants] == ["a", "b", "c", "d"]
    for v in variants + r["variance_study"]:
        for key in ("recon_mse", "continuity_mean", "continuity_p95", "completeness"):
            assert math.isfinite(v[key]), (v["title"], key)
        assert 0.1 <= v["completeness"] <= 1  # a confidence over 10 classes
        assert v["continuity_mean"] <= v["continuity_p95"] + 1e-9
    assert variants[0]["kl"] is None and variants[3]["kl"] > 0
    assert variants[0]["mean_sigma"] == 0 and variants[2]["mean_sigma"] == pytest.approx(0.3)
    assert [v["variance"] for v in r["variance_study"]] == [0.1, 1.0]
    printed = capsys.readouterr().out
    assert "(a) autoencoder" in printed and "(d) VAE, learned σ" in printed
    _pngs(tmp_path, "walkthrough.png", "variance.png")
    header = (tmp_path / "walkthrough.csv").read_text().splitlines()[0]
    assert header.startswith("title,recon_mse,continuity_mean")


def test_continuity_of_a_linear_decoder():
    wt = _load("walkthrough")
    codes = torch.randn(50, 2) * 3

    def decode(z):  # pixel change is exactly 2 per unit of latent distance, in every direction
        return 2 * torch.cat([z, -z], -1) / math.sqrt(2)

    spread = float((codes - codes.mean(0)).pow(2).sum(-1).mean().sqrt())
    mean, p95 = wt.continuity(decode, codes, lines=20)
    # RMS over 4 "pixels" of a change of norm 2·|Δz|: |Δz|, per |Δz| / spread
    assert mean == pytest.approx(spread, rel=1e-4) and p95 == pytest.approx(spread, rel=1e-4)


def test_unusable_dataset_is_one_line_from_any_folder(unlabelled_data, tmp_path):
    # Run as a script from an unrelated folder: imports work, the error is one line.
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    script = [sys.executable, str(EXAMPLES / "ss_vae_m2.py")]
    args = ["--dataset", "binarized-mnist", "--data-dir", str(unlabelled_data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        script + args, cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "M2 needs class labels" in err and "binarized-mnist has none" in err, err


def test_own_images(tmp_path, capsys):
    # the embedded colour patches written as a PNG folder, a colour conv VAE, bits/dim
    args = "--epochs 1 --widths 8 16 --hidden 32 --z-dim 4 --mixtures 2 --eval-n 6"
    _run("own_images", args, "--num-samples", "10", "--out", str(tmp_path), *QUIET)
    assert "bits/dim" in capsys.readouterr().out
    _pngs(tmp_path, "samples.png", "reconstructions.png", "interpolations.png", "elbo.png")


def test_air(tmp_path, capsys):
    # AIR with its baselines under TraceGraph_ELBO, captured; count accuracy every epoch
    args = "--n 64 --test-n 16 --epochs 2 --batch-size 32 --window 8 --rnn 16 --hidden 16"
    r = _run("air", args + " --num-samples 5", "--out", str(tmp_path), *QUIET)
    assert len(r["accuracy"]) == 2 and all(0 <= a <= 1 for a in r["accuracy"])
    assert r["path"] == "captured"
    assert sum(map(sum, r["table"])) == 16  # every held-out canvas counted once
    assert math.isfinite(r["test_log_px"]) and r["test_elbo"] < r["test_log_px"]
    printed = capsys.readouterr().out
    assert "count accuracy" in printed and "took the captured path" in printed
    _pngs(tmp_path, "reconstructions.png", "count_accuracy.png")


def test_air_anneals_its_prior_through_step_kwargs(tmp_path):
    # log k ramps from -30 to -60 over the two epochs, fed to the captured model every step
    args = "--n 64 --test-n 16 --epochs 2 --batch-size 32 --window 8 --rnn 16 --hidden 16"
    r = _run("air", args + " --num-samples 5 --anneal-prior-epochs 2", "--out", str(tmp_path),
             *QUIET)  # fmt: skip
    assert r["path"] == "captured"
    fed = [record["log_pres_prior"] for record in r["step_kwargs"]]  # each epoch's last step
    assert fed == pytest.approx([-45.0, -60.0])


@pytest.mark.parametrize("objects", ["squares", "digits"])
def test_air_canvases_hold_as_many_objects_as_they_say(objects):
    x, counts = _load("air").make_canvases(60, objects, seed=3, size=24, side=9)
    assert x.shape == (60, 24, 24) and counts.shape == (60,)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert set(counts.tolist()) == {0, 1, 2}
    empty = x.flatten(1).amax(1) == 0  # (60,)
    assert torch.equal(empty, counts == 0)
    if objects == "squares":  # 9×9 white squares that never overlap
        assert torch.equal((x > 0).flatten(1).sum(1), counts * 81)


def test_air_refuses_objects_that_cannot_fit():
    with pytest.raises(ValueError, match="--object-size 12 leaves no room for 2 objects"):
        _load("air").make_canvases(20, seed=0, size=16, side=12)


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.py")))
def test_every_option_of_an_example_has_help_and_shows_its_default(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # one line per option: no words broken at hyphens
    parser = _load(name).build_parser()
    text = " ".join(parser.format_help().split())
    assert "``" not in text
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, (name, action.option_strings)
        default = action.default if not isinstance(action.default, list) else str(action.default)
        assert f"(default: {' '.join(str(default).split())})" in text, (name, action.dest)


def test_the_examples_page_counts_the_scripts_and_says_which_write_figures():
    # docs/examples.md's opening claims, checked against examples/
    page = (EXAMPLES.parent / "docs" / "examples.md").read_text()
    words = {6: "Six", 7: "Seven", 8: "Eight", 9: "Nine", 10: "Ten"}
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert f"\n{words[len(scripts)]} scripts in `examples/`" in page
    takes_out = {
        p.stem for p in scripts if "--out" in _load(p.stem).build_parser()._option_string_actions
    }
    assert {p.stem for p in scripts} - takes_out == {"custom_model_guide"}
    assert "all but `custom_model_guide.py`" in page
