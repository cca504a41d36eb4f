"""What the server serves, and how it changes without a restart.

`refresh(desired, roles)` makes the served set match what is on disk: a checkpoint that is
new or republished (its stamp changed) is loaded beside the old one; only when it loaded
does the role switch, in one assignment under a lock, so new requests go to the new model
while requests in flight finish on the old one, whose engine then drains and stops. A load
that fails leaves the old model serving and is recorded (log, metric, ListModels).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from rlhfkit.errors import shortened
from rlhfkit.server.errors import ModelNotFoundError
from rlhfkit.server.models import LoadedModel, load_checkpoint
from rlhfkit.server.store import ROLES, CheckpointRef

log = logging.getLogger(__name__)


@dataclass
class LoadFailure:
    name: str
    path: str
    stamp: tuple
    error: str
    failed_at: str


class ModelRegistry:
    def __init__(self, device: str = "auto", dtype: str = "float32",
                 make_engine: Callable[[LoadedModel], object] | None = None, metrics=None):
        self.device, self.dtype = device, dtype
        self.make_engine = make_engine
        self.metrics = metrics
        self.models: dict[str, LoadedModel] = {}
        self.roles: dict[str, str] = {}  # role -> model name
        self.failures: dict[str, LoadFailure] = {}
        self._lock = threading.Lock()  # guards the (models, roles) pair that requests read
        self._refresh_lock = threading.Lock()  # one refresh at a time

    # ---- reads (any thread) -------------------------------------------------------------

    def get(self, name: str, role: str) -> LoadedModel:
        """The model called `name` (a model name or a role; empty = `role`), which must be
        of the kind `role` needs."""
        with self._lock:
            key = self.roles.get(name or role, name or role)
            m = self.models.get(key)
            known = sorted(set(self.models) | set(self.roles))
        if m is None:
            raise ModelNotFoundError(f"model {shortened(name or role)!r} is not served here; served: "
                                     f"{', '.join(known) or 'none'}")
        want = "reward" if role == "reward" else "policy"
        if m.kind != want:
            raise ModelNotFoundError(f"model {shortened(name or role)!r} is a {m.kind} model, not a {want} model")
        return m

    def find(self, name: str, role: str) -> LoadedModel | None:
        """Like get, but None when nothing serves it (optional roles such as the reference)."""
        try:
            return self.get(name, role)
        except ModelNotFoundError:
            if name:
                raise
            return None

    def snapshot(self) -> tuple[dict[str, LoadedModel], dict[str, str], list[LoadFailure]]:
        with self._lock:
            return dict(self.models), dict(self.roles), list(self.failures.values())

    # ---- changes ------------------------------------------------------------------------

    def refresh(self, desired: dict[str, CheckpointRef], roles: dict[str, str]) -> bool:
        """Serve `desired` (name -> checkpoint) with `roles` (role -> name). Returns whether
        anything changed."""
        with self._refresh_lock:
            current, current_roles, _ = self.snapshot()
            models: dict[str, LoadedModel] = {}
            for name, ref in desired.items():
                old = current.get(name)
                if old is not None and old.stamp == ref.stamp:
                    models[name] = old
                    continue
                failed = self.failures.get(name)
                if failed is not None and failed.stamp == ref.stamp:
                    if old is not None:
                        models[name] = old  # known bad: do not retry until it is republished
                    continue
                try:
                    models[name] = self._load(ref)
                    self.failures.pop(name, None)
                except Exception as e:  # any failure to load: keep serving what we have
                    self._record_failure(ref, e)
                    if old is not None:
                        models[name] = old
            new_roles = {}
            for role in ROLES:
                name = roles.get(role)
                if name in models:
                    new_roles[role] = name
                elif current_roles.get(role) in current:  # the new target failed: keep the old one
                    old_name = current_roles[role]
                    models.setdefault(old_name, current[old_name])
                    new_roles[role] = old_name
            changed = new_roles != current_roles or any(models.get(n) is not m for n, m in current.items()) \
                or set(models) != set(current)
            with self._lock:
                self.models, self.roles = models, new_roles
            live = {id(m) for m in models.values()}
            for m in current.values():
                if id(m) not in live:
                    self._retire(m)
            if changed:
                log.info("serving: %s", ", ".join(f"{r}={models[n].model_version}" for r, n in new_roles.items()))
            return changed

    def _load(self, ref: CheckpointRef) -> LoadedModel:
        log.info("loading %s (%s) from %s", ref.name, ref.kind, ref.path)
        m = load_checkpoint(ref.path, ref.kind, device=self.device, dtype=self.dtype, name=ref.name, stamp=ref.stamp)
        if m.kind == "policy" and self.make_engine is not None:
            m.engine = self.make_engine(m)
        if self.metrics:
            self.metrics.model_loads.labels("ok").inc()
        return m

    def _record_failure(self, ref: CheckpointRef, e: Exception):
        log.error("could not load %s from %s: %s; the previous model keeps serving", ref.name, ref.path, e)
        # The message names the checkpoint, not its directory: ListModels shows it to every client.
        error = f"{type(e).__name__}: {e}".replace(str(ref.path), ref.name)
        self.failures[ref.name] = LoadFailure(ref.name, str(ref.path), ref.stamp, error,
                                              datetime.now(timezone.utc).isoformat(timespec="seconds"))
        if self.metrics:
            self.metrics.model_loads.labels("failed").inc()

    def _retire(self, m: LoadedModel):
        """Requests in flight keep their reference to `m` and finish; its engine stops once
        they have, and the weights go with the last reference."""
        log.info("retiring %s", m.model_version)
        if m.engine is not None:
            m.engine.drain()

    def shutdown(self):
        for m in self.snapshot()[0].values():
            if m.engine is not None:
                m.engine.shutdown()
