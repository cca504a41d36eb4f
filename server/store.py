"""The model store on disk: a directory of named checkpoints and the roles they serve.

    store/
      sft-1/        Hugging Face checkpoint + rlhfkit.json (stage, parent, ...)
      rm-1/
      ppo-1/
      .ppo-2.tmp-…  a checkpoint being written (dot names are never read)
      roles.json    optional: {"policy": "ppo-1", "reference": "sft-1", "reward": "rm-1",
                               "serve": ["sft-1"]}   (serve: extra versions to load by name)

Without roles.json (or for a role it leaves out), a role follows the newest checkpoint of
its stage: policy <- ppo/dpo (else sft), reference <- sft, reward <- rm. Trainers publish
by atomic rename, so a directory that is visible is complete; the loader still checks
that the weights are there and fit the config before anything serves from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("policy", "reference", "reward")
ROLES_FILE = "roles.json"
# Which stages each role follows when roles.json does not name a checkpoint, in preference order.
DEFAULT_STAGES = {"policy": (("ppo", "grpo", "rloo", "dpo"), ("sft",)), "reference": (("sft",),), "reward": (("rm",),)}


class StoreError(ValueError):
    """A store operation that cannot be done as asked (unknown name, wrong kind of model)."""


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint directory as seen on disk, before loading."""

    name: str
    path: Path
    kind: str  # "policy" (causal LM) or "reward" (sequence classification)
    stamp: tuple  # changes whenever the directory is republished
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def created(self) -> str:
        return str(self.meta.get("created_at") or "")


def read_checkpoint(path: str | Path, name: str | None = None, kind: str | None = None) -> CheckpointRef | None:
    """The checkpoint at `path`, or None when it is not one (yet)."""
    path = Path(path).absolute()
    try:
        config = json.loads((path / "config.json").read_text())
        st = path.stat()
        meta_file = path / "rlhfkit.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        stamp = (st.st_ino, (path / "config.json").stat().st_mtime_ns,
                 meta_file.stat().st_mtime_ns if meta else 0)
    except (OSError, ValueError):
        return None  # missing, being renamed, or not valid JSON
    if kind is None:
        archs = config.get("architectures") or []
        is_rm = meta.get("stage") == "rm" or any(a.endswith("ForSequenceClassification") for a in archs)
        kind = "reward" if is_rm else "policy"
    return CheckpointRef(name or path.name, path, kind, stamp, meta)


class ModelStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        if not self.root.is_dir():
            raise FileNotFoundError(f"model store {self.root} is not a directory")

    def checkpoints(self) -> dict[str, CheckpointRef]:
        out = {}
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            ref = read_checkpoint(entry)
            if ref is not None:
                out[ref.name] = ref
        return out

    def roles_file(self) -> dict:
        path = self.root / ROLES_FILE
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise StoreError(f"{path}: not valid JSON ({e}); fix or delete it") from e
        bad = set(data) - set(ROLES) - {"serve"}
        if bad:
            raise StoreError(f"{path}: unknown keys {sorted(bad)}; allowed: {list(ROLES) + ['serve']}")
        return data

    def resolve(self) -> tuple[dict[str, CheckpointRef], dict[str, str]]:
        """(checkpoints to serve by name, role -> checkpoint name)."""
        checkpoints = self.checkpoints()
        pinned = self.roles_file()
        roles: dict[str, str] = {}
        for role in ROLES:
            name = pinned.get(role)
            if name is None:
                name = self._newest_for(role, checkpoints)
            if name is not None and name in checkpoints:
                roles[role] = name
        names = set(roles.values()) | {n for n in pinned.get("serve", []) if n in checkpoints}
        return {n: checkpoints[n] for n in sorted(names)}, roles

    @staticmethod
    def _newest_for(role: str, checkpoints: dict[str, CheckpointRef]) -> str | None:
        kind = "reward" if role == "reward" else "policy"
        for stages in DEFAULT_STAGES[role]:
            matches = [c for c in checkpoints.values() if c.kind == kind and c.meta.get("stage") in stages]
            if matches:
                return max(matches, key=lambda c: (c.created, c.path.stat().st_mtime_ns)).name
        if role == "policy":  # a store of outside checkpoints: the newest causal LM
            others = [c for c in checkpoints.values() if c.kind == "policy"]
            if others:
                return max(others, key=lambda c: c.path.stat().st_mtime_ns).name
        return None

    def set_role(self, name: str, role: str):
        """Point `role` at checkpoint `name` (atomic rewrite of roles.json)."""
        if role not in ROLES:
            raise StoreError(f"role must be one of {list(ROLES)}, got {role!r}")
        checkpoints = self.checkpoints()
        if name not in checkpoints:
            raise KeyError(f"no checkpoint {name!r} in {self.root}; present: {', '.join(checkpoints) or 'none'}")
        want = "reward" if role == "reward" else "policy"
        if checkpoints[name].kind != want:
            raise StoreError(f"{name} is a {checkpoints[name].kind} model and cannot serve as {role}")
        data = self.roles_file()
        data[role] = name
        tmp = self.root / f".{ROLES_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.root / ROLES_FILE)
