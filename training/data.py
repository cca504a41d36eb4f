"""The data formats, as JSON Lines (ARCHITECTURE.md, The loop):

    SFT          {"prompt": str, "completion": str}
    preferences  {"prompt": str, "chosen": str, "rejected": str}   (TRL / HH-RLHF style)
    rankings     {"prompt": str, "responses": [best, ..., worst]}  (at least two)
    PPO prompts  {"prompt": str}

Readers validate every line and fail with `file:line: what is wrong`, so a bad line in a
large file is found without a debugger. Extra keys are kept (a `margin` on a preference
line is used by the RM trainer).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

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
            _check_record(record, fmt, where)
            records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _check_record(record: dict, fmt: str, where: str) -> None:
    for key in FORMATS[fmt]:
        if key not in record:
            raise DataError(f"{where}: missing key {key!r} (a {fmt} line needs {list(FORMATS[fmt])})")
        value = record[key]
        if key == "responses":
            if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
                raise DataError(f"{where}: 'responses' must be a list of strings, best first")
            if len(value) < 2:
                raise DataError(f"{where}: 'responses' needs at least two responses to rank, got {len(value)}")
        elif not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not record["prompt"]:
        raise DataError(f"{where}: 'prompt' is empty")
    if "margin" in record and not isinstance(record["margin"], (int, float)):
        raise DataError(f"{where}: 'margin' must be a number")


def fingerprint_files(paths: Iterable[str | Path]) -> str:
    """sha256 over the files' bytes (in the given order): the data_fingerprint of a checkpoint."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()
