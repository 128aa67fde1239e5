"""A user's pair in the style of Pyro's VAE tutorial (plain functions, ``pyro.module``), trained
with pyrovae.lightning; run by tests/test_lightning.py as ``python lightning_pair.py PROCESSES
BATCH OUT_DIR [nan]`` (Lightning starts the other ranks by running this file again); with
``nan``, one training image overflows the encoder (a NaN loss in one step, with Pyro's
validation off) and the run must stop, restored."""

import hashlib
import json
import os
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
from torch import nn

import pyrovae
from pyrovae.lightning import EpochCallback, fit

processes, batch, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
pyro.set_rng_seed(0)
encoder = nn.Sequential(nn.Linear(64, 32), nn.Softplus(), nn.Linear(32, 8))  # loc, log scale
decoder = nn.Sequential(nn.Linear(4, 32), nn.Softplus(), nn.Linear(32, 64))


def model(x):
    pyro.module("decoder", decoder)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(4), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)


def guide(x):
    pyro.module("encoder", encoder)
    with pyro.plate("data", x.shape[0]):
        loc, log_scale = encoder(x).chunk(2, -1)
        pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


data = pyrovae.data.load("digits", "train", binarize="threshold").images.flatten(1)[:512]
valid = pyrovae.data.load("digits", "valid", binarize="threshold").images.flatten(1)


def weights() -> str:
    blob = b"".join(
        p.detach().numpy().tobytes() for m in (encoder, decoder) for p in m.parameters()
    )
    return hashlib.sha256(blob).hexdigest()


if sys.argv[4:] == ["nan"]:
    pyro.enable_validation(False)
    data = data.clone()
    data[100] = 1e30  # finite, but q(z|x)'s scale is inf: on one rank's shard, in one step
    initial = weights()
    try:
        fit(model, guide, data, epochs=3, batch_size=batch, devices=processes, accelerator="cpu",
            strategy="ddp", enable_progress_bar=False)  # fmt: skip
    except pyrovae.NonFiniteLossError as e:
        result = {"error": str(e), "restored": weights() == initial}
        (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))
    sys.exit(0)
records = []
trainer = fit(model, guide, data, val_data=valid, epochs=3, batch_size=batch, devices=processes,
              accelerator="cpu", strategy="ddp" if processes > 1 else "auto",
              callbacks=[EpochCallback(lambda r: records.append(dict(r)))],
              enable_progress_bar=False)  # fmt: skip
rank = trainer.global_rank
replayed = type(trainer.lightning_module.step_loss).__name__ == "CapturedLoss"
result = {"sha256": weights(), "records": records, "replayed": replayed}
(out / f"rank{rank}.json").write_text(json.dumps(result))
