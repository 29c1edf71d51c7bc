"""Where an endless online run stands, kept in a small file so that a restart continues there.

An online run walks the positions ``0, 1, 2, ...`` of the endless sequence "epoch 0 of every
caption, then epoch 1, ...": position ``p`` is caption index ``p % N`` of epoch ``p // N`` for a
caption set of ``N`` captions. Group ids and seeds follow from (caption, epoch), so a position
handed out once must never be handed out again, even after a ``kill -9``.

The file holds a *lease*: before the run hands out position ``p`` it makes sure the file says
``next_position > p``, writing ``p + lease`` when needed (write to a temporary file, fsync,
rename: never torn). A restart begins at the leased ``next_position``, so it never repeats a
position (nor a group it archived); at most ``lease`` positions plus the groups in flight at a
crash are skipped, and those captions come again, with fresh seeds, in the next epoch. A clean stop
writes the exact next position.

A run whose caption policy keeps state (``generator_service.caption_policy``: its scores, and which
epoch each caption is at) gives ``policy_state``; every write stores ``policy_state(next position
handed out)`` beside the lease, and ``save()`` writes it between leases (new scores). A restart
reads it back as ``saved_policy``; the policy jumps its epochs past the leased positions.

The file also records what the positions mean (generator fingerprint, base seed, images per group,
caption set digest): a restart with other settings is refused with the field that differs.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

STATE_FILE = "online_state.json"
STATE_VERSION = 1
DEFAULT_LEASE = 256


class OnlineStateError(ValueError):
    """The state file is unreadable or describes another run (the message names file and field)."""


@dataclass(frozen=True)
class RunIdentity:
    """What positions mean: a restart must match every field."""

    fingerprint: str
    seed: int
    images_per_group: int
    captions_digest: str
    caption_count: int


class OnlineState:
    """The lease file of one online run, ``DIR/online_state.json``.

    Args:
        directory: where the file lives (created if needed).
        identity: the run's settings; checked against an existing file.
        lease: positions reserved per write.
        policy_state: ``position -> dict`` (JSON-ready), the caption policy's state when ``position``
            is the next handed out; stored with every write. None: nothing stored.
    """

    def __init__(self, directory: str | os.PathLike, identity: RunIdentity, lease: int = DEFAULT_LEASE,
                 policy_state: Callable[[int], dict[str, Any]] | None = None) -> None:
        if lease < 1:
            raise ValueError(f"lease must be >= 1, got {lease}")
        self.path = Path(directory) / STATE_FILE
        self.identity = identity
        self.lease = int(lease)
        self.restarts = 0
        self.start_position = 0
        self.policy_state = policy_state
        #: the policy state the file held when opened (None: none stored, e.g. a run before policies)
        self.saved_policy: dict[str, Any] | None = None
        self._leased = 0
        self._handed_out = 0

    def open(self) -> "OnlineState":
        """Read an existing file (checking it), or start at position 0; returns self."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self._read()
            self.start_position = data["next_position"]
            self.restarts = data["restarts"] + 1
            self.saved_policy = data.get("policy")
        self._leased = self._handed_out = self.start_position
        self._write(self.start_position)
        return self

    @property
    def next_position(self) -> int:
        """The position the run hands out next."""
        return self._handed_out

    def positions(self) -> Iterator[int]:
        """Positions from ``start_position`` on, each leased in the file before it is yielded."""
        position = self.start_position
        while True:
            if position >= self._leased:
                self._write(position + self.lease)
                self._leased = position + self.lease
            self._handed_out = position + 1
            yield position
            position += 1

    def save(self) -> None:
        """Write the policy state now (the lease unchanged): new scores survive a ``kill -9``."""
        self._write(self._leased)

    def close(self) -> None:
        """A clean stop: the file says exactly where the run stopped."""
        self._write(self._handed_out)
        self._leased = self._handed_out

    # --- the file -----------------------------------------------------------------------------
    def _read(self) -> dict:
        where = str(self.path)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # deep nesting too
            raise OnlineStateError(f"{where}: cannot read the online state ({type(exc).__name__}: {str(exc)[:200]}); "
                                   "move it away to start the run again from epoch 0") from None
        if not isinstance(data, dict):
            raise OnlineStateError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("version") != STATE_VERSION:
            raise OnlineStateError(f"{where}: version {data.get('version')!r} is not {STATE_VERSION}")
        for name in ("next_position", "restarts"):
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OnlineStateError(f"{where}: field {name!r} must be an int >= 0, got {value!r}")
        stored = data.get("run")
        if not isinstance(stored, dict):
            raise OnlineStateError(f"{where}: field 'run' must be an object, got {stored!r}")
        for name, value in asdict(self.identity).items():
            if stored.get(name) != value:
                raise OnlineStateError(
                    f"{where}: this state belongs to another run: {name} was {stored.get(name)!r}, now {value!r} "
                    "(use another --state directory, or move the file away to start again from epoch 0)")
        if not isinstance(data.get("policy", {}), dict):
            raise OnlineStateError(f"{where}: field 'policy' must be an object, got {str(data.get('policy'))[:80]}")
        return data

    def _write(self, next_position: int) -> None:
        payload: dict[str, Any] = {"version": STATE_VERSION, "next_position": int(next_position),
                                   "restarts": self.restarts, "run": asdict(self.identity)}
        if self.policy_state is not None:
            payload["policy"] = self.policy_state(self._handed_out)
        fd, tmp = tempfile.mkstemp(prefix=".online_state.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=None if "policy" in payload else 1)  # a policy's lists: one line
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
