"""Helpers shared by the examples (mnist_bags.py, wsi_abmil.py).

Processes and threads, packed loaders, class weights, the training loop (early stopping, best and
resumable checkpoints, slides or bags per second), and the command-line error wrapper. The
examples import it as ``_common`` (Python puts a script's own folder first on ``sys.path``).
"""

from __future__ import annotations

import copy
import os
import pickle
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

import fastmil


class DataError(Exception):
    """A data problem with a message meant for the user (no traceback)."""


# ------------------------------------------------------------------------------------------------
# Processes and threads
# ------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world: int = 1  # processes on this machine

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_flag: str) -> Dist:
    """One process, or one of the processes torchrun started (WORLD_SIZE > 1): gloo on CPU,
    nccl on GPU."""
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(1, 0, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size())))
    return Dist(dist.get_world_size(), dist.get_rank(), device, local_world)


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def idle_cpus(seconds: float = 0.25) -> float | None:
    """How many CPUs sat idle over the next ``seconds`` (from /proc/stat); None where there is no
    /proc/stat (not Linux)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, all but guest time

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def set_threads(requested: int | None, *, small_steps: bool, local_world: int = 1) -> str:
    """Set PyTorch's intra-op threads and return a line that says how many and why.

    PyTorch starts one thread per core, and on small steps (a few thousand rows) its threads
    wait for each other many times a step: when another process holds one of the cores, every
    wait can last a scheduler time slice, and an epoch of seconds takes minutes. So, unless
    ``requested`` (``--threads``) or ``OMP_NUM_THREADS`` says otherwise: 1 thread for small steps,
    else the CPUs that are idle now, shared among this machine's ``local_world`` processes.
    """
    cpus = usable_cpus()
    if requested:
        n, why = requested, "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    elif small_steps:
        n, why = 1, "small steps: more threads only wait for each other"
    else:
        idle = idle_cpus()
        free = cpus if idle is None else min(cpus, idle)
        n = max(1, int(free / local_world + 0.25))
        why = (f"{cpus} CPUs" if idle is None else f"{free:.1f} of {cpus} CPUs idle") + (
            f", {local_world} processes" if local_world > 1 else "")
    torch.set_num_threads(max(1, n))
    return f"threads: {torch.get_num_threads()} ({why}; --threads N to choose)"


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def make_loader(ds, batch_size, *, shuffle=False, seed=0, world=1, rank=0,
                collate_fn=fastmil.collate, num_workers=0, pin_memory=False):
    """Packed batches of whole bags. Training uses a DistributedSampler even in one process, so
    that one process and N torchrun processes see the same global batches: with
    ``batch_size / world`` bags per rank, step k of all ranks together covers the same bags."""
    sampler = None
    if shuffle:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False,
                      collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory)


def class_weights(labels, n_classes: int = 2, names=("negative", "positive"), *, item="bag",
                  hint="use more bags, or another split") -> torch.Tensor:
    """``[w_0, ..., w_{C-1}]`` with ``w_c = total / (C * count_c)`` (balanced classes), from
    integer (or 0./1.) labels ``[B]``; ``names`` name the classes in the error."""
    labels = torch.as_tensor(labels).long()
    counts = torch.bincount(labels, minlength=n_classes).float()
    if bool((counts == 0).any()):
        missing = int(torch.nonzero(counts == 0)[0, 0])
        raise DataError(f"the training {item}s hold no {names[missing]} {item}: {hint}")
    return len(labels) / (n_classes * counts)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def _rng_state() -> dict:
    """The random states of torch (CPU and every CUDA device), numpy's global generator and
    python's ``random``, as tensors, ints, floats and lists only: what ``torch.load(...,
    weights_only=True)`` reads back."""
    np_state = np.random.get_state(legacy=False)  # MT19937: a uint32 key [624] and 4 numbers
    version, words, gauss_next = random.getstate()  # 3, 625 ints, None or a float
    state = {"torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]),
                       "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])},
             "python": [int(version), [int(w) for w in words],
                        None if gauss_next is None else float(gauss_next)]}
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    """Restore the random states that :func:`_rng_state` returned (tensors on the CPU)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].cpu().numpy().astype(np.uint32), int(n["pos"]),
                         int(n["has_gauss"]), float(n["gauss"])))
    version, words, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(w) for w in words), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_checkpoint(path) -> dict:
    """``torch.load(path, weights_only=True)`` onto the CPU: the file may hold tensors, numbers,
    strings, None and lists / tuples / dicts of them, and nothing else. A file that holds any
    other pickled object (whose unpickling could run code) is refused with a :class:`DataError`
    that names it, as is a file torch cannot read or one that holds no dict."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        text = str(e).strip()
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise DataError(f"{path}: refused: it holds a pickled object ({found.group(1)}), not "
                            f"only tensors and plain values, and loading it could run code "
                            f"(torch.load(weights_only=True) does not); use a checkpoint this "
                            f"example wrote") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)  # e.g. not a torch file
        first = detail.group(1) if detail else (text.splitlines()[0] if text else "no details")
        raise DataError(f"{path}: cannot be read by torch.load(weights_only=True) "
                        f"({type(e).__name__}: {first})") from None
    if not isinstance(saved, dict):
        raise DataError(f"{path}: holds a {type(saved).__name__}, expected a checkpoint dict")
    return saved


RESUME_KEYS = ("model", "optimizer", "epoch", "best", "history", "bad_epochs", "rng")


def load_training_state(path) -> dict:
    """The training state that :func:`fit` writes after every epoch, read by
    :func:`load_checkpoint` (weights_only=True, onto the CPU) and checked for ``RESUME_KEYS``."""
    saved = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in saved]
    if missing:
        raise DataError(f"{path}: not a training state to resume from (no "
                        f"{', '.join(missing)})")
    return saved


def fit(model, opt, loader, train_loss, evaluate=None, *, epochs, patience, ctx: Dist,
        min_epochs=0, checkpoint=None, extra=None, state_path=None, resume=False, progress=True,
        desc="train"):
    """Train ``model`` for up to ``epochs`` epochs and return it with a summary dict.

    ``train_loss(net, batch) -> (loss, bags)``: the mean loss of one local batch and its number
    of bags (``net`` is ``model``, or its DistributedDataParallel wrapper under torchrun).
    ``evaluate(model) -> dict`` with at least ``"loss"`` (the validation loss, the same on every
    rank): with it, early stopping after ``patience`` epochs without a better validation loss
    (never before epoch ``min_epochs``: a warm-up, as CLAM's) restores the best weights and
    saves them to ``checkpoint`` as ``{"model", "epoch", "val_loss", **extra}``; without it the
    last weights are kept (and saved). ``state_path`` (rank 0 writes it after every epoch) holds
    everything needed to go on (``RESUME_KEYS``): with ``resume`` and an existing ``state_path``,
    training continues from there exactly as if never stopped. Both files hold only tensors and
    plain values (the random states too, see :func:`_rng_state`; ``extra`` must be plain as well),
    so that they load with ``torch.load(..., weights_only=True)`` (:func:`load_checkpoint`).
    Every epoch's row in ``summary["history"]`` has the mean training loss, ``train_seconds`` and
    ``bags_per_s`` (all ranks together; validation not counted).
    """
    extra = extra or {}
    net = model
    if ctx.world > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    best = {"val_loss": float("inf"), "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    history, bad_epochs, start = [], 0, 1
    if resume and state_path is not None and Path(state_path).is_file():
        saved = load_training_state(state_path)  # on the CPU: the RNG states must stay there
        model.load_state_dict(saved["model"])  # copied onto the model's device
        opt.load_state_dict(saved["optimizer"])  # its state moved to the parameters' devices
        best, history, bad_epochs = saved["best"], saved["history"], saved["bad_epochs"]
        best["state"] = {k: v.to(ctx.device) for k, v in best["state"].items()}
        start = saved["epoch"] + 1
        _set_rng_state(saved["rng"])
    bar = tqdm(range(start, epochs + 1), desc=desc, leave=False, dynamic_ncols=True,
               disable=not (progress and ctx.main), file=sys.stderr)
    def stop():
        return evaluate is not None and bad_epochs >= patience and len(history) >= min_epochs

    done = bool(history) and stop()
    for epoch in [] if done else bar:
        net.train()
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        total, count = torch.zeros((), device=ctx.device), 0
        for batch in loader:
            loss, bags = train_loss(net, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.detach().float() * bags, count + bags
        sums = torch.stack([total, torch.tensor(float(count), device=ctx.device)])
        if ctx.world > 1:  # the loss and number of bags of all ranks together
            dist.all_reduce(sums)
        total, count = sums.tolist()  # one sync per epoch: the GPU has finished the epoch
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": total / max(count, 1), "train_seconds": seconds,
               "bags_per_s": count / seconds}
        if evaluate is not None:
            m = evaluate(model)
            val_loss = torch.tensor(m["loss"], dtype=torch.float64, device=ctx.device)
            if ctx.world > 1:  # identical on all ranks already; averaging makes it certain
                dist.all_reduce(val_loss)
                val_loss /= ctx.world
            row.update({f"val_{k}": float(v) for k, v in m.items()  # plain floats: the
                        if isinstance(v, (int, float, np.number))})  # state loads safely
            row["val_loss"] = float(val_loss)
            if row["val_loss"] < best["val_loss"]:
                best = {"val_loss": row["val_loss"], "epoch": epoch,
                        "state": copy.deepcopy(model.state_dict())}
                bad_epochs = 0
                if checkpoint is not None and ctx.main:
                    torch.save({"model": best["state"], "epoch": epoch,
                                "val_loss": row["val_loss"], **extra}, checkpoint)
            else:
                bad_epochs += 1
        history.append(row)
        if state_path is not None and ctx.main:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "epoch": epoch, "best": best, "history": history,
                        "bad_epochs": bad_epochs, "rng": _rng_state(), **extra}, state_path)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()
                         if k in ("train_loss", "val_loss", "val_auc")})
        if stop():
            break
    bar.close()
    if evaluate is not None:
        model.load_state_dict(best["state"])
    elif checkpoint is not None and ctx.main:
        torch.save({"model": model.state_dict(), "epoch": len(history), **extra}, checkpoint)
    return model, {"best_epoch": best["epoch"] if evaluate is not None else len(history),
                   "epochs_run": len(history), "best_val_loss": best["val_loss"],
                   "history": history}


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def add_run_flags(group, threads_help: str):
    """--seed, --device, --backend (fastmil's) and --threads, which both examples take."""
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    group.add_argument("--backend", choices=fastmil.functional.BACKENDS, default="auto",
                       help="fastmil backend")
    group.add_argument("--threads", type=int, default=None, help=threads_help)


def check_flags(parser, args, at_least_one: dict, batch_flag: str):
    """The checks both examples make: every value of ``at_least_one`` (flag -> value, None =
    not given) is at least 1, the global batch ``batch_flag`` splits evenly over the torchrun
    processes, and ``--device cuda`` has a GPU. A failure is a usage error (exit code 2)."""
    for flag, value in at_least_one.items():
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = getattr(args, batch_flag[2:].replace("-", "_"))
    if batch % world:
        parser.error(f"{batch_flag} {batch} must be divisible by the number of processes "
                     f"({world}): each takes an equal share of the global batch")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is available; use --device cpu")


def run_cli(prog: str, args, body, *, small_steps: bool):
    """Start the process (or join torchrun's group), choose the CPU threads (``args.threads``,
    see set_threads) and return ``body(ctx, log)``, where ``log`` prints on rank 0 only. A
    DataError or OSError (unwritable output folder, ...) ends the program with ``prog: error:
    message`` instead of a traceback. The process group is closed and PyTorch's thread count
    restored either way."""
    ctx = init_distributed(args.device)
    log = print if ctx.main else (lambda *a, **k: None)
    threads = torch.get_num_threads()
    try:
        try:
            if ctx.device.type == "cpu":
                log(set_threads(args.threads, small_steps=small_steps,
                                local_world=ctx.local_world))
            return body(ctx, log)
        except (DataError, OSError) as e:
            message = str(e).strip()
            if "Original Traceback" in message:  # raised in a DataLoader worker: its last line
                message = message.splitlines()[-1].removeprefix(f"{DataError.__name__}: ")
            raise SystemExit(f"{prog}: error: {message}") from None
    finally:
        if ctx.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
