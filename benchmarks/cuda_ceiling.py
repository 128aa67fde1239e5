"""Training images/s on CUDA: pyrovae.fit's fast path (its CUDA-graph step) against a
hand-written PyTorch loop of the same single-sample ELBO, eagerly and with its whole step
(gather, loss, backward, capturable fused Adam) recorded as one CUDA graph: the practical
ceiling. Peak GPU memory each method adds. One method after another, medians of 3 epochs after
a warm-up epoch. Needs CUDA and binarized MNIST::

    python benchmarks/cuda_ceiling.py DATA_DIR
"""

import copy
import statistics
import sys
import time

import pyro
import torch

import pyrovae
from pyrovae.bench import ARCHITECTURES, _log_weights, handwritten_epoch

DEV = torch.device("cuda")


def timed(fn) -> tuple[float, float]:
    # seconds and peak MiB added while fn runs
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**20


def graph_loop(enc, dec, x, bs):
    """The hand-written step recorded as one CUDA graph (PyTorch's whole-network recipe);
    returns an epoch function and the images it trains on (full batches only)."""
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3, fused=True, capturable=True)
    idx = torch.zeros(bs, dtype=torch.long, device=DEV)

    def body():
        loss = -_log_weights(enc, dec, x.index_select(0, idx), 1).sum()
        loss.backward()
        opt.step()

    perm = torch.randperm(len(x), device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps on a side stream
        for i in range(3):
            idx.copy_(perm[i * bs : (i + 1) * bs])
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        body()
    steps = len(x) // bs

    def epoch():
        perm = torch.randperm(len(x), device=DEV)
        for i in range(steps):
            idx.copy_(perm[i * bs : (i + 1) * bs])
            graph.replay()

    return epoch, steps * bs


def run(x, arch: str, bs: int) -> None:
    cfg = pyrovae.Config(x_shape=(1, 28, 28), batch_size=bs, lr=1e-3, **ARCHITECTURES[arch])
    torch.manual_seed(0)
    vae = pyrovae.build_vae(cfg).to(DEV)
    nets = [(copy.deepcopy(vae.encoder), copy.deepcopy(vae.decoder)) for _ in range(2)]
    print(f"\n{arch} batch {bs}: images/s, peak GPU MiB added", flush=True)
    speed = {}

    def report(name, speeds, mem):
        speed[name] = statistics.median(speeds)
        print(f"  {name:26s} {speed[name]:10.0f}  peak {mem:8.1f} MiB", flush=True)

    base = torch.cuda.memory_allocated()
    epoch, n = graph_loop(*nets[0], x, bs)
    runs = [timed(epoch) for _ in range(4)][1:]
    mem = max(m for _, m in runs) + (torch.cuda.memory_allocated() - base) / 2**20
    report("hand-written CUDA graph", [n / s for s, _ in runs], mem)
    opt = torch.optim.Adam([p for net in nets[1] for p in net.parameters()], lr=1e-3)
    runs = [timed(lambda: handwritten_epoch(*nets[1], opt, x, bs)) for _ in range(4)][1:]
    report("hand-written eager", [len(x) / s for s, _ in runs], max(m for _, m in runs))
    fit_speeds = []

    def record(r):
        if r["epoch"] > 1:
            fit_speeds.append(len(x) / r["seconds"])

    def train():
        pyrovae.fit(vae.model, vae.guide, x, epochs=4, batch_size=bs, lr=1e-3, device=DEV,
                    progress=False, callback=record)  # fmt: skip

    _, mem = timed(train)
    report("pyrovae.fit (CUDA graph)", fit_speeds, mem)
    fit = speed["pyrovae.fit (CUDA graph)"]
    ceiling, eager = speed["hand-written CUDA graph"], speed["hand-written eager"]
    print(f"  fit / hand eager {fit / eager:.3f}; fit / ceiling {fit / ceiling:.3f}; "
          f"ceiling / eager {ceiling / eager:.2f}", flush=True)  # fmt: skip


def main(data_dir: str) -> None:
    pyro.enable_validation(False)
    x = pyrovae.data.load("binarized-mnist", "train", data_dir).images.to(DEV)
    for arch, bs in (("mlp", 100), ("mlp", 256), ("vampprior", 100)):
        run(x, arch, bs)


if __name__ == "__main__":
    main(sys.argv[1])
