"""The Lightning engine (pyrovae.lightning) and distributed scoring: 2 CPU processes (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyrovae

L = pytest.importorskip("lightning")
from pyrovae.lightning import PairModule, fit  # noqa: E402

HERE = Path(__file__).parent


#: what an in-process Lightning run leaves in os.environ; a child that inherits it would take
#: itself for a rank that a launcher started
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_environment():
    # an in-process Lightning run sets RANK_VARIABLES in os.environ: keep them from leaking
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(PYROVAE_DEVICE="cpu", OMP_NUM_THREADS="1")
    env["PYTHONWARNINGS"] = "ignore"  # Lightning's own deprecation notes in the child ranks
    return env


def _pair(tmp_path, processes: int, batch: int, *flags: str) -> list[dict]:
    out = tmp_path / f"{processes}x{batch}"
    out.mkdir()
    cmd = [sys.executable, str(HERE / "lightning_pair.py"), str(processes), str(batch), str(out)]
    proc = subprocess.run(cmd + list(flags), cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]


def test_ddp_user_pair_keeps_ranks_identical_and_matches_one_process_with_twice_the_batch(
    tmp_path,
):
    two = _pair(tmp_path, 2, 32)
    # epochs 2 and 3 replayed the captured loss, and DDP's all-reduce still kept the ranks
    # (which saw different data) in step
    assert two[0]["replayed"] and two[1]["replayed"]
    assert two[0]["sha256"] == two[1]["sha256"]
    elbos = [[(r["train_elbo"], r["val_elbo"]) for r in rank["records"]] for rank in two]
    assert elbos[0] == elbos[1]  # ELBOs summed over ranks: the same on each
    one = _pair(tmp_path, 1, 64)[0]
    for a, b in zip(two[0]["records"], one["records"], strict=True):
        # the same steps on the same data (B per rank ≈ 2B at once), different noise: the
        # per-datapoint ELBOs agree to within 1 nat (they move ~6 nats over these epochs)
        assert abs(a["train_elbo"] - b["train_elbo"]) < 1.0
        assert abs(a["val_elbo"] - b["val_elbo"]) < 1.0
    assert one["records"][-1]["val_elbo"] > one["records"][0]["val_elbo"] + 2


def test_ddp_several_objectives_m2_one_optimizer_ranks_identical(tmp_path):
    out = tmp_path / "m2"
    out.mkdir()
    cmd = [sys.executable, str(HERE / "lightning_m2.py"), "2", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]  # DDP kept the one optimizer in step
    for a, b in zip(ranks[0]["records"], ranks[1]["records"], strict=True):
        a.pop("seconds"), b.pop("seconds")
        assert a == b  # the parts summed over ranks: the same on each
    # every objective's loss replayed after the eager first epoch, the enumerated one included
    assert ranks[0]["replayed"] == [True, True, True]
    # one Adam step per step of the largest objective: 300 unlabelled / 2 ranks / 25 = 6 an
    # epoch (the 100 labelled images, 10 a step on each rank, cycle), 3 epochs
    assert ranks[0]["adam_steps"] == [18.0]
    records = ranks[0]["records"]
    assert [set(r["parts"]) for r in records] == [{"unlabelled", "labelled", "classifier"}] * 3
    assert [r["train_elbo"] for r in records] == [r["parts"]["unlabelled"] for r in records]
    for name in ("unlabelled", "labelled", "classifier"):  # every term trained
        assert records[-1]["parts"][name] > records[0]["parts"][name], name


def test_pair_module_wants_one_example_per_objective():
    model, guide = _tutorial_pair(lazy=False, outside=False)
    objectives = [pyrovae.Objective(model, guide, torch.zeros(4, 64))] * 2
    with pytest.raises(ValueError, match="one example batch per objective"):
        PairModule(objectives, None, [torch.zeros(4, 64)])


def _cli(tmp_path, *args):
    cmd = [sys.executable, "-m", "pyrovae", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True)


def test_cli_trains_on_two_processes_and_evaluate_on_two_equals_one(tmp_path):
    proc = _cli(
        tmp_path,
        "train",
        "--out",
        "run",
        "--epochs",
        "3",
        "--devices",
        "2",
        "--accelerator",
        "cpu",
        "--no-progress",
        "--hidden",
        "32",
        "--z-dim",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    for name in (
        "config.json",
        "model.safetensors",
        "metrics.csv",
        "train.json",
        "elbo.png",
        "reconstructions.png",
        "samples.png",
        "latent.png",
        "traversals.png",
    ):
        assert (run / name).is_file(), name
    summary = json.loads((run / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 3
    assert len((run / "metrics.csv").read_text().splitlines()) == 4
    scores = []
    for devices in ("2", "1"):
        proc = _cli(
            tmp_path,
            "evaluate",
            "run",
            "--num-samples",
            "50",
            "--batch-size",
            "40",
            "--devices",
            devices,
            "--accelerator",
            "cpu",
            "--no-progress",
        )
        assert proc.returncode == 0, proc.stderr
        scores.append(
            ((run / "log_px.csv").read_text(), json.loads((run / "eval.json").read_text()))
        )
    assert scores[0][0] == scores[1][0]  # every image's log p(x), bit for bit
    assert [s[1]["processes"] for s in scores] == [2, 1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--devices", "64", "--accelerator", "cpu"], "--devices 64: this machine has"),
        (["--devices", "2", "--accelerator", "gpu"], "--accelerator gpu"),
        (["--devices", "2", "--accelerator", "cpu", "--precision", "16-mixed"], "needs a GPU"),
        (["--devices", "0"], "--devices must be >= 1"),
    ],
)
def test_bad_launch_options_are_one_line_errors_before_any_process_starts(tmp_path, flags, message):
    if "gpu" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from pyrovae.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), *flags]) == 1
    assert not (tmp_path / "run").exists()


def test_bad_launch_message(tmp_path, capsys):
    from pyrovae.cli import main

    assert main(["evaluate", str(tmp_path), "--devices", "64", "--accelerator", "cpu"]) == 1
    assert "--devices 64: this machine has" in capsys.readouterr().err


def test_seeded_scores_do_not_depend_on_the_callers_generator(digits_vae):
    vae, x = digits_vae
    torch.manual_seed(1)
    a = pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=20, batch_size=8, seed=3)
    torch.manual_seed(2)
    b = pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=20, batch_size=8, seed=3)
    assert torch.equal(a, b)
    # the caller's generator is left as it was
    torch.manual_seed(5)
    state = torch.get_rng_state()
    pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=20, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    # a block's draws are its own: scoring the first block alone gives its values
    first = pyrovae.log_likelihood(
        vae.model, vae.guide, x[:8], num_samples=20, batch_size=8, seed=3
    )
    assert torch.equal(first, a[:8])


def _tutorial_pair(lazy: bool, outside: bool):
    decoder = nn.Linear(2, 64)
    extra = {}

    def model(x):
        pyro.module("decoder", decoder)
        late = nn.Identity()
        if lazy and x.shape[0] == 4:  # a module that appears only on a later batch
            late = pyro.module("late", extra.setdefault("late", nn.Linear(2, 2)))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(late(z))).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(2)) if outside else torch.zeros(2)
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    model.decoder = decoder
    return model, guide


def test_param_sites_outside_modules_are_refused():
    model, guide = _tutorial_pair(lazy=False, outside=True)
    with pytest.raises(ValueError, match="pyro.param sites outside every module: loc"):
        PairModule(model, guide, torch.zeros(4, 64))


def test_a_pair_that_creates_parameters_after_its_first_batch_is_refused():
    model, guide = _tutorial_pair(lazy=True, outside=False)
    x = torch.zeros(12, 64)  # batches of 8, then 4: the second creates a module
    with pytest.raises(ValueError, match="created parameters after its first batch"):
        fit(
            model,
            guide,
            x,
            epochs=1,
            batch_size=8,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
        )


def test_pyros_svi_lightning_model_global_latents_in_a_scaled_plate():
    # the model of Pyro's examples/svi_lightning.py with its AutoNormal: what that example
    # trains with Lightning, trained here through PairModule; the ELBO per datapoint is the
    # whole data's over n, as pyrovae.fit reports it (tests/test_pyro_idioms.py)
    from pyro.infer.autoguide import AutoNormal
    from regression import Regression, elbo_per_datapoint, regression_data

    x, y = regression_data()
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    model = Regression(len(x))
    guide = AutoNormal(model)
    records = []
    trainer = fit(model, guide, (x, y), val_data=(x, y), epochs=30, batch_size=100, lr=0.05,
                  accelerator="cpu", devices=1, enable_progress_bar=False,
                  callbacks=[pyrovae.lightning.EpochCallback(records.append)])  # fmt: skip
    assert trainer.lightning_module.terms[0].full == len(x)
    median = guide.median()
    for name, truth in (("coeff", 2.0), ("bias", 0.5), ("scale", 0.3)):
        assert abs(float(median[name]) - truth) < 0.1, (name, float(median[name]))
    exact = elbo_per_datapoint(model, guide, x, y)
    assert abs(records[-1]["val_elbo"] - exact) < 0.02, (records[-1]["val_elbo"], exact)


def test_a_nan_on_one_rank_stops_every_rank_restored_naming_the_step(tmp_path):
    # image 100 overflows the encoder: its rank's loss is NaN in one step, and DDP's all-reduce
    # carries it to both ranks' gradients; the earliest bad step over ranks is named and the
    # weights restored
    results = _pair(tmp_path, 2, 32, "nan")
    assert results, "no rank reported"  # rank 0 at least (Lightning may stop the other first)
    for result in results:
        assert result["restored"]
        assert "non-finite loss at epoch 1, step" in result["error"]
        assert "restored to their initial values" in result["error"]


def test_a_nan_mid_run_restores_the_last_good_epoch_and_says_where():
    from pyrovae.errors import NonFiniteLossError
    from pyrovae.lightning import EpochCallback

    model, guide = _tutorial_pair(lazy=False, outside=False)
    decoder = model.decoder
    x = pyrovae.data.load("digits", "train", binarize="threshold").images.flatten(1)[:64]
    kept = {}

    def poison(record):
        # after epoch 1 is recorded (its weights kept as the good ones), a NaN weight: epoch
        # 2's first step has a NaN loss
        if record["epoch"] == 1:
            kept["weight"] = decoder.weight.detach().clone()
            with torch.no_grad():
                decoder.weight[0, 0] = float("nan")

    with pytest.raises(NonFiniteLossError, match="at epoch 2, step 1; parameters were restored "
                       "to the end of epoch 1") as error:  # fmt: skip
        fit(model, guide, x, epochs=3, batch_size=16, accelerator="cpu", devices=1,
            enable_progress_bar=False, callbacks=[EpochCallback(poison)])  # fmt: skip
    assert (error.value.epoch, error.value.step) == (2, 1)
    assert torch.equal(decoder.weight, kept["weight"])


def test_tensorboard_logger_writes_the_records_scalars_and_image_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pyrovae.cli import main

    run = tmp_path / "run"
    argv = [
        "train",
        "--out",
        str(run),
        "--epochs",
        "2",
        "--hidden",
        "16",
        "--z-dim",
        "2",
        "--logger",
        "tensorboard",
        "--log-images-every",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train_elbo", "val_elbo", "val_reconstruction", "val_kl", "beta"} <= scalars
    assert [e.step for e in events.Scalars("val_elbo")] == [1, 2]
    metrics = (run / "metrics.csv").read_text().splitlines()
    last = float(metrics[-1].split(",")[metrics[0].split(",").index("val_elbo")])
    assert events.Scalars("val_elbo")[-1].value == pytest.approx(last, rel=1e-6)
    assert {"reconstructions", "samples"} <= set(events.Tags()["images"])
    assert json.loads((run / "train.json").read_text())["world_size"] == 1


def test_a_streamed_folder_trains_on_two_processes_with_loader_workers(tmp_path):
    # --stream yes: each rank's DataLoader (one worker) decodes its shard's PNGs while training;
    # the Bernoulli likelihood's dynamic binarization (--binarize auto) applies to each batch
    digits = pyrovae.data.load("digits", "train")
    pyrovae.data.write_folder(digits.images[:200], digits.labels[:200], None, tmp_path / "imgs")
    proc = _cli(tmp_path, "train", "--dataset", "folder", "--data-dir", "imgs", "--stream",
                "yes", "--workers", "1", "--out", "run", "--epochs", "2", "--devices", "2",
                "--accelerator", "cpu", "--no-progress", "--hidden", "32", "--z-dim", "2",
                "--batch-size", "16")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["engine"] == "lightning"
    config = json.loads((run / "config.json").read_text())
    assert config["stream"] == "yes" and config["binarize"] == "dynamic"
    rows = (run / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert len(rows) == 3 and float(last[header.index("val_elbo")]) < 0
    for name in ("model.safetensors", "elbo.png", "reconstructions.png", "samples.png"):
        assert (run / name).is_file(), name


def test_lightning_streams_a_dataset_and_refuses_a_dataloader():
    from torch.utils.data import DataLoader, Dataset

    from pyrovae.errors import DataError
    from pyrovae.lightning import ShardedData

    class Items(Dataset):  # images one at a time, as a folder of files would give them
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return torch.full((64,), float(i % 2))

    model, guide = _tutorial_pair(lazy=False, outside=False)
    trainer = fit(model, guide, Items(), epochs=2, batch_size=8, stream=True, accelerator="cpu",
                  devices=1, enable_progress_bar=False)  # fmt: skip
    assert trainer.lightning_module.state.epoch == 2
    data = ShardedData(Items(), batch_size=8, stream=True)
    assert data.streamed(data.train) and data.example(0)[0].shape == (8, 64)
    with pytest.raises(DataError, match="cannot be sharded: pass its Dataset"):
        ShardedData(DataLoader(Items(), batch_size=8))


def test_a_ddp_run_killed_while_training_resumes_on_two_processes_then_on_one(tmp_path):
    import signal
    import time

    cmd = [sys.executable, "-m", "pyrovae", "train", "--out", "run", "--epochs", "400",
           "--devices", "2", "--accelerator", "cpu", "--no-progress", "--batch-size", "16",
           "--hidden", "32", "--z-dim", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    metrics = tmp_path / "run" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # rank 0, mid-epoch; rank 1 fails on the broken group
    proc.wait()
    saved = len(metrics.read_text().splitlines()) - 1
    assert 2 <= saved < 400
    again = _cli(tmp_path, "resume", "run", "--epochs", str(saved + 2), "--devices", "2",
                 "--accelerator", "cpu", "--no-progress")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "took over the lock" in again.stderr
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["epochs_run"] == saved + 2 and summary["world_size"] == 2
    rows = metrics.read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, saved + 3))
    # another number of processes: pyrovae's own engine continues it from its state
    once = _cli(tmp_path, "resume", "run", "--epochs", str(saved + 3), "--no-progress")
    assert once.returncode == 0, once.stderr
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["epochs_run"] == saved + 3 and summary["engine"] == "fit"


def test_a_pair_of_your_own_trains_on_two_processes_with_tensorboard(tmp_path):
    # --pair under DDP: the same run directory as one process's (the pair's modules' weights,
    # metrics with the validation ELBO), TensorBoard scalars, and evaluate re-creates the pair.
    pairs = HERE / "pairs.py"
    proc = _cli(tmp_path, "train", "--pair", f"{pairs}:tutorial_vae", "--out", "run", "--epochs",
                "2", "--devices", "2", "--accelerator", "cpu", "--logger", "tensorboard",
                "--no-progress", "--batch-size", "32")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["engine"] == "lightning"
    assert json.loads((run / "pair.json").read_text())["name"] == "tutorial_vae"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and (run / "elbo.png").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    proc = _cli(tmp_path, "evaluate", "run", "--num-samples", "10", "--limit", "20",
                "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text())["n"] == 20
