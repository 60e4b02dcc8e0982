"""Read demonstration data in the common public shapes into one record type.

Sources: JSON (a list, or one object per line), JSONL (optionally .gz), parquet, or a
`datasets` hub name. Formats, auto-detected from the first record's keys when not given:

    alpaca    {"instruction", "input"?, "output"}
    messages  {"messages": [{"role": system|user|assistant, "content"}, ...]}
    sharegpt  {"conversations": [{"from": system|human|gpt, "value"}, ...]}
    prompt    {"prompt", "response"}

Every problem a user can cause (missing file, bad JSON line, missing field, wrong type, empty
response) raises one `DataError` naming the file, line and field. With `on_error="skip"` such
records are counted per reason and reported instead; nothing is dropped silently.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


class DataError(ValueError):
    """A user-fixable problem with input data; the message names file, line and field."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """One demonstration: messages ending with an assistant turn. `source` is "file:line"."""

    messages: tuple[Message, ...]
    source: str = ""


@dataclass
class LoadReport:
    """What was read and what was skipped (per reason) from one source."""

    kept: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.kept} records"
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return f"{self.kept} records, skipped {sum(self.skipped.values())} ({reasons})"


# ----------------------------------------------------------------------------- raw rows


def iter_rows(path: str, split: str = "train") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line or row number starting at 1, raw dict) from a file or a hub dataset."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        if not p.is_file():
            raise DataError(f"{path}: no such file")
        yield from _iter_json(p)
    elif name.endswith(".parquet"):
        if not p.is_file():
            raise DataError(f"{path}: no such file")
        yield from _iter_datasets("parquet", split, data_files=str(p))
    elif p.exists():
        raise DataError(f"{path}: unsupported file type (expected .json, .jsonl, .jsonl.gz or .parquet)")
    elif "/" in path and not path.startswith((".", "/")) and path.count("/") == 1:
        # looks like a hub id (org/name); datasets resolves it (from its cache when offline)
        yield from _iter_datasets(path, split)
    else:
        raise DataError(f"{path}: no such file (and not a `datasets` hub name of the form org/name)")


def _iter_json(p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # Read with the json module rather than `datasets`, so a bad line is reported by number.
    opener: Callable[..., Any] = gzip.open if p.name.endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None
        yield from enumerate(rows, start=1)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None


def _iter_datasets(name: str, split: str, **kwargs: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, **kwargs)
    except Exception as e:  # datasets raises many types; the user needs the name and the reason
        raise DataError(f"{name}: could not load with `datasets` ({type(e).__name__}: {e})") from None
    yield from enumerate(ds, start=1)


# ----------------------------------------------------------------------------- field helpers


def require_str(row: dict[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def require_list(row: dict[str, Any], key: str, where: str) -> list[Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field '{key}'")
    value = row[key]
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{key}' must be a non-empty list, got {type(value).__name__}")
    return value


def parse_messages(
    items: list[Any], where: str, key: str, role_key: str, text_key: str
) -> tuple[Message, ...]:
    """Turn [{role, content}] (or ShareGPT's [{from, value}]) into Messages with checked roles."""
    roles = SHAREGPT_ROLES if role_key == "from" else {r: r for r in ROLES}
    out = []
    for i, m in enumerate(items):
        at = f"{where}: {key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected an object with '{role_key}' and '{text_key}'")
        role = m.get(role_key)
        if role not in roles:
            raise DataError(f"{at}: field '{role_key}' must be one of {sorted(roles)}, got {role!r}")
        out.append(Message(roles[role], require_str(m, text_key, at, allow_empty=roles[role] != "assistant")))
    return tuple(out)


def check_conversation(messages: tuple[Message, ...], where: str) -> tuple[Message, ...]:
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant turn")
    if messages[-1].role != "assistant":
        raise DataError(
            f"{where}: conversation must end with an assistant turn, ends with '{messages[-1].role}'"
        )
    return messages


# ----------------------------------------------------------------------------- SFT formats


def _alpaca(row: dict[str, Any], where: str) -> tuple[Message, ...]:
    instruction = require_str(row, "instruction", where)
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [Message("user", prompt), Message("assistant", require_str(row, "output", where))]
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.insert(0, Message("system", row["system"]))
    return tuple(messages)


def _messages(row: dict[str, Any], where: str) -> tuple[Message, ...]:
    return check_conversation(
        parse_messages(require_list(row, "messages", where), where, "messages", "role", "content"), where
    )


def _sharegpt(row: dict[str, Any], where: str) -> tuple[Message, ...]:
    items = require_list(row, "conversations", where)
    return check_conversation(parse_messages(items, where, "conversations", "from", "value"), where)


def _prompt_response(row: dict[str, Any], where: str) -> tuple[Message, ...]:
    return (
        Message("user", require_str(row, "prompt", where)),
        Message("assistant", require_str(row, "response", where)),
    )


SFT_FORMATS: dict[str, Callable[[dict[str, Any], str], tuple[Message, ...]]] = {
    "alpaca": _alpaca,
    "messages": _messages,
    "sharegpt": _sharegpt,
    "prompt": _prompt_response,
}

# Key sets that identify a format, checked in order.
_SIGNATURES = [
    ("messages", {"messages"}),
    ("sharegpt", {"conversations"}),
    ("alpaca", {"instruction", "output"}),
    ("prompt", {"prompt", "response"}),
]


def detect_format(row: Any, where: str, known: dict[str, Any]) -> str:
    if isinstance(row, dict):
        for name, keys in _SIGNATURES:
            if name in known and keys <= row.keys():
                return name
    found = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DataError(
        f"{where}: cannot tell the data format from fields {found}; set data.format to one of {sorted(known)}"
    )


def load_records(
    paths: str | list[str],
    fmt: str | None,
    parsers: dict[str, Callable[[dict[str, Any], str], Any]],
    *,
    on_error: str = "raise",
    split: str = "train",
) -> tuple[list[Any], LoadReport]:
    """Parse every row of every path with the parser of `fmt` (auto-detected when None).

    Each parser returns a record or raises DataError; on_error="skip" counts and skips those.
    Returns (records, report). Raises DataError if nothing at all was usable.
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    if fmt is not None and fmt not in parsers:
        raise DataError(f"data.format={fmt!r} is not one of {sorted(parsers)}")
    records: list[Any] = []
    report = LoadReport()
    for path in [paths] if isinstance(paths, str) else list(paths):
        path_fmt = fmt
        for lineno, row in iter_rows(str(path), split):
            where = f"{path}:{lineno}"
            path_fmt = path_fmt or detect_format(row, where, parsers)
            try:
                records.append(parsers[path_fmt](row, where))
            except DataError as e:
                if on_error == "raise":
                    raise
                # the reason without the location, so the counts group by cause
                report.skipped[str(e).split(": ", 1)[-1]] += 1
        if path_fmt is None:
            raise DataError(f"{path}: contains no records")
    report.kept = len(records)
    if report.skipped:
        log.warning("data: %s", report.summary())
    if not records:
        raise DataError(f"{paths}: no usable records ({report.summary()})")
    return records, report


def load_conversations(
    paths: str | list[str], fmt: str | None, *, on_error: str = "raise", split: str = "train"
):
    """SFT demonstrations -> (list[Conversation], LoadReport)."""

    def parse(name: str) -> Callable[[dict[str, Any], str], Conversation]:
        return lambda row, where: Conversation(SFT_FORMATS[name](row, where), where)

    return load_records(
        paths, fmt, {name: parse(name) for name in SFT_FORMATS}, on_error=on_error, split=split
    )


def split_train_eval(records: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded random hold-out of `fraction` of the records (at least one) for evaluation."""
    import random

    if not 0.0 < fraction < 1.0:
        raise DataError(
            f"data.eval_fraction must be between 0 and 1 when no data.eval_path is given, got {fraction}"
        )
    if len(records) < 2:
        raise DataError(f"need at least 2 records to split off an eval set, got {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(records) * fraction)))
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]
