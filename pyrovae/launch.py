"""Several processes for one command: the CLI's ``--devices``, ``--num-nodes``, ``--accelerator``,
``--strategy`` and ``--precision``, checked before any process is spawned, and Lightning's
launchers to start them.

With ``--devices N`` on one machine, Lightning starts N − 1 more processes running the same
command line, each told its rank in its environment (``LOCAL_RANK``, ``NODE_RANK``); under
``torchrun`` or SLURM every process is started by the cluster's launcher and reads its rank the
same way. Rank 0 holds the run's lock and writes its files; the other ranks compute only.

``lightning`` is imported only when several processes are asked for.
"""

from __future__ import annotations

import argparse
import os
import threading

__all__ = [
    "ACCELERATORS",
    "STRATEGIES",
    "PRECISIONS",
    "LOGGERS",
    "ENGINES",
    "add_launch_args",
    "distributed",
    "launched_rank",
    "check_launch",
    "start",
    "trainer_args",
    "quiet_lightning",
    "dead_ranks",
    "rank_failure",
]

#: ``--accelerator`` values, as Lightning names them.
ACCELERATORS = ("auto", "cpu", "gpu")
#: ``--strategy`` values: DistributedDataParallel only (``nn.DataParallel`` breaks Pyro's plates).
STRATEGIES = ("auto", "ddp")
#: ``--engine`` values: what trains a run.
ENGINES = ("auto", "fit", "lightning")
#: ``--logger`` values: metrics.csv always; TensorBoard through Lightning's logger.
LOGGERS = ("none", "tensorboard")
#: ``--precision`` values, and the accelerators each runs on.
PRECISIONS = {"32": ("cpu", "gpu"), "bf16-mixed": ("cpu", "gpu"), "16-mixed": ("gpu",)}


def add_launch_args(parser: argparse.ArgumentParser, train: bool) -> None:
    """Add the launch options to a subcommand's parser (``train`` adds strategy and precision)."""
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="processes per node, one device each (>1: Lightning's DDP)",
    )
    parser.add_argument(
        "--num-nodes",
        type=int,
        default=1,
        help="machines, each running --devices processes (torchrun, SLURM)",
    )
    parser.add_argument(
        "--accelerator",
        choices=ACCELERATORS,
        default="auto",
        help="device kind of each process with --devices (auto: gpu if any)",
    )
    if train:
        parser.add_argument(
            "--engine",
            choices=ENGINES,
            default="auto",
            help="auto: pyrovae's own (fit) on one device, Lightning when an option below needs it",
        )
        parser.add_argument(
            "--strategy",
            choices=STRATEGIES,
            default="auto",
            help="how processes share the work (auto: ddp for several)",
        )
        parser.add_argument(
            "--precision",
            choices=list(PRECISIONS),
            default="32",
            help="Lightning's precision (runs on the Lightning engine)",
        )
        parser.add_argument(
            "--logger",
            choices=LOGGERS,
            default="none",
            help="also log to TensorBoard (in RUN/tensorboard; the Lightning "
            "engine, on any number of devices)",
        )
        parser.add_argument(
            "--log-images-every",
            type=int,
            default=5,
            metavar="N",
            help="with --logger: image grids every N epochs (0: none)",
        )


def distributed(args) -> bool:
    """Whether the command runs on the Lightning engine: several processes, or an option only
    Lightning has (a strategy, a precision, a logger)."""
    engine = getattr(args, "engine", "auto")
    if engine != "auto":
        return engine == "lightning"
    return (
        args.devices != 1
        or args.num_nodes != 1
        or getattr(args, "strategy", "auto") != "auto"
        or getattr(args, "logger", "none") != "none"
        or getattr(args, "precision", "32") != "32"
    )


def launched_rank() -> int:
    """This process's global rank if a launcher started it (0 for the process a user ran)."""
    if "RANK" in os.environ:  # torchrun, or Lightning's own children once set up
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in os.environ:  # srun
        return int(os.environ["SLURM_PROCID"])
    local, node = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("NODE_RANK", 0))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or max(local + 1, 1)
    return node * per_node + local


def _accelerator(name: str) -> str:
    import torch

    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return name


def check_launch(args) -> None:
    """Refuse what cannot run, naming the option, before any process starts.

    :raises ValueError: for a device count that does not exist, an accelerator without devices,
        a precision the accelerator cannot run, or Lightning not installed.
    """
    import torch

    if getattr(args, "engine", "auto") == "fit" and (
        args.devices != 1
        or args.num_nodes != 1
        or args.strategy != "auto"
        or args.logger != "none"
        or args.precision != "32"
    ):
        raise ValueError(
            "--engine fit trains on one device: --devices, --num-nodes, "
            "--strategy, --precision and --logger need --engine lightning"
        )
    if getattr(args, "engine", "auto") == "fit":
        return
    for flag in ("devices", "num_nodes"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    accelerator = _accelerator(args.accelerator)
    if accelerator == "gpu":
        have = torch.cuda.device_count()
        if have == 0:
            raise ValueError("--accelerator gpu: this machine has no CUDA device")
        if args.devices > have:
            raise ValueError(f"--devices {args.devices}: this machine has {have} CUDA device(s)")
    elif args.devices > (os.cpu_count() or 1):
        raise ValueError(
            f"--devices {args.devices}: this machine has {os.cpu_count()} CPU cores, one "
            "process per core at most"
        )
    precision = getattr(args, "precision", "32")
    if accelerator not in PRECISIONS[precision]:
        raise ValueError(f"--precision {precision} needs a GPU (--accelerator {accelerator})")
    if getattr(args, "log_images_every", 0) < 0:
        raise ValueError(f"--log-images-every must be >= 0, got {args.log_images_every}")
    needs = {"lightning": "lightning"}
    if getattr(args, "logger", "none") == "tensorboard":
        needs["tensorboard"] = "--logger tensorboard"
    for module, what in needs.items():
        try:
            __import__(module)
        except ImportError:
            raise ValueError(
                f"{'--devices/--num-nodes/--strategy/--precision' if what == 'lightning' else what}"
                f' need {module}, which is not installed: pip install "pyrovae[lightning]"'
            ) from None


def quiet_lightning() -> None:
    """Hide a warning Lightning's internals raise with this torch (nothing the user can act on)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


def trainer_args(args) -> dict:
    """The :class:`lightning.Trainer` arguments the options ask for."""
    return {
        "accelerator": _accelerator(args.accelerator),
        "devices": args.devices,
        "num_nodes": args.num_nodes,
        "strategy": "ddp"
        if args.devices * args.num_nodes > 1 or getattr(args, "strategy", "auto") == "ddp"
        else "auto",
        "precision": getattr(args, "precision", "32"),
    }


def start(args):
    """Start the processes (this one becomes rank 0, or is the rank a launcher started) and set
    up ``torch.distributed`` in each; returns the :class:`lightning.fabric.Fabric`.

    :param args: parsed options with ``devices``, ``num_nodes`` and ``accelerator``.
    """
    from lightning.fabric import Fabric

    quiet_lightning()

    options = trainer_args(args)
    options.pop("precision")
    fabric = Fabric(**options)
    fabric.launch()
    return fabric


def dead_ranks() -> list[tuple[int, int, int]]:
    """The ranks started by Lightning's launcher in this process that ended with an error:
    ``(rank, pid, exit code)`` (a negative code: killed by that signal).

    Lightning's child-process observer would kill this process within seconds of a child's
    death, before it could say why; it is stopped here, since the caller reports the failure.
    """
    for thread in threading.enumerate():
        if thread.name == "child-process-observer" and hasattr(thread, "_child_processes"):
            thread._run = lambda: True  # ends its loop at its next check, killing nothing
            procs = thread._child_processes
            codes = [(i + 1, p.pid, p.poll()) for i, p in enumerate(procs)]
            return [(rank, pid, code) for rank, pid, code in codes if code not in (None, 0)]
    return []


def _looks_distributed(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return any(w in text for w in ("gloo", "NCCL", "DistBackendError", "Connection closed by peer",
                                   "Connection reset by peer", "ProcessGroup"))  # fmt: skip


def _how(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def rank_failure(e: BaseException, run_dir: str | None) -> str | None:
    """One line for a failure of the processes of a several-process command: which rank died and
    how the run continues; ``None`` if ``e`` is not one.

    :param run_dir: the run directory (for the resume command), if the command has one.
    """
    dead = dead_ranks()
    if not dead and not _looks_distributed(e):
        return None
    resume = f"pyrovae resume {run_dir}" if run_dir else "pyrovae resume RUN_DIR"
    if dead:
        who = ", ".join(f"rank {rank} (pid {pid}, {_how(code)})" for rank, pid, code in dead)
        what = f"{who} ended, so the processes stopped together"
    else:
        what = "another rank stopped (a collective operation failed), so this one stopped too"
    return (
        f"{what}; the run keeps its last saved epoch: continue with `{resume}` and the same "
        "launch options"
    )
