"""Online source: caption groups streamed from generator services into a replay buffer.

Each trainer process owns one :class:`protocol.client.GroupClient` connected to every generator
endpoint. The client's I/O thread hands every received group to :meth:`ReplayBuffer.add` (the one
copy of its pixels, into preallocated storage); :meth:`OnlineSource.next_batch` draws a batch with
:meth:`ReplayBuffer.sample`. Generation and training thus overlap completely; when the generators
are slower than the trainer, groups are reused (bounded by ``max_reuse``) and the wait for enough
eligible groups is reported as stall time.

Buffer geometry:

- image side: ``data.image_size`` when given (groups of another size are resized on arrival, with
  antialiasing), else the largest ``save_size`` of the generators' descriptions
  (``protocol.GeneratorInfo`` in ``welcome``);
- images per group: the smallest ``images_per_group`` the generators announce (extra images of a
  group are dropped); it must be at least ``data.draw_per_caption``;
- capacity: ``replay.capacity_groups``, or as many groups as fit in ``replay.capacity_gib`` GiB, or by
  default ``max(8 * captions_per_rank, 64)`` groups.

The source reads the ``data`` and ``replay`` config groups whole (`trainer.data.config`); the buffer
takes the ``replay`` group as its policy.

Storage rule (``replay.storage="auto"``, `trainer.data.replay_storage`): the buffer lives in GPU memory
when the training device is a CUDA device and the buffer fits beside the training step's estimated peak
(``training_bytes``) with headroom (then a batch needs no host-to-device copy at all); otherwise in
pinned host memory, from which batches are copied with ``non_blocking=True``. ``storage="gpu"`` /
``"host"`` force either.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from protocol.client import GroupClient
from protocol.errors import BadGroup, ProtocolError
from trainer.data.batch import Batch
from trainer.data.config import DataConfig, ReplayConfig
from trainer.data.images import decode_image_of_size
from trainer.data.replay import ReplayBuffer, ReplayBufferClosed
from trainer.data.replay_storage import choose_storage_device
from trainer.data.sources import SourceContext, register_source
from trainer.data.sources.caption_feedback import SourceFeedback
from trainer.data.sources.caption_ids import namespaced_caption_id, needs_namespacing
from trainer.data.sources.generator_watch import GeneratorsSilentError, GeneratorWatch

log = logging.getLogger(__name__)

DEFAULT_CAPACITY_FACTOR = 8  # default capacity: this many batches' worth of groups
# Repeated group ids beyond re-sends: warn once when at least this many and this share of arrivals repeat.
REPEAT_WARNING_COUNT, REPEAT_WARNING_SHARE = 32, 0.25
# Groups evicted before any draw: warn once when at least this many and this share of all evictions were unseen.
UNSEEN_WARNING_COUNT, UNSEEN_WARNING_SHARE = 256, 0.5


class GroupStreamError(RuntimeError):
    """A received group could not be stored (the source stops; the message names the group)."""


@register_source("online")
class OnlineSource:
    """Batches of caption groups from live generator services.

    Args:
        data: the ``data`` config group; read here: ``generators`` (endpoints, e.g.
            ``["tcp://127.0.0.1:5555"]``), ``draw_per_caption`` (``n``), ``image_size`` (buffer image
            side; ``None``: from the generators), ``credits`` (groups in flight per endpoint),
            ``connect_timeout`` (seconds to wait for every generator's ``welcome``), ``sample_timeout``
            (seconds ``next_batch`` waits for enough groups before failing), ``generator_timeout``
            (seconds without a new group from any endpoint before the run counts as stalled:
            ``silent_generators``; ``next_batch`` raises ``GeneratorsSilentError``) and ``curve_keys``
            (a CurveZMQ key directory, ``protocol.curve``, for services run with ``--curve-keys``).
        replay: the ``replay`` config group: capacity (``capacity_groups`` or ``capacity_gib``),
            ``storage`` (``"auto"`` | ``"gpu"`` | ``"host"``) and the buffer's policy
            (`trainer.data.replay`). Default: ``ReplayConfig()``.
        captions_per_rank: caption groups per batch on this process (``G``).
        device: the training device (decides where the buffer may live).
        rank, world_size: this process's place among the trainer processes (sent in ``hello``).
        seed: sampling seed (offset by rank).
        training_bytes: the training step's estimated peak memory on ``device`` (the auto storage
            rule leaves it free).

    Raises:
        ConnectionError: a generator did not answer within ``connect_timeout`` (names the endpoint).
    """

    def __init__(
        self,
        data: DataConfig,
        replay: ReplayConfig | None = None,
        *,
        captions_per_rank: int,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        training_bytes: int = 0,
        client_name: str = "stablerep-train",
    ) -> None:
        # Endpoints present, capacity given one way at most: checked once, with the run's config.
        self.endpoints = [data.generators] if isinstance(data.generators, str) else list(data.generators)
        self.replay_config = replay if replay is not None else ReplayConfig()
        self.captions_per_rank = int(captions_per_rank)
        self.draw_per_caption = int(data.draw_per_caption)
        self.device = torch.device(device)
        self.sample_timeout = float(data.sample_timeout)
        self._training_bytes = int(training_bytes)
        self._seed = seed + 1000 * rank
        self._image_size = data.image_size
        self._images_per_group: int | None = None
        self.replay: ReplayBuffer | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._pending_state: dict | None = None
        self._resized_groups = 0
        self._repeat_warned = False
        self._unseen_warned = False
        self._added_since_check = 0
        self._started_at = time.monotonic()
        curve = None
        if data.curve_keys:
            from protocol.curve import CurveClient

            curve = CurveClient(data.curve_keys)
        self.client = GroupClient(
            self.endpoints, self._on_group, client_name=client_name, rank=rank, world_size=world_size,
            credits=data.credits, connect_timeout=data.connect_timeout, curve=curve,
        )
        self.watch = GeneratorWatch(data.generator_timeout, self.client.last_groups)
        try:
            self.client.start()
        except ConnectionError as exc:
            raise ConnectionError(
                f"online source: no generator reachable at {', '.join(self.endpoints)} within "
                f"{data.connect_timeout:g} s ({exc})"
            ) from exc
        except ProtocolError as exc:  # a welcome this trainer cannot use (wrong version, bad fields)
            raise ConnectionError(f"online source: {exc.message}") from None
        self._configure_from_welcomes()

    @classmethod
    def from_config(cls, data: DataConfig, replay: ReplayConfig, context: SourceContext) -> "OnlineSource":
        """The source a training process draws from (``data.source = "online"``)."""
        return cls(data, replay, captions_per_rank=context.captions_per_rank, device=context.device,
                   rank=context.rank, world_size=context.world_size, seed=context.seed,
                   training_bytes=context.training_bytes_estimate())

    # ----- buffer setup ---------------------------------------------------------------------
    def _configure_from_welcomes(self) -> None:
        """Size the buffer from the generators' descriptions, before any group arrives."""
        infos = {url: w.generator for url, w in self.client.welcomes.items()}
        if not infos:
            self.close()
            raise ConnectionError(f"online source: no welcome from {', '.join(self.endpoints)}")
        # several generators with different fingerprints: namespace their caption ids (caption_ids.py)
        self._namespaced = needs_namespacing(info.fingerprint for info in infos.values())
        heartbeat_s = max(w.heartbeat_ms for w in self.client.welcomes.values()) / 1000.0
        self.feedback = SourceFeedback(self.client, {url: info.fingerprint for url, info in infos.items()}, heartbeat_s,
                                       origins_limit=max(32 * self.captions_per_rank, 4096))
        #: (images per group, image side) each service announced: a group must match one of them
        self._announced = {(info.images_per_group, info.save_size) for info in infos.values()}
        counts = {url: info.images_per_group for url, info in infos.items()}
        self._images_per_group = min(counts.values())
        if self._images_per_group < self.draw_per_caption:
            url = min(counts, key=counts.get)
            self.close()
            raise ValueError(
                f"generator {url} serves {counts[url]} images per group, fewer than "
                f"draw_per_caption={self.draw_per_caption}"
            )
        side = self._image_size or max(info.save_size for info in infos.values())
        try:
            with self._lock:
                self._allocate(side, side)
        except ValueError:
            self.close()
            raise

    def _allocate(self, height: int, width: int) -> None:
        """Create the replay buffer (lock held)."""
        per_group = self._images_per_group * height * width * 3
        r = self.replay_config
        if r.capacity_groups is not None:
            capacity = int(r.capacity_groups)
        elif r.capacity_gib is not None:
            capacity = ReplayBuffer.capacity_for_bytes(int(r.capacity_gib * 2**30), self._images_per_group, height, width)
            if capacity < 1:
                raise ValueError(f"--replay-gib {r.capacity_gib} holds no group of {per_group} bytes")
        else:
            capacity = max(DEFAULT_CAPACITY_FACTOR * self.captions_per_rank, 64)
        if capacity < self.captions_per_rank:
            raise ValueError(
                f"replay capacity of {capacity} groups is smaller than the {self.captions_per_rank} captions of a batch"
            )
        storage_device = choose_storage_device(r.storage, self.device, capacity * per_group, self._training_bytes)
        try:
            self.replay = ReplayBuffer(capacity, self._images_per_group, height, width, device=storage_device,
                                       policy=r, seed=self._seed)
        except (RuntimeError, MemoryError) as exc:  # sizes come from the generators' welcome
            raise ValueError(
                f"replay buffer of {capacity} groups x {self._images_per_group} images of {height}x{width} "
                f"({capacity * per_group / 2**30:.1f} GiB on {storage_device}) cannot be allocated: "
                f"{str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__} "
                "(set --replay-capacity / --replay-gib or --image-size)") from None
        if self._pending_state is not None:
            self.replay.load_state_dict(self._pending_state)
            self._pending_state = None
        self._ready.set()

    # ----- I/O thread -----------------------------------------------------------------------
    def _check_repeats(self) -> None:
        """Warn once when many arrivals repeat held ids: generators that serve the same captions
        with the same seed send the same ids for the same images, and all but one copy is dropped."""
        if self._repeat_warned or self.replay is None:
            return
        stats = self.replay.stats()
        received = self.client.stats().groups_received
        if stats["repeats"] >= REPEAT_WARNING_COUNT and stats["repeats"] >= REPEAT_WARNING_SHARE * received:
            self._repeat_warned = True
            log.warning(
                "%d of %d received groups repeated a group id already held and were dropped: do the "
                "generators serve the same captions with the same seed? Give each its own --shard i/N "
                "(or its own --seed)", stats["repeats"], received)

    def _check_unseen_evictions(self) -> None:
        """Warn once when most groups leave the buffer never drawn: the generators make far more than
        this trainer draws, and the surplus costs their compute (and, on one machine, the trainer's CPU)."""
        self._added_since_check += 1
        if self._unseen_warned or self.replay is None or self._added_since_check < 64:
            return
        self._added_since_check = 0  # the counters are read every 64 added groups, not for every one
        stats = self.replay.stats()
        unseen, evicted = stats["evicted_unused"], stats["evicted"]
        if unseen >= UNSEEN_WARNING_COUNT and unseen >= UNSEEN_WARNING_SHARE * evicted:
            self._unseen_warned = True
            log.warning(
                "%d of %d groups evicted from the replay buffer were never drawn: the generators make groups "
                "faster than this trainer draws them (%d per step). Throttle them to about what it draws "
                "(stablerep-generator --max-groups-per-s R), or draw more: a larger --captions-per-step or "
                "--replay-capacity", unseen, evicted, self.captions_per_rank)

    def _on_group(self, group: Any) -> None:
        """Called by the client's I/O thread for every received group."""
        if self._error is not None:  # already failed: next_batch reports it; drop quietly
            return
        try:
            # The buffer is sized from the welcomes right after the handshake; a group can only
            # overtake that by a moment.
            if self.replay is None and not self._ready.wait(self.sample_timeout):
                raise GroupStreamError(f"group {group.group_id} arrived but the replay buffer was never sized")
            if self.replay is None:
                return  # failed while sizing: next_batch reports it
            service_caption_id = group.caption_id
            if getattr(self, "_namespaced", False):
                group.caption_id = namespaced_caption_id(f"generator:{group.generator}", group.caption_id)
            if not self.replay.add(self._fit(group)):
                self._check_repeats()
            else:
                self.feedback.note(group.caption_id, service_caption_id, group.generator)
                self._check_unseen_evictions()
        except BadGroup:  # skipped: the client counts it, tells the service and gives the credit back
            raise
        except BaseException as exc:  # surfaced by next_batch on the training thread
            if self._error is None:
                self._error = exc
            self._ready.set()
            if self.replay is not None:
                self.replay.close()  # wakes a next_batch waiting in sample()
            raise

    def _fit(self, group: Any) -> Any:
        """The group as the buffer stores it: its shape checked against what the services announced
        (``BadGroup`` otherwise), encoded images decoded (each checked for its announced size before
        any pixel is decoded), and images of another size than the buffer's resized (antialiased bilinear)."""
        replay = self.replay
        m, height, width, _ = group.shape
        if height != width or (m, height) not in self._announced:
            announced = ", ".join(f"{n} x {side}x{side}" for n, side in sorted(self._announced))
            raise BadGroup(f"group {group.group_id[:80]!r} holds {m} x {height}x{width} images; "
                           f"the services announced {announced}")
        images = getattr(group, "images", None)
        if images is None:
            decoded = []
            for i, data in enumerate(group.encoded[: replay.images_per_group]):
                try:
                    decoded.append(decode_image_of_size(data, height, width))
                except ValueError as exc:
                    raise BadGroup(f"group {group.group_id[:80]!r}: image {i} {exc}") from None
            images = np.stack(decoded)
            group = dataclasses.replace(group, images=images, encoded=None, encoding="raw", shape=tuple(images.shape))
        if tuple(images.shape[1:3]) == (replay.height, replay.width):
            return group
        x = torch.from_numpy(np.array(images, dtype=np.float32)).permute(0, 3, 1, 2)  # a copy: frames are read-only
        x = F.interpolate(x, size=(replay.height, replay.width), mode="bilinear", antialias=True, align_corners=False)
        resized = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        self._resized_groups += 1
        return dataclasses.replace(group, images=resized, shape=tuple(resized.shape))

    # ----- source interface -----------------------------------------------------------------
    def next_batch(self) -> Batch:
        """Draw ``G`` groups x ``n`` images: ``Batch.images`` uint8 ``[G, n, H, W, 3]``."""
        if not self._ready.wait(self.sample_timeout):
            raise TimeoutError(
                f"online source: no group arrived from {', '.join(self.endpoints)} within {self.sample_timeout:g} s"
            )
        self._raise_if_failed()
        deadline = time.monotonic() + self.sample_timeout
        while True:
            # Wait in slices, so that a stall of every generator ends the wait (GeneratorsSilentError).
            left = deadline - time.monotonic()
            wait = max(0.05, min(left, self.watch.seconds_left() + 0.05, self.watch.timeout_s / 6))
            try:
                return self.replay.sample(self.captions_per_rank, self.draw_per_caption, timeout=wait)
            except ReplayBufferClosed:
                self._raise_if_failed()
                raise
            except TimeoutError:
                silent = self.silent_generators()
                if silent is not None:
                    raise GeneratorsSilentError(silent) from None
                if wait >= left:
                    raise

    def send_feedback(self, scores: dict[int, float] | None) -> None:
        """Tell the services that served them how hard these captions are (batch caption id -> score,
        e.g. ``CaptionDifficulty.flush()``; None: nothing new). Called by the training loop every step:
        messages go out paced (`trainer.data.sources.caption_feedback`)."""
        self.feedback.send(scores, time.monotonic())

    def silent_generators(self) -> str | None:
        """``None`` while a generator delivered within ``generator_timeout``; else why the run should stop."""
        return self.watch.check()

    def _raise_if_failed(self) -> None:
        if self.client.failed is not None:
            raise GroupStreamError(f"online source: the group client stopped: {self.client.failed}") from self.client.failed
        if self._error is not None:
            raise GroupStreamError(f"online source: receiving groups failed: {self._error}") from self._error

    def groups_received(self) -> int:
        """Caption groups inserted into this rank's replay buffer so far (``added``: repeats and groups
        it dropped are not counted; kept across a resume). The k-NN monitor's ``groups_received``."""
        replay = self.replay
        return int(replay.stats()["added"]) if replay is not None else 0

    def stats(self) -> dict[str, Any]:
        """Replay counters (reuse, staleness, stall, freshness) plus client counters."""
        out: dict[str, Any] = dict(self.replay.stats()) if self.replay is not None else {}
        client = self.client.stats()
        out.update(
            groups_received=client.groups_received,
            mib_received=client.bytes_received / 2**20,
            callback_errors=client.callback_errors,
            reconnects=client.reconnects,
            bad_messages=client.bad_messages,
            bad_groups=client.bad_groups,
            groups_resized=self._resized_groups,
            handler_errors=client.handler_errors,
        )
        elapsed = time.monotonic() - self._started_at
        out["groups_per_s"] = client.groups_received / elapsed if elapsed > 0 else 0.0
        if self.replay is not None:
            out["storage"] = str(self.replay.device)
        out.update(self.feedback.counts())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"replay": self.replay.state_dict() if self.replay is not None else self._pending_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        replay_state = state.get("replay")
        if replay_state is None:
            return
        with self._lock:
            if self.replay is None:
                self._pending_state = replay_state
            else:
                self.replay.load_state_dict(_merge_replay_state(replay_state, self.replay.state_dict()))

    def close(self) -> None:
        self.client.close()
        if self.replay is not None:
            self.replay.close()


def _merge_replay_state(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Saved counters plus those of the groups that arrived since this process started.

    Groups stream in as soon as the client connects, possibly before a checkpoint's counters are
    restored: cumulative counters add up (so the insertion sequence stays ahead of every stored
    group), maxima take the larger value, and the sampling RNG comes from the checkpoint.
    """
    counters = dict(saved["counters"])
    for key, value in current["counters"].items():
        if key not in counters:
            continue
        if key.endswith("_max") or key.endswith("_max_s"):
            counters[key] = max(counters[key], value)
        elif not key.endswith("_last"):
            counters[key] = counters[key] + value
    return {**saved, "counters": counters}
