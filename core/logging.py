"""One metrics logger for every stage: metrics.jsonl always, plus wandb or tensorboard.

Only rank 0 writes. wandb gets the resolved config (secrets redacted) and runs online when
there are credentials and a network, else offline with a one-line notice (sync later with
`wandb sync <run dir>/wandb/offline-run-*`).
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from core import dist
from core.config import LOGGER_BACKENDS, LOGGER_MODES

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
# a key with one of these words in it (api_key, WANDB_API_KEY, auth), or a word ending in one of the
# suffixes (hub_token, hfToken, hftoken, wandbapikey, db_password; not tokenizer, tokens or monkey)
_SECRET_WORDS = {"key", "auth", "bearer"}
_SECRET_SUFFIXES = (
    "apikey",
    "token",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "credential",
    "credentials",
)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s]*@")  # https://user:p@ss@host/x -> https://***@host/x
# keys that look secret and are not: Comet's id of an experiment to continue (DeepSpeed's `comet`)
_NOT_SECRET = {"experiment_key"}


def is_secret_key(key: Any) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key))  # camelCase -> camel_Case
    parts = re.split(r"[^a-z0-9]+", words.lower())
    return not _SECRET_WORDS.isdisjoint(parts) or any(w.endswith(_SECRET_SUFFIXES) for w in parts)


def find_secret(node: Any, prefix: str = "") -> str | None:
    """The dotted path of the first string under a secret-looking key in a nested config, or None."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str) and is_secret_key(k) and k not in _NOT_SECRET:
                return f"{prefix}{k}"
            if found := find_secret(v, f"{prefix}{k}."):
                return found
    if isinstance(node, list):
        for i, v in enumerate(node):
            if found := find_secret(v, f"{prefix}{i}."):
                return found
    return None


def secret_override(argv: list[str]) -> str | None:
    """The key of the first command-line override that sets a secret-looking key (`a.api_key=...`), or
    None. Checked before Hydra starts: it saves the command line in the run's `.hydra/` directory."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        nested: Any = value
        for part in reversed(key.lstrip("+~").split(".")):
            nested = {part: nested}
        if found := find_secret(nested):
            return found
    return None


def redact_secrets(value: Any) -> Any:
    """A copy of a (nested) config with the string values of secret-looking keys replaced, and the
    credentials of any URL in a string."""
    if isinstance(value, dict):
        return {
            k: "***" if is_secret_key(k) and isinstance(v, str) else redact_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub("***@", value)
    return value


def wandb_mode(requested: str) -> tuple[str, str | None]:
    """(mode, notice): auto picks online only with credentials and a reachable server."""
    if requested not in LOGGER_MODES:
        raise ValueError(f"logger.mode must be {'|'.join(LOGGER_MODES)}, got {requested!r}")
    env = os.environ.get("WANDB_MODE")
    if requested != "auto":
        return requested, None
    if env:
        return env, None
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(host):
        return "offline", "wandb: no credentials (WANDB_API_KEY or `wandb login`); logging offline"
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=3).close()
    except OSError:
        return "offline", f"wandb: {host} unreachable; logging offline"
    return "online", None


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc().authenticators(host.split(":")[0]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class MetricsLogger:
    """Writes metrics rows to <run dir>/metrics.jsonl and the chosen backend, on rank 0 only."""

    def __init__(
        self,
        run_dir: Path,
        *,
        backend: str,
        config: dict[str, Any],
        project: str,
        entity: str | None,
        group: str | None,
        name: str | None,
        mode: str,
        job_type: str | None,
        tags: list[str],
        total_steps: int,
    ):
        if backend not in LOGGER_BACKENDS:
            raise ValueError(f"logger.backend must be {'|'.join(LOGGER_BACKENDS)}, got {backend!r}")
        self.enabled = dist.is_main()
        self.run_dir = run_dir
        self.wandb = self.tb = None
        self.progress = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        config = redact_secrets(config)
        log.info("config:\n%s", json.dumps(config, indent=2, default=str))
        if backend == "wandb":
            import wandb

            resolved_mode, notice = wandb_mode(mode)
            if notice:
                log.warning(notice)
            self.wandb = wandb.init(
                project=project,
                entity=entity,
                group=group,
                name=name or run_dir.name,
                job_type=job_type,
                tags=list(tags),
                config=config,
                dir=str(run_dir),
                mode=resolved_mode,
                reinit="finish_previous",
            )
        elif backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.progress = tqdm(
            total=total_steps,
            desc=job_type or "train",
            dynamic_ncols=True,
            mininterval=1 if sys.stderr.isatty() else 30,
        )

    @classmethod
    def from_group(
        cls, run_dir: Path, logger_cfg, config: dict[str, Any], total_steps: int, job_type: str
    ) -> MetricsLogger:
        """From a stage's `logger` group; `job_type` applies when the group leaves it null."""
        return cls(
            run_dir, backend=logger_cfg.backend, config=config, project=logger_cfg.project, entity=logger_cfg.entity,
            group=logger_cfg.group, name=logger_cfg.name, mode=logger_cfg.mode, job_type=logger_cfg.job_type or job_type,
            tags=list(logger_cfg.tags), total_steps=total_steps,
        )  # fmt: skip

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
        if self.progress is not None and "train/loss" in metrics:
            self.progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)

    def rewind(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run replays them), so the files read as one run; at step
        0 (no checkpoint: the run starts over) every row."""
        if not self.enabled:
            return
        self._metrics.close()
        for name in (METRICS_FILE, SAMPLES_FILE):
            path = self.run_dir / name
            if path.is_file():
                keep = step if step > 0 else -1
                rows = [r for r in path.read_text(encoding="utf-8").splitlines() if _step(r, path) <= keep]
                tmp = path.with_name(f".{name}.tmp")
                tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
                os.replace(tmp, path)
        self._metrics = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        if self.progress is not None:
            self.progress.update(step - self.progress.n)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(step - self.progress.n)  # honours mininterval (quiet in non-TTY logs)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """Sample generations: appended to samples.jsonl, and a wandb table."""
        if not self.enabled or not rows:
            return
        with open(self.run_dir / SAMPLES_FILE, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        for row in rows[:3]:
            log.info("sample @%d: %r -> %r", step, row.get("prompt", "")[-80:], row.get("response", "")[:160])
        if self.wandb is not None:
            import wandb

            columns = list(rows[0])
            self.wandb.log(
                {"samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])},
                step=step,
            )
        if self.tb is not None:
            self.tb.add_text(
                "samples", "\n\n".join(f"{r.get('prompt', '')} → {r.get('response', '')}" for r in rows), step
            )

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.close()
        self._metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _step(row: str, path: Path) -> float:
    """A log row's step; a row a crash cut short (or a blank line) reads as after every step: dropped."""
    try:
        return json.loads(row)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        if row.strip():
            log.warning("%s: dropping a row that does not parse (cut short by a crash?): %.80s", path, row)
        return math.inf
