"""The data formats, as JSON Lines (ARCHITECTURE.md, The loop and Chat models), plain or
conversational as TRL's datasets are (a conversation is a list of {"role", "content"}):

    SFT          {"prompt": str, "completion": str}
                 {"messages": [msgs]}                        (the loss on every assistant turn)
                 {"prompt": [msgs], "completion": [msgs]}
    preferences  {"prompt": str, "chosen": str, "rejected": str}   (TRL / HH-RLHF style)
                 {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}
                 {"chosen": [full], "rejected": [full]}      (implicit prompt: the shared leading turns)
    rankings     {"prompt": str | [msgs], "responses": [best, ..., worst]}  (at least two; each
                 a string, or a list of messages after a conversational prompt)
    PPO prompts  {"prompt": str | [msgs]}

Readers validate every line and fail with `file:line: what is wrong`, so a bad line in a
large file is found without a debugger, and return records in one shape per format: an
implicit-prompt preference comes back with its prompt split off. Extra keys are kept (a
`margin` on a preference line is used by the RM trainer). Rendering to token ids is
rlhfkit.chat's, the same as the server's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from rlhfkit.chat import ChatFormatError, as_messages

FORMATS = {
    "sft": ("prompt", "completion"),
    "preferences": ("prompt", "chosen", "rejected"),
    "rankings": ("prompt", "responses"),
    "prompts": ("prompt",),
}


class DataError(ValueError):
    """A data line is malformed; the message starts with file:line."""


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path, fmt: str) -> list[dict]:
    """Read and validate a file in one of FORMATS; blank lines are skipped."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {sorted(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if fmt == "preferences" and "prompt" not in record and isinstance(record.get("chosen"), list):
                record = split_implicit_prompt(record, where)
            if fmt == "sft" and "messages" in record:
                _check_messages(record, "messages", where)
                if not any(m["role"] == "assistant" for m in record["messages"]):
                    raise DataError(f"{where}: 'messages' has no assistant turn to train on")
            else:
                _check_record(record, fmt, where)
            records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _check_messages(record: dict, key: str, where: str, value=None) -> list[dict]:
    """Validate (and store back as plain dicts) a conversation at record[key]."""
    value = record[key] if value is None else value
    try:
        return as_messages(value, key)
    except ChatFormatError as e:
        raise DataError(f"{where}: {e}") from None
    except (AttributeError, TypeError):
        raise DataError(f"{where}: {key!r} must be a list of {{\"role\", \"content\"}} messages") from None


def split_implicit_prompt(record: dict, where: str) -> dict:
    """{"chosen": [full], "rejected": [full]} -> the shared leading turns as the prompt and
    the turns after them as chosen and rejected (TRL's maybe_extract_prompt)."""
    chosen, rejected = (_check_messages(record, k, where) for k in ("chosen", "rejected"))
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no leading turns, so there is no prompt; "
                        "give \"prompt\" explicitly")
    if n == len(chosen) or n == len(rejected):
        raise DataError(f"{where}: 'chosen' and 'rejected' must differ after their shared prompt turns")
    return {**record, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _check_record(record: dict, fmt: str, where: str) -> None:
    if "prompt" in record and isinstance(record["prompt"], list):
        record["prompt"] = _check_messages(record, "prompt", where)
    chat_prompt = isinstance(record.get("prompt"), list)
    for key in FORMATS[fmt]:
        if key not in record:
            raise DataError(f"{where}: missing key {key!r} (a {fmt} line needs {list(FORMATS[fmt])})")
        value = record[key]
        if key == "prompt" and chat_prompt:
            continue
        if key == "responses":
            messages = chat_prompt and isinstance(value, list) and all(isinstance(r, list) for r in value)
            if not isinstance(value, list) or not messages and not all(isinstance(r, str) for r in value):
                raise DataError(f"{where}: 'responses' must be a list of strings"
                                + (" or of message lists" if chat_prompt else "") + ", best first")
            if len(value) < 2:
                raise DataError(f"{where}: 'responses' needs at least two responses to rank, got {len(value)}")
            if messages:
                value[:] = [_check_messages(record, f"responses[{i}]", where, r) for i, r in enumerate(value)]
        elif chat_prompt and isinstance(value, list):
            record[key] = _check_messages(record, key, where)
            if not any(m["role"] == "assistant" for m in record[key]):
                raise DataError(f"{where}: {key!r} has no assistant turn")
        elif not isinstance(value, str):
            kind = "a string or a list of messages" if chat_prompt else "a string"
            raise DataError(f"{where}: {key!r} must be {kind}, got {type(value).__name__}")
    if not record["prompt"]:
        raise DataError(f"{where}: 'prompt' is empty")
    if "margin" in record and not isinstance(record["margin"], (int, float)):
        raise DataError(f"{where}: 'margin' must be a number")


def sft_pair(record: dict) -> tuple:
    """An SFT record as (prompt, completion): a {"messages"} conversation splits before its
    last turn."""
    if "messages" in record:
        return record["messages"][:-1], record["messages"][-1:]
    return record["prompt"], record["completion"]


def fingerprint_files(paths: Iterable[str | Path]) -> str:
    """sha256 over the files' bytes (in the given order): the data_fingerprint of a checkpoint."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()
