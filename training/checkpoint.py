"""Publishing checkpoints: the hand-off from training to serving (ARCHITECTURE.md, Checkpoints).

A checkpoint is a Hugging Face `save_pretrained` directory plus `rlhfkit.json`:
{stage, parent, base_model, data_fingerprint, metrics, created_at, ...}. It is written
under a temporary name beside its final place, every file fsynced, then renamed: the
server, which reloads a role when a newer checkpoint appears, never sees half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

INFO_FILE = "rlhfkit.json"
ADAPTER_DIR = "adapter"
STAGES = ("sft", "rm", "ppo", "grpo", "rloo", "dpo")


def read_info(checkpoint_dir: str | Path) -> dict:
    """The checkpoint's rlhfkit.json, or {} for a checkpoint made elsewhere."""
    path = Path(checkpoint_dir) / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    platform or filesystem cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def publish_checkpoint(model, tokenizer, output_dir: str | Path, *, stage: str, parent: str | Path | None,
                       data_fingerprint: str | None = None, metrics: dict | None = None,
                       overwrite: bool = False, extra: dict | None = None, state_dict: dict | None = None) -> Path:
    """Save `model` and `tokenizer` to `output_dir` atomically, with rlhfkit.json.

    A peft (LoRA) model is saved merged, so the checkpoint loads in plain transformers and
    serves here, with its adapter beside it in output_dir/adapter (PeftModel.from_pretrained
    reads it over the base model); merging consumes the peft wrapper (the caller's model is
    the merged one afterwards). `state_dict`: the full weights when the model's own are
    sharded (FSDP).

    base_model is inherited from the parent's rlhfkit.json (the model the lineage started
    from), else the parent itself. With overwrite=True an existing checkpoint is replaced
    by one atomic exchange (Linux) or two renames; without it, an existing directory is an error.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    parent_str = str(Path(parent).absolute()) if parent is not None and Path(parent).exists() else (
        str(parent) if parent is not None else None)
    info = {
        "stage": stage,
        "parent": parent_str,
        "base_model": (read_info(parent).get("base_model") if parent and Path(parent).exists() else None) or parent_str,
        "data_fingerprint": data_fingerprint,
        "metrics": metrics or {},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if hasattr(model, "merge_and_unload"):  # peft
            model.save_pretrained(tmp / ADAPTER_DIR)
            info["adapter"] = ADAPTER_DIR
            model = model.merge_and_unload()
        model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        _fsync_tree(tmp)
        if output_dir.exists():
            # Replace in one step where Linux allows (the old version lands at tmp's name),
            # else move the old one aside first: a reader may then briefly see no checkpoint,
            # never half of one.
            if _exchange(tmp, output_dir):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(output_dir, old)
                os.rename(tmp, output_dir)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output_dir)
        _fsync_dir(output_dir.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output_dir
