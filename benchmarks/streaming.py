"""Training from an image folder streamed through DataLoader workers: the loader's images/s
beside training's, and the peak memory of a streamed run on a folder that decodes to several
times what the run keeps resident::

    python benchmarks/streaming.py --data-dir ../shared/data [--n 20000] [--workers 0 1 2]
    python benchmarks/streaming.py --data-dir ../shared/data --memory [--image-size 112]

The folder is the first ``--n`` Fashion-MNIST training images written as 8-bit PNGs in class
subfolders (:func:`pyrovae.data.write_folder`); its "train" split is pyrovae's seeded 80 %.

Throughput (one process, torch on one thread, rounds interleaved, medians): a full pass of a
``DataLoader`` over :class:`pyrovae.data.FolderDataset` alone (decoding PNGs), then ``fit``'s
second epoch of the 784-400-50 MLP (discretized Gaussian likelihood) fed by that loader, and the
share of that epoch the training loop waited for batches (``History.data_seconds``); the last
row is the same epoch from device-resident tensors, the speed without a loader.

Memory (``--memory``): each mode trains one epoch in a child process whose peak PSS
(proportional set size, summed over it and its DataLoader workers, sampled every 0.2 s) is
reported beside the size of the split decoded as float32: "streamed" reads the folder through
the loader, "resident" decodes the split into memory first (``pyrovae.data.load``). For this
table the folder holds the images upscaled to RGB ``--image-size``² PNGs, so that the decoded
split is large.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import pyrovae
from pyrovae.data import FolderDataset, write_folder


def make_folder(data_dir: str, n: int, root: Path, size: int | None = None) -> Path:
    """The first ``n`` Fashion-MNIST training images as PNGs, ``root/CLASS/*.png`` (kept for
    later runs); with ``size``, upscaled (bilinear) to RGB ``size``×``size`` images."""
    if root.is_dir():
        return root
    fm = pyrovae.data.load("fashion-mnist", "train", root=data_dir)
    for start in range(0, n, 1000):  # in chunks: upscaled, the images take gigabytes
        x = fm.images[start : min(start + 1000, n)]  # (B, 1, 28, 28)
        if size is not None:
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear").repeat(1, 3, 1, 1)
        write_folder(x.clamp(0, 1), fm.labels[start : start + len(x)], None, root / "tmp")
        for png in sorted((root / "tmp").rglob("*.png")):  # numbered from the chunk's start
            dest = root / png.parent.name / f"{start + int(png.stem):06}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            png.rename(dest)
    for folder in sorted((root / "tmp").glob("*"), reverse=True):
        folder.rmdir()
    (root / "tmp").rmdir()
    return root


def loader(root: Path, workers: int, batch_size: int, **options) -> torch.utils.data.DataLoader:
    ds = FolderDataset(root, "train", **options)
    return torch.utils.data.DataLoader(ds, batch_size, shuffle=True, num_workers=workers)


def loader_rate(root: Path, workers: int, batch_size: int) -> float:
    """Images per second of one pass of the loader alone."""
    data = loader(root, workers, batch_size)
    start, n = time.perf_counter(), 0
    for batch in data:
        n += len(batch)
    return n / (time.perf_counter() - start)


def train_rate(data, x_shape, batch_size: int) -> tuple[float, float | None]:
    """Images per second of fit's second epoch (the first captures the step), and the share of
    it spent waiting for batches (None for resident data)."""
    cfg = pyrovae.Config(x_shape=x_shape, hidden=(400,), z_dim=50,
                         likelihood="discretized-gaussian")  # fmt: skip
    vae = pyrovae.build_vae(cfg)
    history = pyrovae.fit(vae.model, vae.guide, data, epochs=2, batch_size=batch_size,
                          device="cpu", seed=0, progress=False)  # fmt: skip
    n = len(data.dataset) if isinstance(data, torch.utils.data.DataLoader) else len(data)
    seconds, waited = (
        history.seconds[-1],
        history.data_seconds[-1] if history.data_seconds else None,
    )
    return n / seconds, None if waited is None else waited / seconds


def throughput(root: Path, workers: list[int], rounds: int, batch_size: int) -> None:
    resident = pyrovae.data.load("folder", "train", root)
    rows: dict[str, dict[str, list]] = {str(w): {"loader": [], "train": [], "wait": []}
                                        for w in workers}  # fmt: skip
    rows["resident"] = {"loader": [], "train": [], "wait": []}
    for _ in range(rounds):  # interleaved: every configuration once per round
        for w in workers:
            row = rows[str(w)]
            row["loader"].append(loader_rate(root, w, batch_size))
            rate, wait = train_rate(loader(root, w, batch_size), resident.x_shape, batch_size)
            row["train"].append(rate)
            row["wait"].append(wait)
        rows["resident"]["train"].append(train_rate(resident, resident.x_shape, batch_size)[0])
    print(f"\n{len(resident)} training images {resident.x_shape}, batch {batch_size}, "
          f"medians of {rounds} rounds, torch threads {torch.get_num_threads()}")  # fmt: skip
    print("| workers | loader alone, img/s | training, img/s | waiting for data |")
    print("|---|---:|---:|---:|")
    for name, row in rows.items():
        alone = f"{statistics.median(row['loader']):,.0f}" if row["loader"] else "—"
        wait = f"{100 * statistics.median(row['wait']):.1f} %" if row["wait"] else "—"
        print(f"| {name} | {alone} | {statistics.median(row['train']):,.0f} | {wait} |")


def child(mode: str, root: Path, workers: int, batch_size: int) -> None:
    """One epoch of a small MLP on the upscaled RGB folder, streamed or resident."""
    if mode == "streamed":
        data = loader(root, workers, batch_size)
        x_shape, n = data.dataset.x_shape, len(data.dataset)
    else:
        data = pyrovae.data.load("folder", "train", root)
        x_shape, n = data.x_shape, len(data)
    cfg = pyrovae.Config(x_shape=x_shape, hidden=(64,), z_dim=16, likelihood="discretized-gaussian")
    vae = pyrovae.build_vae(cfg)
    pyrovae.fit(vae.model, vae.guide, data, epochs=1, batch_size=batch_size, device="cpu",
                seed=0, progress=False)  # fmt: skip
    print(json.dumps({"n": n, "decoded_bytes": n * 4 * int(torch.tensor(x_shape).prod())}))


def _tree(pid: int) -> list[int]:
    pids, out = [pid], []
    while pids:
        p = pids.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _pss_bytes(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass  # a worker that just ended
    return total


def peak_memory(mode: str, args, root: Path) -> tuple[int, dict]:
    cmd = [sys.executable, __file__, "--child", mode, "--folder", str(root),
           "--workers", str(max(args.workers)), "--batch-size", str(args.batch_size)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _pss_bytes(proc.pid))
        time.sleep(0.2)  # reading smaps_rollup is not free
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{mode} run failed ({proc.returncode})")
    return peak, json.loads(out.strip().splitlines()[-1])


def memory(args, root: Path) -> None:
    print(f"\none epoch, Fashion-MNIST upscaled to RGB {args.image_size}×{args.image_size}, "
          f"{max(args.workers)} workers when streamed")  # fmt: skip
    print("| mode | training images | split decoded (float32) | peak PSS | decoded / peak |")
    print("|---|---:|---:|---:|---:|")
    for mode in args.modes:
        peak, info = peak_memory(mode, args, root)
        gb = info["decoded_bytes"] / 2**30
        print(f"| {mode} | {info['n']:,} | {gb:.2f} GiB | {peak / 2**30:.2f} GiB | "
              f"{info['decoded_bytes'] / peak:.1f}× |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder with Fashion-MNIST's IDX files")
    p.add_argument("--n", type=int, default=20000, help="images written to the folder")
    p.add_argument("--folder", default=None, help="reuse (or write) the PNG folder here")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--memory", action="store_true", help="the peak-memory table instead")
    p.add_argument("--image-size", type=int, default=112, help="--memory: write S×S RGB images")
    modes = ["streamed", "resident"]
    p.add_argument("--modes", nargs="+", choices=modes, default=modes, help="--memory: the runs")
    p.add_argument("--child", choices=["streamed", "resident"], help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.child:
        return child(args.child, Path(args.folder), max(args.workers), args.batch_size)
    size = args.image_size if args.memory else None
    name = f"pyrovae-fmnist-png-{args.n}" + (f"-rgb{size}" if size else "")
    root = make_folder(
        args.data_dir, args.n, Path(args.folder or Path(tempfile.gettempdir()) / name), size
    )
    if args.memory:
        memory(args, root)
    else:
        throughput(root, args.workers, args.rounds, args.batch_size)


if __name__ == "__main__":
    main()
