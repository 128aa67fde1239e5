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
    argv = ["bench", "--rounds", "1", "--limit", "128", "--batch-size", "64", "--hidden", "16",
            "--z-dim", "2", "--num-samples", "20", "--eval-n", "8"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for row in ("pyrovae.fit (validation on)", "hand-written PyTorch", "pyrovae.log_likelihood",
                "hand-written IS", "peak resident memory"):  # fmt: skip
        assert row in out


def test_bench_bad_sizes(capsys):
    assert cli.main(["bench", "--rounds", "0"]) == 1
    assert "--rounds must be >= 1" in capsys.readouterr().err
