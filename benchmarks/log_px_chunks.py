"""log p(x) with K=5000 on all 10,000 binarized-MNIST test images on CUDA: pyrovae against a
hand-written importance-sampling loop, for chunk bounds from the CPU default (2**24 numbers) to
2**28 and the GPU default; seconds, achieved TFLOP/s of the dense layers, peak memory::

    python benchmarks/log_px_chunks.py DATA_DIR
"""

import sys
import time

import pyro
import torch

import pyrovae
from pyrovae.bench import ARCHITECTURES, _dense_flops, handwritten_log_likelihood
from pyrovae.evaluation import default_chunk_elements


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def main(data_dir: str) -> None:
    pyro.enable_validation(False)
    dev = torch.device("cuda")
    test = pyrovae.data.load("binarized-mnist", "test", data_dir).images.to(dev)
    print(f"{'net':9s} {'method':7s} {'chunk':>10s} {'seconds':>8s} {'TFLOP/s':>8s} {'GiB':>6s}")
    for arch in ("mlp", "vampprior"):
        cfg = pyrovae.Config(x_shape=(1, 28, 28), **ARCHITECTURES[arch])
        vae = pyrovae.build_vae(cfg).to(dev).eval()
        flops = _dense_flops(cfg, len(test), 5000)
        for chunk in (2**24, 2**26, 2**28, default_chunk_elements(dev)):
            methods = {
                "pyrovae": lambda c=chunk, v=vae: pyrovae.log_likelihood(
                    v.model, v.guide, test, num_samples=5000, max_chunk_elements=c
                ),
                "hand": lambda c=chunk, v=vae: handwritten_log_likelihood(
                    v.encoder, v.decoder, test, 5000, c
                ),
            }
            for name, run in methods.items():
                out, s, gib = timed(run)
                print(f"{arch:9s} {name:7s} {chunk:>10d} {s:8.2f} {flops / s / 1e12:8.2f} "
                      f"{gib:6.2f}  mean log p(x) {out.mean().item():.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
