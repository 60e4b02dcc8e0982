"""Process-group set-up shared by every stage: launcher arguments, ranks, one run stamp per run.

Works the same under `python -m sft`, `deepspeed --num_gpus N --module sft` and `torchrun`.
The launchers export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; the deepspeed
launcher also appends `--local_rank=N` to argv, which Hydra's parser would reject, so it is
stripped before Hydra sees the command line.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import os
import platform
import socket
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as torch_dist
from omegaconf import OmegaConf

RUN_STAMP_ENV = "RLHF_RUN_STAMP"

# glibc's mallopt parameters (<malloc.h>), the largest mmap threshold it takes on 64-bit, and a
# trim threshold (an int, at most 2 GiB) that in practice never trims
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX, TRIM_THRESHOLD_OFF = 32 * 1024 * 1024, 2**31 - 1


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return (
        torch_dist.get_world_size() if torch_dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    )


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def device() -> torch.device:
    """The accelerator this rank drives: cuda:LOCAL_RANK with GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init_process_group() -> None:
    """Join the launcher's process group, or form a group of one for a plain `python -m`.

    NCCL with GPUs, gloo on CPU. DeepSpeed later finds the group already initialised and
    reuses it (without a group it would try MPI discovery), so the whole run has one group.
    """
    if torch_dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:  # not started by a launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    torch_dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=30))


def shutdown() -> None:
    """Leave the process group before the interpreter exits.

    A gloo group still alive at exit can abort a rank ("terminate called without an active
    exception") after its work is done, failing the launcher; every stage calls this last.
    """
    if torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def keep_freed_cpu_memory(enabled: bool) -> bool:
    """On the CPU, let glibc's malloc keep memory a step frees for the next step (`train.keep_freed_memory`).

    A training step on the CPU allocates and frees the same activations and gradients every
    time, many of them megabytes. glibc serves blocks above its mmap threshold (128 KiB at first,
    raised as such blocks are freed) with a fresh mmap, unmaps them on free, and trims free
    memory at the top of its heap back to the OS, so every step faults the same pages in (and
    the kernel zeroes them) again. With the threshold at glibc's 64-bit maximum (32 MiB) and
    trimming off, freed blocks are reused instead. On the `small` PPO benchmark: minor page
    faults per step 36k -> 3k, step 5.4 -> 5.1 s (README, "PPO speed"). The price: memory
    freed during the run stays with the process, whose resident size stays at its peak.

    Only on the CPU (a GPU run's tensors live on the device), only with glibc, and not when the
    user set glibc's own malloc settings (any `MALLOC_*` or `GLIBC_TUNABLES`): theirs win.
    Returns whether it applied.
    """
    if not enabled or device().type != "cpu" or platform.libc_ver()[0] != "glibc":
        return False
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)  # 0 for a value it refuses
    return bool(mmap_set and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_OFF))


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_launcher_args(argv: Sequence[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local-rank N` that the deepspeed launcher and torch.distributed.launch add.

    LOCAL_RANK is also in the environment, which is what the code reads.
    """
    out: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip_next = True
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        out.append(arg)
    return out


def shared_run_stamp() -> _dt.datetime:
    """One timestamp for the whole run, the same on every rank.

    Hydra's `${now:...}` is resolved separately in each process, so two ranks started a second
    apart would write into two run directories. Rank 0's clock is broadcast instead and exposed
    as the `${run_now:...}` resolver, which the stage configs use for `hydra.run.dir`.
    """
    if RUN_STAMP_ENV in os.environ:  # set by a parent (e.g. the pipeline) or an earlier call
        return _dt.datetime.fromisoformat(os.environ[RUN_STAMP_ENV])
    stamp = [_dt.datetime.now().isoformat(timespec="microseconds")]
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.broadcast_object_list(stamp, src=0)
    os.environ[RUN_STAMP_ENV] = stamp[0]
    return _dt.datetime.fromisoformat(stamp[0])


def prepare_hydra_argv() -> None:
    """Make `sys.argv` and the process ready for a Hydra entry point on any launcher.

    - strips the launcher's `--local_rank` argument;
    - refuses a secret on the command line, which Hydra would save;
    - joins the process group and agrees on one run stamp (`${run_now:...}`);
    - on ranks other than 0, tells Hydra not to write `.hydra/` configs or a log file, so only
      rank 0 writes into the shared run directory.
    """
    from core.cli import refuse_secret_overrides

    sys.argv = strip_launcher_args(sys.argv)
    refuse_secret_overrides(sys.argv[1:])  # before anything is written or any rank waits for another
    init_process_group()
    stamp = shared_run_stamp()
    OmegaConf.register_new_resolver("run_now", lambda pattern: stamp.strftime(pattern), replace=True)
    if rank() != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=rank_nonzero"]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over ranks in one collective (a sync point: call once per step, not per tensor)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    if not (torch_dist.is_initialized() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out
