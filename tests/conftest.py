"""Shared fixtures: paths, the ../shared data root, and running stage commands as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# Cores for one test: all this process may use, or an equal share under pytest-xdist (`make test`
# runs a worker per core), so tests never ask for more threads than there are cores.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
CORES_PER_TEST = max(1, CORES // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
# DeepSpeed keeps a parameter below stage3_param_persistence_threshold (1e5 elements by default) whole on
# every rank: every matrix of the built-in model, whose ZeRO-3 share would read 1.5 with 2 ranks (its
# partition plus the whole). Tests that check the partitioning lower it to 0, as for a large model.
PERSISTENCE = "extra.zero_optimization.stage3_param_persistence_threshold"


def partition_all(*groups: str) -> list[str]:
    """Overrides that partition every parameter of the models of these deepspeed groups."""
    return [f"++{group}.{PERSISTENCE}=0" for group in groups]


PARTITION_ALL = partition_all("deepspeed")[0]  # a stage's own `deepspeed` group


def pytest_configure(config):
    import torch

    torch.set_num_threads(CORES_PER_TEST)  # tests that run models in the pytest process itself


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, files with `slow` tests first: the longest file should not start last
    and leave the other workers idle at the end (the reward e2e file alone takes ~7 minutes).
    `make test` passes --no-loadscope-reorder so that xdist keeps this order."""
    if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
        slow_files = {item.path for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.path not in slow_files)  # stable: file order kept otherwise


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


def stage_env(threads: int = 1) -> dict[str, str]:
    """The environment of a stage subprocess: offline wandb, no launcher leftovers, `threads` per process."""
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
    )
    for var in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "RLHF_RUN_STAMP",
        "HYDRA_FULL_ERROR",
    ):
        env.pop(var, None)
    return env


def run_stage(
    module: str, *overrides: str, launcher: list[str] | None = None, timeout: int = 300, check: bool = True
):
    """Run `python -m module overrides...` (or under a launcher) from the project root."""
    cmd = [*launcher, module] if launcher else [sys.executable, "-m", module]
    # one process may use this test's cores; launched ranks keep one thread each
    threads = 1 if launcher else CORES_PER_TEST
    proc = subprocess.run(
        [*cmd, *overrides], cwd=ROOT, env=stage_env(threads), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def deepspeed_launcher(num_procs: int = 2) -> list[str]:
    return [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(num_procs),
        "--master_port",
        str(free_port()),
        "--module",
    ]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def metric_series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


class StandIn(torch.nn.Module):
    """An engine stand-in around a model (`.module`), with a forward that may mishandle packed rows."""

    def __init__(self, module, forward):
        super().__init__()
        self.module, self._forward = module, forward

    def forward(self, **kwargs):
        return self._forward(**kwargs)
