"""Read demonstration data in the common public shapes into one record type.

Sources: JSON (a list, or one object per line), JSONL (optionally .gz), parquet, or a
`datasets` hub name. Formats, auto-detected from the first record's keys when not given:

    alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[query, response], ...]}
    messages  {"messages": [{"role": system|user|assistant, "content"}, ...]}
    sharegpt  {"conversations": [{"from": system|human|gpt, "value"}, ...]}
    prompt    {"prompt", "response"}, or TRL's prompt-completion {"prompt", "completion"}; either
              part a string or a message list

A record with `"label": false` (unpaired preference data, as for KTO) is an undesirable reply, so it
is a bad record for SFT, not a demonstration.

Every problem a user can cause (missing file, bad JSON line, missing field, wrong type, empty
response) raises one `DataError` naming the file, line and field. With `on_error="skip"` such
records are counted per reason and reported instead; nothing is dropped silently.
"""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import logging
import os
import re
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


class MalformedLine(DataError):
    """A JSON Lines line that does not parse: `iter_rows` yields it in place of the row, so that a
    reader may skip it (`data.on_error=skip`) and go on with the next line."""


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


def iter_rows(path: str, split: str = "train") -> Iterator[tuple[int, dict[str, Any] | MalformedLine]]:
    """Yield (line or row number starting at 1, raw dict) from a file or a hub dataset.

    A JSON Lines line that does not parse comes as a `MalformedLine` instead of a dict (raise it or
    skip it); a whole JSON array (`.json` only) that does not parse raises at once.
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        if not p.is_file():
            raise DataError(f"{path}: no such file")
        yield from _iter_json(p)
    elif name.endswith(".parquet"):
        if not p.is_file():
            raise DataError(f"{path}: no such file")
        # a local file is one split, which `datasets` names "train"; data.split names a hub dataset's
        yield from _iter_datasets("parquet", "train", data_files=str(p))
    elif p.exists():
        raise DataError(f"{path}: unsupported file type (expected .json, .jsonl, .jsonl.gz or .parquet)")
    elif "/" in path and not path.startswith((".", "/")) and path.count("/") == 1:
        # looks like a hub id (org/name); datasets resolves it (from its cache when offline)
        yield from _iter_datasets(path, split)
    else:
        raise DataError(f"{path}: no such file (and not a `datasets` hub name of the form org/name)")


def _iter_json(p: Path) -> Iterator[tuple[int, dict[str, Any] | MalformedLine]]:
    # Read with the json module rather than `datasets`, so a bad line is reported by number.
    opener: Callable[..., Any] = gzip.open if p.name.lower().endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not text
        text = f.read()
    array = text.lstrip().startswith("[")
    name = p.name.lower()
    if array and name.endswith((".jsonl", ".jsonl.gz")):  # a mistake about the whole file
        stem = p.name[: name.rindex(".jsonl")]
        raise DataError(
            f"{p}: starts with '[', a JSON array? A .jsonl file holds one JSON object per line; "
            f"name an array file {stem}.json{'.gz' if name.endswith('.gz') else ''}"
        )
    if array:  # a .json file holds one array or JSON Lines
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None
        yield from enumerate(rows, start=1)
        return
    # JSON Lines are separated by "\n" only: str.splitlines() would also cut at characters JSON
    # strings may hold raw (U+0085, U+2028, U+2029, form feed; IMDB reviews have them)
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = MalformedLine(f"{p}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})")
        yield lineno, row


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
    items: list[Any], where: str, key: str, role_key: str, text_key: str, *, allow_empty_replies: bool = False
) -> tuple[Message, ...]:
    """Turn [{role, content}] (or ShareGPT's [{from, value}]) into Messages with checked roles.

    An assistant message must have text unless `allow_empty_replies` (a preference reply, which the
    pair then counts and skips as empty)."""
    roles = SHAREGPT_ROLES if role_key == "from" else {r: r for r in ROLES}
    out = []
    for i, m in enumerate(items):
        at = f"{where}: {key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected an object with '{role_key}' and '{text_key}'")
        role = m.get(role_key)
        if role not in roles:
            raise DataError(f"{at}: field '{role_key}' must be one of {sorted(roles)}, got {role!r}")
        empty_ok = allow_empty_replies or roles[role] != "assistant"
        out.append(Message(roles[role], require_str(m, text_key, at, allow_empty=empty_ok)))
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
    history = row.get("history") or []  # LLaMA-Factory's earlier turns, oldest first
    if not isinstance(history, list) or not all(
        isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history
    ):
        raise DataError(f"{where}: field 'history' must be a list of [query, response] string pairs")
    messages[:0] = [Message(role, text) for query, reply in history
                    for role, text in (("user", query), ("assistant", reply))]  # fmt: skip
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
    """{"prompt", "response"} or TRL's {"prompt", "completion"}: the prompt a string or messages
    ending with a user turn, the reply a string or an assistant message (list)."""
    key = "completion" if "completion" in row and "response" not in row else "response"
    if isinstance(row.get("prompt"), list):
        prompt = parse_messages(require_list(row, "prompt", where), where, "prompt", "role", "content")
    else:
        prompt = (Message("user", require_str(row, "prompt", where)),)
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field '{key}'")
    reply = _reply_text(row, key, where)
    if not reply.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return (*_ends_with_user(prompt, where), Message("assistant", reply))


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
    ("prompt", {"prompt", "completion"}),  # TRL's prompt-completion
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
    parsers: dict[str, Callable[[dict[str, Any], str], list[Any]]],
    detect: Callable[[Any, str], str],
    *,
    on_error: str = "raise",
    split: str = "train",
) -> tuple[list[Any], LoadReport]:
    """Parse every row of every path with the parser of `fmt` (found by `detect` when None).

    A parser returns the row's records or raises DataError. SkippedRecord (valid but useless,
    e.g. identical replies) is always counted and skipped; other errors (a malformed JSON line, a
    row whose format cannot be told, a missing or empty field) raise unless on_error="skip".
    Returns (records, report); raises DataError if nothing was usable.
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
            try:
                if isinstance(row, MalformedLine):
                    raise row
                path_fmt = path_fmt or detect(row, where)  # the first row that can tell it
                records.extend(parsers[path_fmt](row, where))
            except DataError as e:
                if on_error == "raise" and not isinstance(e, SkippedRecord):
                    raise
                # the reason without the location, so the counts group by cause
                report.skipped[str(e).split(": ", 1)[-1]] += 1
        if path_fmt is None:  # nothing read, or every row skipped before one could tell the format
            skipped = f" ({report.summary()})" if report.skipped else ""
            raise DataError(f"{path}: contains no records{skipped}")
    report.kept = len(records)
    if report.skipped:
        log.warning("data: %s", report.summary())
    if not records:
        raise DataError(f"{paths}: no usable records ({report.summary()})")
    return records, report


def load_conversations(
    paths: str | list[str], fmt: str | None, *, on_error: str = "raise", split: str = "train"
) -> tuple[list[Conversation], LoadReport]:
    """SFT demonstrations -> (list[Conversation], LoadReport)."""

    def parse(name: str) -> Callable[[dict[str, Any], str], list[Conversation]]:
        def one(row: dict[str, Any], where: str) -> list[Conversation]:
            if isinstance(row, dict) and row.get("label") is False:
                raise DataError(
                    f"{where}: label=false marks an undesirable reply (unpaired preference data, as for "
                    "KTO), not a demonstration; drop such records or set data.on_error=skip"
                )
            return [Conversation(SFT_FORMATS[name](row, where), where)]

        return one

    parsers = {name: parse(name) for name in SFT_FORMATS}
    detect = lambda row, where: detect_format(row, where, parsers)  # noqa: E731
    return load_records(paths, fmt, parsers, detect, on_error=on_error, split=split)


def opening(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """A conversation's messages up to and including its first user turn: the records of one
    conversation (the turns of an OpenAssistant tree, the pairs of one ranked prompt) share it."""
    first = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages) - 1)
    return messages[: first + 1]


def split_train_eval(
    records: list[Any], fraction: float, seed: int, group: Callable[[Any], Any] | None = None
) -> tuple[list[Any], list[Any]]:
    """Seeded random hold-out of `fraction` of the records (at least one) for evaluation.

    With `group` (record -> a hashable key, e.g. the `opening` of its prompt), records of one key go
    to the same side, so evaluation never scores a conversation training saw part of: whole groups
    are held out in the shuffled order, each only if it still fits in the held-out count (a large
    group, e.g. one instruction shared by many demonstrations, stays in training). Where every key is
    distinct the split is the same as without; where no group fits (all records share one key), it
    falls back to that split, with a warning.
    """
    import random

    if not 0.0 < fraction < 1.0:
        raise DataError(
            f"data.eval_fraction must be between 0 and 1 when no data.eval_path is given, got {fraction}"
        )
    if len(records) < 2:
        raise DataError(f"need at least 2 records to split off an eval set, got {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, int(round(len(records) * fraction))), len(records) - 1)  # one record each at least
    if group is None:
        return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]
    keys = [group(r) for r in records]
    sizes = collections.Counter(keys)
    held: set[Any] = set()
    n_held = 0
    for i in order:
        if n_held == n_eval:
            break
        if keys[i] not in held and sizes[keys[i]] <= n_eval - n_held:
            held.add(keys[i])
            n_held += sizes[keys[i]]
    if not held:
        log.warning("data: no conversation's records fit in the %d held out (largest: %d of %d records); "
                    "held out record by record instead: give data.eval_path to keep them apart",
                    n_eval, max(sizes.values()), len(records))  # fmt: skip
        return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]
    return [records[i] for i in order if keys[i] not in held], [records[i] for i in order if keys[i] in held]


# ----------------------------------------------------------------------------- preference formats
#
#   pairwise   {"prompt": str | messages, "chosen": str | messages, "rejected": ..., "margin"?}
#              (also alpaca-style prompts: {"instruction", "input"?, "chosen", "rejected"})
#   hh         {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}: whole dialogues
#              sharing everything up to the last Assistant turn (Anthropic HH-RLHF)
#   sharegpt_pairs {"conversations": [{from, value}], "chosen": {from, value}, "rejected": {...}}
#   ranked     {"prompt": str | messages, "responses": [str], "ranks": [int]} (0 = best), or an
#              OpenAssistant tree {"prompt": {"text", "role", "replies": [{"text", "rank", "replies"}]}}:
#              every pair of siblings with different ranks becomes a pair


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages ending with a user turn) and two replies, the first preferred."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    margin: float = 0.0
    source: str = ""


class SkippedRecord(DataError):
    """A record that is valid but useless (identical or empty replies): always counted and skipped."""


def _make_pair(
    prompt: tuple[Message, ...], chosen: str, rejected: str, row: dict, where: str
) -> PreferencePair:
    _ends_with_user(prompt, where)  # the reward model scores a reply to a user turn
    if not chosen.strip() or not rejected.strip():
        raise SkippedRecord(f"{where}: empty response")
    if chosen.strip() == rejected.strip():
        raise SkippedRecord(f"{where}: identical chosen and rejected")
    margin = row.get("margin", 0.0) if isinstance(row, dict) else 0.0
    if margin is None:
        margin = 0.0
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise DataError(f"{where}: field 'margin' must be a number, got {type(margin).__name__}")
    return PreferencePair(prompt, chosen, rejected, float(margin), where)


def _prompt_messages(row: dict, where: str) -> tuple[Message, ...]:
    """A prompt given as a string, a message list, or alpaca-style instruction + input."""
    if "prompt" not in row and "instruction" in row:
        return _alpaca({**row, "output": "-"}, where)[:-1]
    if isinstance(row.get("prompt"), list):
        return parse_messages(require_list(row, "prompt", where), where, "prompt", "role", "content")
    return (Message("user", require_str(row, "prompt", where)),)


def _reply_text(row: dict, key: str, where: str) -> str:
    """A reply given as a string, an {role/from, content/value} object, or a message list ending in it."""
    value = row.get(key)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict):
            raise DataError(f"{where}: field '{key}' must be a string or a list of messages")
        text_key = "value" if "value" in value[-1] else "content"
        role_key = "from" if "from" in value[-1] else "role"
        msgs = parse_messages(value, where, key, role_key, text_key, allow_empty_replies=True)
        if msgs[-1].role != "assistant":
            raise DataError(f"{where}: field '{key}' must end with an assistant message")
        return msgs[-1].content
    return require_str(row, key, where, allow_empty=True)


def _pairwise(row: dict, where: str) -> list[PreferencePair]:
    prompt = _prompt_messages(row, where)
    return [
        _make_pair(prompt, _reply_text(row, "chosen", where), _reply_text(row, "rejected", where), row, where)
    ]


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ASSISTANT = "\n\nAssistant:"


def split_hh(chosen: str, rejected: str, where: str) -> tuple[tuple[Message, ...], str, str]:
    """Two HH dialogues -> (shared prompt as messages, chosen reply, rejected reply).

    The prompt is the longest common prefix cut back to its last "\n\nAssistant:" marker, as in
    TRL's `extract_prompt`: real HH rows sometimes differ before the final turn only in the
    reply being compared (or hold a malformed inline "Human:"), and this keeps them faithful.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(_HH_ASSISTANT)
    if cut < 0:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' share no '\\n\\nHuman: ... \\n\\nAssistant:' prefix"
        )
    prompt_text, start = chosen[:cut], cut + len(_HH_ASSISTANT)
    parts = _HH_TURN.split(prompt_text)  # ["", "Human", q, "Assistant", a, ..., "Human", q]
    if len(parts) < 3 or parts[0].strip() or parts[-2] != "Human":
        raise DataError(
            f"{where}: the dialogue before the compared replies must end with a '\\n\\nHuman:' turn"
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = tuple(Message(roles[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2))
    return messages, chosen[start:].strip(), rejected[start:].strip()


def _hh(row: dict, where: str) -> list[PreferencePair]:
    prompt, chosen, rejected = split_hh(
        require_str(row, "chosen", where), require_str(row, "rejected", where), where
    )
    return [_make_pair(prompt, chosen, rejected, row, where)]


def _sharegpt_pairs(row: dict, where: str) -> list[PreferencePair]:
    prompt = parse_messages(
        require_list(row, "conversations", where), where, "conversations", "from", "value"
    )
    return [
        _make_pair(prompt, _reply_text(row, "chosen", where), _reply_text(row, "rejected", where), row, where)
    ]


def _ranked(row: dict, where: str) -> list[PreferencePair]:
    if isinstance(row.get("prompt"), dict):
        return _oasst_tree(row["prompt"], where)
    prompt = _prompt_messages(row, where)
    responses, ranks = require_list(row, "responses", where), require_list(row, "ranks", where)
    if len(responses) != len(ranks) or not all(isinstance(r, int) for r in ranks):
        raise DataError(f"{where}: 'ranks' must be integers, one per response")
    if not all(isinstance(r, str) for r in responses):
        raise DataError(f"{where}: 'responses' must be strings")
    pairs = _ranked_pairs(prompt, list(zip(ranks, responses)), where)
    if not pairs:  # a record whose pairs are all tied, empty or identical: counted like such a pair
        raise SkippedRecord(f"{where}: no two distinct, non-empty responses of different ranks")
    return pairs


def _ranked_pairs(
    prompt: tuple[Message, ...], ranked: list[tuple[int, str]], where: str
) -> list[PreferencePair]:
    pairs = []
    for (ra, a), (rb, b) in itertools.combinations(ranked, 2):
        if ra == rb:
            continue
        better, worse = (a, b) if ra < rb else (b, a)
        if better.strip() and worse.strip() and better.strip() != worse.strip():
            pairs.append(PreferencePair(prompt, better, worse, 0.0, where))
    return pairs


def _oasst_turns(root: dict, where: str) -> Iterator[tuple[tuple[Message, ...], list[dict]]]:
    """Each prompter message of an OpenAssistant tree, depth first: (the conversation up to and
    including it, its assistant replies that are not deleted)."""

    def walk(node: dict, history: tuple[Message, ...]):  # node: a prompter message
        prompt = (*history, Message("user", require_str(node, "text", where)))
        replies = [
            r for r in node.get("replies") or [] if r.get("role") == "assistant" and not r.get("deleted")
        ]
        yield prompt, replies
        for reply in replies:
            for child in reply.get("replies") or []:
                if child.get("role") == "prompter" and not child.get("deleted"):
                    yield from walk(child, (*prompt, Message("assistant", reply["text"])))

    yield from walk(root, ())


def _oasst_tree(root: dict, where: str) -> list[PreferencePair]:
    pairs = [
        pair
        for prompt, replies in _oasst_turns(root, where)
        for pair in _ranked_pairs(
            prompt, [(r["rank"], r["text"]) for r in replies if isinstance(r.get("rank"), int)], where
        )
    ]
    if not pairs:
        raise SkippedRecord(f"{where}: no ranked sibling replies")
    return pairs


PREFERENCE_FORMATS: dict[str, Callable[[dict[str, Any], str], list[PreferencePair]]] = {
    "pairwise": _pairwise,
    "hh": _hh,
    "sharegpt_pairs": _sharegpt_pairs,
    "ranked": _ranked,
}


def detect_preference_format(row: Any, where: str) -> str:
    keys = row.keys() if isinstance(row, dict) else set()
    if {"conversations", "chosen", "rejected"} <= keys:
        return "sharegpt_pairs"
    if {"chosen", "rejected"} <= keys and ({"prompt", "instruction"} & keys):
        return "pairwise"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    if "prompt" in keys and (isinstance(row["prompt"], dict) or "responses" in keys):
        return "ranked"
    found = sorted(keys) if isinstance(row, dict) else type(row).__name__
    raise DataError(f"{where}: cannot tell the preference format from fields {found}; set data.format to one of "
                    f"{sorted(PREFERENCE_FORMATS)}")  # fmt: skip


def load_preferences(
    paths: str | list[str], fmt: str | None, *, on_error: str = "raise", split: str = "train"
) -> tuple[list[PreferencePair], LoadReport]:
    """Preference records -> (flat list of PreferencePair, LoadReport); identical or empty replies are skipped."""
    return load_records(
        paths, fmt, PREFERENCE_FORMATS, detect_preference_format, on_error=on_error, split=split
    )


# ----------------------------------------------------------------------------- prompts (PPO rollouts)


def _ends_with_user(messages: tuple[Message, ...], where: str) -> tuple[Message, ...]:
    if not messages or messages[-1].role != "user":
        raise DataError(f"{where}: a prompt must end with a user turn, got {list(messages[-1:])}")
    return messages


def _prompt_only(row: dict, where: str) -> list[tuple[Message, ...]]:
    return [_ends_with_user(_prompt_messages(row, where), where)]


# the message-list SFT formats: (field, role key, text key)
_CONVERSATION_FIELDS = {
    "messages": ("messages", "role", "content"),
    "sharegpt": ("conversations", "from", "value"),
}


def _conversation_prompt(name: str) -> Callable[[dict[str, Any], str], list[tuple[Message, ...]]]:
    """The prompt part of an SFT record: its messages before the final assistant reply, or all of
    them when a message list ends with a user turn (a prompt-only file in the same layout). The
    final reply is not read, so it may be empty (a placeholder in a prompt-only export)."""

    def parse(row: dict[str, Any], where: str) -> list[tuple[Message, ...]]:
        if name in _CONVERSATION_FIELDS:
            key, role, text = _CONVERSATION_FIELDS[name]
            items = require_list(row, key, where)
            roles = SHAREGPT_ROLES if role == "from" else {r: r for r in ROLES}
            last = items[-1].get(role) if isinstance(items[-1], dict) else None
            if isinstance(last, str) and roles.get(last) == "assistant":
                items = items[:-1]
            messages = parse_messages(items, where, key, role, text)
        else:  # alpaca: instruction, input and system, whatever the output
            messages = _alpaca({**row, "output": "-"}, where)[:-1]
        return [_ends_with_user(messages, where)]

    return parse


def _ranked_prompts(row: dict, where: str) -> list[tuple[Message, ...]]:
    if isinstance(row.get("prompt"), dict):  # an OpenAssistant tree: every prompter turn
        return [prompt for prompt, _ in _oasst_turns(row["prompt"], where)]
    return [_prompt_messages(row, where)]


# The prompt of a preference record, read without judging its replies: a pair whose replies are
# identical or empty is no use to a reward model, but its prompt is a good rollout prompt.
_PREFERENCE_PROMPTS: dict[str, Callable[[dict[str, Any], str], list[tuple[Message, ...]]]] = {
    "pairwise": lambda row, where: [_prompt_messages(row, where)],
    "hh": lambda row, where: [
        split_hh(require_str(row, "chosen", where), require_str(row, "rejected", where), where)[0]
    ],
    "sharegpt_pairs": lambda row, where: [
        parse_messages(require_list(row, "conversations", where), where, "conversations", "from", "value")
    ],
    "ranked": _ranked_prompts,
}
assert _PREFERENCE_PROMPTS.keys() == PREFERENCE_FORMATS.keys()


def _preference_prompts(name: str) -> Callable[[dict[str, Any], str], list[tuple[Message, ...]]]:
    return lambda row, where: [_ends_with_user(p, where) for p in _PREFERENCE_PROMPTS[name](row, where)]


PROMPT_FORMATS: dict[str, Callable[[dict[str, Any], str], list[tuple[Message, ...]]]] = {
    "prompt": _prompt_only,  # {"prompt": str | messages} (any other fields are ignored)
    **{f"sft:{n}": _conversation_prompt(n) for n in SFT_FORMATS if n != "prompt"},
    **{f"pref:{n}": _preference_prompts(n) for n in PREFERENCE_FORMATS},
}


def detect_prompt_format(row: Any, where: str) -> str:
    keys = row.keys() if isinstance(row, dict) else set()
    if "chosen" in keys or "responses" in keys or isinstance(row.get("prompt") if keys else None, dict):
        return "pref:" + detect_preference_format(row, where)
    if "prompt" in keys:
        return "prompt"
    for name, sig in _SIGNATURES:
        if name != "prompt" and sig <= keys:
            return f"sft:{name}"
    found = sorted(keys) if isinstance(row, dict) else type(row).__name__
    raise DataError(f"{where}: cannot tell the prompt format from fields {found}; set data.format to one of "
                    f"{sorted(PROMPT_FORMATS)}")  # fmt: skip


# data.format values each stage reads (null: detected from the first record). `imdb` is the IMDB task's
# own (data/imdb.py); PPO's prompts come from any prompt-bearing format, by its own name or prefixed.
STAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": (*SFT_FORMATS, "imdb"),
    "reward": (*PREFERENCE_FORMATS, "imdb"),
    "ppo": (*PROMPT_FORMATS, *(n for n in SFT_FORMATS if n != "prompt"), *PREFERENCE_FORMATS, "imdb"),
    "ptx": tuple(SFT_FORMATS),  # PPO-ptx's demonstrations (ppo/ptx.py)
}


def load_prompts(
    paths: str | list[str], fmt: str | None, *, on_error: str = "raise", split: str = "train"
) -> tuple[list[tuple[Message, ...]], LoadReport]:
    """Rollout prompts (messages ending with a user turn) from any prompt-bearing format, deduplicated.

    Formats: `prompt` ({"prompt": str | messages}), `sft:<alpaca|messages|sharegpt>` (the turns
    before the last reply), `pref:<pairwise|hh|sharegpt_pairs|ranked>` (the prompt, whatever its
    replies; every user turn of an OpenAssistant tree); the
    names without their prefix work too.
    """
    if fmt in SFT_FORMATS and fmt != "prompt":  # the stage formats' own names work too
        fmt = f"sft:{fmt}"
    elif fmt in PREFERENCE_FORMATS:
        fmt = f"pref:{fmt}"
    prompts, report = load_records(
        paths, fmt, PROMPT_FORMATS, detect_prompt_format, on_error=on_error, split=split
    )
    return list(dict.fromkeys(prompts)), report  # a preference file repeats its prompt once per pair
