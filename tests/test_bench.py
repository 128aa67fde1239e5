import copy
import runpy
import sys

import pyro
import pytest
import torch

import pyrovae
from pyrovae import cli
from pyrovae.bench import (
    GRAPH,
    HandwrittenGraph,
    _log_weights,
    bench_training,
    handwritten_epoch,
    handwritten_log_likelihood,
    plain_function_pair,
)
from pyrovae.evaluation import log_weights


def test_reference_computes_the_same_math(digits_vae):
    # The hand-written loop's log weights equal those of the Pyro pair, draw for draw.
    vae, x = digits_vae
    pyro.set_rng_seed(4)
    ours = log_weights(vae.model, vae.guide, x, num_particles=3, max_plate_nesting=1)
    pyro.set_rng_seed(4)
    with torch.no_grad():
        theirs = _log_weights(vae.encoder, vae.decoder, x, 3)
    assert torch.allclose(ours, theirs, atol=1e-4)
    pyro.set_rng_seed(4)
    a = pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=50)
    pyro.set_rng_seed(4)
    b = handwritten_log_likelihood(vae.encoder, vae.decoder, x, 50)
    assert torch.allclose(a, b, atol=1e-4)


def test_bench_prints_tables(capsys):
    argv = ["bench", "--rounds", "1", "--limit", "128", "--batch-sizes", "64", "32",
            "--arch", "vampprior", "--num-samples", "20", "40", "--eval-n", "8"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for row in ("pyrovae.fit (fast path)", "pyrovae.fit (eager)", "plain functions (fit)",
                "hand-written PyTorch",
                "stock Pyro (SVI.step)", "training, batch 32", "log p(x), K=40",
                "pyrovae.log_likelihood", "hand-written IS", "peak resident memory",
                "peak MiB", "vs stock", "TFLOP/s"):  # fmt: skip
        assert row in out, row
    assert GRAPH not in out and "vs graph" not in out  # CUDA only


def test_bench_one_part_and_chunk_sweep(capsys):
    base = ["bench", "--rounds", "1", "--limit", "64", "--batch-sizes", "32", "--eval-n", "4",
            "--num-samples", "10"]  # fmt: skip
    assert cli.main([*base, "--eval-only", "--chunk-elements", "640", "64000",
                     "--eval-rounds", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "training, batch" not in out
    assert "K=10, 4 images, chunk 640 " in out and "K=10, 4 images, chunk 64000 " in out
    assert cli.main([*base, "--train-only"]) == 0
    out = capsys.readouterr().out
    assert "training, batch 32" in out and "log p(x)" not in out
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--train-only", "--eval-only"])
    capsys.readouterr()
    assert cli.main([*base, "--chunk-elements", "0"]) == 1
    assert "--chunk-elements must be >= 1" in capsys.readouterr().err
    assert cli.main([*base, "--eval-rounds", "0"]) == 1
    assert "--eval-rounds must be >= 1" in capsys.readouterr().err


def test_bench_on_a_loaded_machine_runs_a_busy_neighbour(capsys, monkeypatch):
    import pyrovae.bench as bench

    seen = []
    real = bench.busy_neighbour

    def spy(on=True):
        seen.append(on)
        return real(on)

    monkeypatch.setattr(bench, "busy_neighbour", spy)
    argv = ["bench", "--rounds", "1", "--limit", "64", "--batch-sizes", "32", "--train-only",
            "--machine", "both"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert seen == [False, True]
    assert out.count("training, batch 32") == 2 and "## loaded machine" in out


def test_python_dash_m_runs_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pyrovae", "bench", "--rounds", "0"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("pyrovae", run_name="__main__")
    assert e.value.code == 1
    assert "--rounds must be >= 1" in capsys.readouterr().err


def test_bench_bad_sizes(capsys):
    assert cli.main(["bench", "--rounds", "0"]) == 1
    assert "--rounds must be >= 1" in capsys.readouterr().err
    assert cli.main(["bench", "--batch-sizes", "0"]) == 1
    assert "--batch-sizes must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--device", "cuda"]) == 1
        assert "CUDA is not available" in capsys.readouterr().err


def test_dense_flop_count():
    from pyrovae.bench import _dense_flops

    config = pyrovae.Config(x_shape=(1, 28, 28), hidden=(400,), z_dim=50)
    encoder = 784 * 400 + 2 * 400 * 50
    decoder = 50 * 400 + 400 * 784
    assert _dense_flops(config, 10, 3) == 2.0 * 10 * (encoder + 3 * decoder)


def test_plain_function_pair_is_the_same_vae_and_takes_the_fast_path(digits_vae, caplog):
    # Pyro's tutorial idiom (plain functions, pyro.module) computes the built-in VAE's ELBO,
    # draw for draw, and fit replays it.
    from pyrovae.bench import plain_function_pair

    vae, x = digits_vae
    model, guide = plain_function_pair(vae.encoder, vae.decoder, vae.z_dim)
    pyro.set_rng_seed(2)
    ours = pyrovae.elbo(model, guide, x)
    pyro.set_rng_seed(2)
    theirs = pyrovae.elbo(vae.model, vae.guide, x)
    assert torch.allclose(ours, theirs, atol=1e-4)
    with caplog.at_level("INFO", logger="pyrovae"):
        pyrovae.fit(model, guide, x, epochs=1, batch_size=16, progress=False)
    assert any("replaying the captured loss" in r.getMessage() for r in caplog.records)


def _tiny(batch_size=32):
    data = pyrovae.data.load("digits", "train", binarize="threshold")
    config = pyrovae.Config(x_shape=data.x_shape, hidden=(16,), z_dim=4, batch_size=batch_size)
    return data.images[:96], config


def test_bench_training_rows_and_one_capture_per_fit_run(caplog):
    # Each fit method is one run advanced an epoch per round: it captures once, in the warm-up.
    x, config = _tiny()
    with caplog.at_level("INFO", logger="pyrovae"):
        res = bench_training(x, config, rounds=2)
    assert GRAPH not in res  # CUDA only
    assert all(len(r["speeds"]) == 2 and r["memory"] is None for r in res.values())
    replays = [r for r in caplog.records if "replaying the captured loss" in r.getMessage()]
    assert len(replays) == 2, [r.getMessage() for r in caplog.records]  # fast path and plain


def test_plain_function_pair_trains_in_the_bench(digits_vae):
    # The plain pair, advanced epoch by epoch as the bench runs it, trains its own networks
    # (its param-store names do not collide with the built-in VAE's).
    vae, _ = digits_vae
    x, _ = _tiny()
    enc, dec = copy.deepcopy(vae.encoder), copy.deepcopy(vae.decoder)
    before = [p.detach().clone() for p in vae.parameters()]
    pyrovae.fit(vae.model, vae.guide, x, epochs=1, batch_size=32, progress=False)
    trained = [p.detach().clone() for p in vae.parameters()]
    model, guide = plain_function_pair(enc, dec, vae.z_dim, prefix="plain_")
    run = pyrovae.Trainer(model, guide, x, batch_size=32, lr=1e-2)
    records = [run.epoch() for _ in range(6)]
    assert [r["epoch"] for r in records] == list(range(1, 7)) and run.state.epoch == 6
    assert all(r["seconds"] > 0 for r in records)
    elbos = run.history.train_elbo
    assert elbos[-1] > elbos[0] + 1, elbos
    assert all(torch.equal(a, b) for a, b in zip(trained, vae.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before, trained, strict=True))


def test_trainer_refuses_bad_arguments_before_any_step():
    x, _ = _tiny()
    with pytest.raises(ValueError, match="batch_size"):
        pyrovae.Trainer(lambda x: None, lambda x: None, x, batch_size=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        pyrovae.Trainer(lambda x: None, lambda x: None, x, lr=0)


def test_cuda_graph_loop_needs_cuda():
    x, config = _tiny()
    vae = pyrovae.build_vae(config)
    with pytest.raises(ValueError, match="CUDA device"):
        HandwrittenGraph(vae.encoder, vae.decoder, x, 32)


@pytest.mark.gpu
def test_cuda_graph_loop_trains_like_the_eager_loop():
    # The hand-written step recorded as a CUDA graph (with an eager last partial batch) trains,
    # and reaches the eager hand-written loop's ELBO from the same start.
    data = pyrovae.data.load("digits", "train", binarize="threshold")
    x = data.images.cuda()  # 1257 images: 19 full batches of 64 and a partial one
    torch.manual_seed(0)
    vae = pyrovae.build_vae(pyrovae.Config(x_shape=data.x_shape, hidden=(64,), z_dim=8)).cuda()
    nets = [(copy.deepcopy(vae.encoder), copy.deepcopy(vae.decoder)) for _ in range(2)]
    graph = HandwrittenGraph(*nets[0], x, 64, lr=3e-3)
    opt = torch.optim.Adam([p for net in nets[1] for p in net.parameters()], lr=3e-3)
    ours = [graph.epoch() for _ in range(8)]
    theirs = [handwritten_epoch(*nets[1], opt, x, 64) for _ in range(8)]
    assert graph.graph is not None
    assert ours[-1] > ours[0] + 5, ours
    assert abs(ours[-1] - theirs[-1]) < 1.5, (ours, theirs)
