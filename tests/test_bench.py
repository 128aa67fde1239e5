import pyro
import torch

import pyrovae
from pyrovae import cli
from pyrovae.bench import _log_weights, handwritten_log_likelihood
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
                "pyrovae.log_likelihood", "hand-written IS", "peak resident memory"):  # fmt: skip
        assert row in out, row


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
