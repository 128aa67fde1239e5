"""Kingma et al.'s M2 (examples/ss_vae_m2.py) as three objectives, one optimizer, trained with
pyrovae.lightning; run by tests/test_lightning.py as ``python lightning_m2.py PROCESSES OUT_DIR``
(Lightning starts the other ranks by running this file again)."""

import hashlib
import json
import sys
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import TraceEnum_ELBO

import pyrovae
from pyrovae.lightning import EpochCallback, fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from ss_vae_m2 import M2  # noqa: E402

processes, out = int(sys.argv[1]), Path(sys.argv[2])
pyro.set_rng_seed(0)
digits = pyrovae.data.load("digits", "train", binarize="threshold")
x = digits.images.flatten(1)[:400]  # (400, 64)
y = F.one_hot(torch.as_tensor(digits.labels[:400]), 10).float()  # (400, 10)
m2 = M2(64, z_dim=4, hidden=(32,))
objectives = [
    pyrovae.Objective(m2.model, m2.guide, x[100:], loss=TraceEnum_ELBO(max_plate_nesting=1),
                      name="unlabelled"),
    pyrovae.Objective(m2.model, m2.guide, (x[:100], y[:100]), batch_size=10, name="labelled"),
    pyrovae.Objective(m2.model_classify, m2.guide_classify, (x[:100], y[:100]), batch_size=10,
                      weight=5.0, name="classifier"),
]  # fmt: skip
records = []
trainer = fit(objectives, epochs=3, batch_size=25, devices=processes, accelerator="cpu",
              strategy="ddp" if processes > 1 else "auto", optim_args={"betas": (0.95, 0.999)},
              callbacks=[EpochCallback(lambda r: records.append(dict(r)))],
              enable_progress_bar=False)  # fmt: skip
module = trainer.lightning_module
weights = b"".join(p.detach().numpy().tobytes() for p in m2.parameters())
steps = {float(s["step"]) for s in module.state.optimizer["state"].values()}
result = {
    "sha256": hashlib.sha256(weights).hexdigest(),
    "records": records,
    "replayed": [type(p.step_loss).__name__ == "CapturedLoss" for p in module.terms],
    "adam_steps": sorted(steps),
}
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
