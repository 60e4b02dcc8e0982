"""The `rlhf` command.

rlhf pipeline [key=value ...]     SFT -> reward -> PPO -> gold evaluation -> report (conf/pipeline.yaml)
rlhf evaluate POLICY_DIR [...]    the gold evaluation of one export (rlhf evaluate -h)
rlhf sft|reward|ppo [key=value]   one stage, the same as python -m <stage>
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

COMMANDS = ("pipeline", "evaluate", "sft", "reward", "ppo")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write(__doc__.lstrip("\n").split("\n\n", 1)[1])
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "pipeline":
        from core import pipeline

        pipeline.cli(rest)
    elif command == "evaluate":
        # its JSON goes to stdout: library notices printed at import (DeepSpeed's accelerator line) go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            from core import evaluate
        evaluate.cli(rest)
    else:  # a stage: its own entry point, in this process
        os.execv(sys.executable, [sys.executable, "-m", command, *rest])


def refuse_secret_overrides(argv: list[str]) -> None:
    """Stop before Hydra saves the command line (`.hydra/overrides.yaml`, wandb's run record) when it
    sets a secret-looking key; secrets come from the environment (WANDB_API_KEY, HF_TOKEN)."""
    from core.logging import secret_override

    if key := secret_override(argv):
        sys.stderr.write(
            f"{key}: no secret goes on the command line, which the run saves in its directory; give it "
            f"through the environment\n"
        )
        raise SystemExit(2)


@contextlib.contextmanager
def reported(command: str) -> Iterator[None]:
    """A command's body, where a setting the user can fix (a ConfigError, ModelError or DataError: a
    value out of range, a missing export, a malformed data line) ends the command with its message and
    exit status 2 instead of a traceback that hides the message at its bottom. On every rank, in the
    run's log file too. HYDRA_FULL_ERROR=1 keeps the traceback, as for Hydra's own errors. In a sweep
    (`-m`) the error is logged and raised on, so Hydra goes on with the other jobs and reports it at
    the end, as it does for any failing job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from core.config import ConfigError
    from core.models import ModelError
    from data.formats import DataError

    try:
        yield
    except (ConfigError, ModelError, DataError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        logging.getLogger(command).error("%s\n(HYDRA_FULL_ERROR=1 shows where it was raised)", e)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
