"""Fixed-capacity replay buffer of fresh caption groups in preallocated uint8 storage.

The online source receives groups on its network thread and calls :meth:`ReplayBuffer.add`; the
training loop calls :meth:`ReplayBuffer.sample` for each step. Storage is allocated once:
``[capacity, images_per_group, H, W, 3]`` uint8, in pinned host memory (when CUDA is available;
page-locked exactly, `trainer.data.replay_storage`) or directly in GPU memory. On CUDA, slots are
written on a copy stream of the storage's device, with that device current in the writing thread
(a thread starts on device 0: without it every rank would open a context on GPU 0). A group's pixels are copied exactly once, from the received frame into its
slot; a batch is gathered from storage with one ``index_select``.

Policies (the ``replay`` config group, `trainer.data.config.ReplayConfig`, read here and nowhere else):

- ``evict``: which group leaves a full buffer first, one of the policies registered in
  `trainer.data.replay_evict` (``"fifo"``: the oldest; ``"most-used"``: the one drawn most often,
  ties: the oldest).
- ``max_reuse``: a group drawn that many times is never drawn again and is the first to be evicted.
- ``min_fresh``: at least ``ceil(min_fresh * G)`` groups of every batch were never drawn before.
- ``hard_fraction``: that fraction of batches is filled with caption cells (`trainer.data.caption_cells`:
  an anchor caption and up to ``cell_size - 1`` captions that differ from it in one word), the rest
  uniformly; a hard batch that cannot meet ``min_fresh`` is drawn uniformly instead.
- ``samples_per_insert`` R, ``spi_tolerance`` E: the rate contract (`trainer.data.rate_contract`): a batch of
  ``G`` waits while ``draws + G > R x added + E``, as stall time; ``rate_limited_batches`` counts such batches.

Counters: ``dropped`` counts groups refused because the buffer was closed; ``evicted_unused``
counts evicted groups that were never drawn (generation spent for nothing).
"""
from __future__ import annotations

import collections
import math
import threading
import time
import warnings
from typing import Any

import numpy as np
import torch

from protocol.errors import BadGroup
from trainer.data.batch import Batch
from trainer.data.caption_cells import caption_words
from trainer.data.config import ReplayConfig
from trainer.data.images import decode_image
from trainer.data.rate_contract import RateContract
from trainer.data.replay_evict import EVICTION_POLICIES
from trainer.data.replay_select import select_in_cells, select_uniform
from trainer.data.replay_storage import allocate_storage

# Received frames are read-only numpy views; torch only reads them (``slot.copy_(src)``).

_clock = time.monotonic  # module attribute so tests can drive time

_FREE, _WRITING, _READY = 0, 1, 2


class ReplayBufferClosed(RuntimeError):
    """Raised by :meth:`ReplayBuffer.sample` once the buffer is closed."""


class ReplayBuffer:
    """Thread-safe fixed-capacity store of caption groups.

    Args:
        capacity_groups: number of group slots ``C``.
        images_per_group: images kept per group ``P`` (extra images of a group are dropped).
        height, width: image size; every added group must match it.
        device: where storage lives (``"cpu"`` or a CUDA device).
        pin_memory: pin host storage; ``None`` pins when the storage is on the host and CUDA is available.
        policy: the sampling and eviction policy (the ``replay`` config group; its capacity and
            storage fields are not read here): ``evict`` (a name in ``EVICTION_POLICIES``),
            ``max_reuse`` (draws after which a group is retired; ``None``: unlimited), ``min_fresh``
            (fraction of each batch's groups never drawn before), ``hard_fraction`` (fraction of
            batches made of caption cells, hard negatives), ``cell_size`` (captions per cell, anchor
            included) and ``cell_words`` (the words a cell may vary, `trainer.data.caption_cells`;
            empty = any). Default: ``ReplayConfig()``.
        seed: seed of the sampling RNG.
        recent_ids: how many of the latest group ids are remembered (default ``max(4 * capacity,
            4096)``): a group whose id the buffer holds or has recently held is ignored (counted as
            ``repeats``), so the service's at-least-once delivery becomes exactly-once here.
    """

    def __init__(
        self,
        capacity_groups: int,
        images_per_group: int,
        height: int,
        width: int,
        device: str | torch.device = "cpu",
        pin_memory: bool | None = None,
        policy: ReplayConfig | None = None,
        seed: int = 0,
        recent_ids: int | None = None,
    ) -> None:
        if capacity_groups < 1 or images_per_group < 1 or height < 1 or width < 1:
            raise ValueError(
                f"ReplayBuffer needs positive sizes, got capacity_groups={capacity_groups}, "
                f"images_per_group={images_per_group}, height={height}, width={width}"
            )
        # The policy's ranges (max_reuse >= 1, min_fresh and hard_fraction in [0, 1], cell_size >= 2) are
        # checked once, where the run's config is validated (ReplayConfig.validate).
        self.policy = policy if policy is not None else ReplayConfig()
        self._evict = EVICTION_POLICIES.get(self.policy.evict)  # an unknown name fails here, naming the choices
        self.hard_fraction, self.cell_size = float(self.policy.hard_fraction), int(self.policy.cell_size)
        self.cell_words = frozenset(w.lower() for w in self.policy.cell_words)
        self.capacity = int(capacity_groups)
        self.images_per_group = int(images_per_group)
        self.height, self.width = int(height), int(width)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # other threads must name it exactly
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_reuse = self.policy.max_reuse
        self.min_fresh = float(self.policy.min_fresh)
        r, e = self.policy.samples_per_insert, self.policy.spi_tolerance
        self.contract = None if r is None else RateContract(r, e)  # None: draws wait for eligible groups only
        self._waiting = 0  # samplers blocked in sample() right now
        on_host = self.device.type == "cpu"
        if pin_memory is None:
            pin_memory = on_host and torch.cuda.is_available()
        self.pin_memory = bool(pin_memory and on_host)
        shape = (self.capacity, self.images_per_group, self.height, self.width, 3)
        #: uint8 ``[C, P, H, W, 3]``, allocated once; slots are overwritten in place.
        self.storage, self._pin_keeper = allocate_storage(shape, self.device, self.pin_memory)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # CUDA storage: per slot, an event recorded after the last gather that read it (queued on the
        # sampler's stream); the copy stream waits for it before overwriting the slot.
        self._read_done: list[Any] = [None] * self.capacity

        # Per-slot metadata (host numpy, vectorized selection).
        self._state = np.full(self.capacity, _FREE, dtype=np.int8)
        self._pins = np.zeros(self.capacity, dtype=np.int64)  # samplers gathering from the slot
        self._draws = np.zeros(self.capacity, dtype=np.int64)
        self._caption_ids = np.zeros(self.capacity, dtype=np.int64)
        self._added_at = np.zeros(self.capacity, dtype=np.float64)
        self._order = np.zeros(self.capacity, dtype=np.int64)  # insertion sequence number
        self._group_ids: list[str | None] = [None] * self.capacity
        self._captions: list[str | None] = [None] * self.capacity
        self._caption_words: list[tuple[str, ...]] = [()] * self.capacity  # caption_words, split once at add

        self._cond = threading.Condition(threading.Lock())
        self.recent_ids = max(int(recent_ids) if recent_ids is not None else max(4 * self.capacity, 4096), self.capacity)
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._closed = False
        self._rng = np.random.default_rng(seed)
        self._counters: dict[str, float] = {
            "added": 0, "evicted": 0, "evicted_unused": 0, "dropped": 0, "draws": 0, "fresh_draws": 0,
            "batches": 0, "evicted_draws_sum": 0, "evicted_draws_max": 0, "staleness_sum_s": 0.0,
            "staleness_max_s": 0.0, "stall_seconds": 0.0, "fresh_fraction_last": 0.0, "sequence": 0,
            "hard_batches": 0,
            "repeats": 0, "rate_limited_batches": 0,
        }

    @staticmethod
    def capacity_for_bytes(nbytes: int, images_per_group: int, height: int, width: int) -> int:
        """Number of group slots that fit in ``nbytes`` bytes of storage."""
        return int(nbytes) // (int(images_per_group) * int(height) * int(width) * 3)

    # ------------------------------------------------------------------ producer side
    def add(self, group: Any) -> bool:
        """Copy ``group`` (``.group_id``, ``.caption_id``, ``.caption``, ``.images`` uint8 ``[m, H, W, 3]``)
        into a slot, evicting one group when full. Groups with encoded images (``.encoded``) are decoded.
        Blocks only while every slot is being written or gathered. Returns False (and adds nothing)
        for a group id held or recently held, or when closed. Raises ``BadGroup`` (a ``ValueError``),
        storing nothing, for a group that cannot be stored (wrong image count or size, caption id
        outside int64)."""
        images = self._validated_images(group)
        group_id = str(group.group_id)
        caption_id = int(group.caption_id)
        if not 0 <= caption_id < 2**63:  # stored as int64
            raise BadGroup(f"group {group_id[:80]}: caption_id {caption_id} is outside [0, 2**63)")
        words = caption_words(str(group.caption))
        with self._cond:
            if self._closed:
                self._counters["dropped"] += 1
                return False
            if group_id in self._seen:
                self._counters["repeats"] += 1
                return False
            self._remember(group_id)
            slot = self._claim_slot()
            if slot is None:  # closed while waiting for a slot
                self._counters["dropped"] += 1
                return False
            self._state[slot] = _WRITING
        try:
            self._write_slot(slot, images, group_id)
        except BaseException:
            with self._cond:
                self._state[slot] = _FREE
                self._seen.pop(group_id, None)
                self._cond.notify_all()
            raise
        with self._cond:
            self._state[slot] = _READY
            self._draws[slot] = 0
            self._caption_ids[slot] = caption_id
            self._added_at[slot] = _clock()
            self._order[slot] = self._counters["sequence"]
            self._counters["sequence"] += 1
            self._group_ids[slot] = str(group.group_id)
            self._captions[slot] = str(group.caption)
            self._caption_words[slot] = words
            self._counters["added"] += 1
            self._cond.notify_all()
        return True

    def _remember(self, group_id: str) -> None:
        """Record ``group_id`` among the recent ids (caller holds the lock); forget the oldest beyond the bound."""
        self._seen[group_id] = None
        while len(self._seen) > self.recent_ids:
            self._seen.popitem(last=False)

    def _validated_images(self, group: Any) -> np.ndarray | list[bytes]:
        images = getattr(group, "images", None)
        expected = (self.images_per_group, self.height, self.width, 3)
        if images is None:
            encoded = getattr(group, "encoded", None)
            if not encoded:
                raise BadGroup(f"group {group.group_id}: no images (encoding={getattr(group, 'encoding', None)!r})")
            if len(encoded) < self.images_per_group:
                raise BadGroup(
                    f"group {group.group_id}: {len(encoded)} encoded images, buffer needs {self.images_per_group}"
                )
            return list(encoded[: self.images_per_group])
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise BadGroup(
                f"group {group.group_id}: images must be uint8 [m, H, W, 3], got {images.dtype} {list(images.shape)}"
            )
        m, h, w, _ = images.shape
        if m < self.images_per_group or (h, w) != (self.height, self.width):
            raise BadGroup(
                f"group {group.group_id}: images of shape {list(images.shape)} do not fit buffer slots "
                f"{list(expected)} (needs >= {self.images_per_group} images of {self.height}x{self.width})"
            )
        images = images[: self.images_per_group]
        if any(s < 0 for s in images.strides):  # torch.from_numpy refuses negative strides
            images = np.ascontiguousarray(images)
        return images

    def _write_slot(self, slot: int, images: np.ndarray | list[bytes], group_id: str) -> None:
        target = self.storage[slot]
        if isinstance(images, list):
            decoded = []
            for i, data in enumerate(images):
                try:
                    img = decode_image(data)
                except Exception as exc:
                    raise ValueError(f"group {group_id}: encoded image {i} cannot be decoded ({exc})") from exc
                if img.shape != (self.height, self.width, 3):
                    raise ValueError(f"group {group_id}: encoded image {i} has shape {list(img.shape)}, buffer "
                                     f"needs {[self.height, self.width, 3]}")
                decoded.append(img)
            images = np.stack(decoded)
        if self._copy_stream is None:  # host storage: one copy, through numpy (frames arrive read-only)
            target.numpy()[...] = images
            return
        with warnings.catch_warnings():  # torch only reads the (possibly read-only) received frame
            warnings.simplefilter("ignore", UserWarning)
            source = torch.from_numpy(images)
        # On a side stream, waited for before the slot becomes visible to samplers. The writing thread
        # (the client's I/O thread) makes the storage's device current first.
        with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
            read_done = self._read_done[slot]
            if read_done is not None:  # an earlier batch's gather may still be queued on that slot
                self._copy_stream.wait_event(read_done)
            target.copy_(source, non_blocking=True)
            self._copy_stream.synchronize()

    def _claim_slot(self) -> int | None:
        """Return a free slot, evicting per policy; waits while all slots are busy; None once closed.
        Called with the lock held."""
        while True:
            if self._closed:
                return None
            free = np.flatnonzero(self._state == _FREE)
            if free.size:
                return int(free[0])
            candidates = np.flatnonzero((self._state == _READY) & (self._pins == 0))
            if candidates.size:
                slot = self._eviction_choice(candidates)
                self._retire(slot)
                return slot
            self._cond.wait()

    def _eviction_choice(self, candidates: np.ndarray) -> int:
        order = self._order[candidates]
        if self.max_reuse is not None:
            spent = self._draws[candidates] >= self.max_reuse
            if spent.any():
                candidates, order = candidates[spent], order[spent]
                return int(candidates[np.argmin(order)])
        return int(candidates[self._evict(order, self._draws[candidates])])

    def _retire(self, slot: int) -> None:
        draws = int(self._draws[slot])
        c = self._counters
        c["evicted"] += 1
        c["evicted_unused"] += int(draws == 0)
        c["evicted_draws_sum"] += draws
        c["evicted_draws_max"] = max(c["evicted_draws_max"], draws)
        self._state[slot] = _FREE
        self._group_ids[slot] = self._captions[slot] = None
        self._caption_words[slot] = ()

    # ------------------------------------------------------------------ consumer side
    def sample(self, captions_per_rank: int, draw_per_caption: int, timeout: float | None = None) -> Batch:
        """Draw ``G = captions_per_rank`` groups of distinct captions, ``n = draw_per_caption`` images each.

        Blocks until enough eligible groups exist and the rate contract allows ``G`` more draws (the
        wait counts as stall time).

        Returns:
            Batch with images uint8 ``[G, n, H, W, 3]`` on the storage device, caption_ids int64 ``[G]``,
            and meta ``reuse_mean`` (mean earlier draws of the drawn groups) and ``fresh_fraction``.

        Raises:
            TimeoutError: not enough eligible groups within ``timeout`` seconds.
            ReplayBufferClosed: the buffer was closed.
        """
        G, n = int(captions_per_rank), int(draw_per_caption)
        if not 1 <= n <= self.images_per_group:
            raise ValueError(f"draw_per_caption must be in [1, {self.images_per_group}], got {n}")
        if not 1 <= G <= self.capacity:
            raise ValueError(f"captions_per_rank must be in [1, capacity={self.capacity}], got {G}")
        n_fresh = min(G, math.ceil(self.min_fresh * G - 1e-9))
        start = _clock()
        deadline = None if timeout is None else start + timeout
        rate_limited = False
        with self._cond:
            while True:
                if self._closed:
                    raise ReplayBufferClosed("ReplayBuffer closed while the trainer was waiting for groups")
                allowed = self._contract_allows(G)
                slots = self._select(G, n_fresh) if allowed else None
                if slots is not None:
                    break
                if not (allowed or rate_limited):
                    rate_limited = True
                    self._counters["rate_limited_batches"] += 1
                remaining = None if deadline is None else deadline - _clock()
                if remaining is not None and remaining <= 0:
                    self._counters["stall_seconds"] += _clock() - start
                    raise TimeoutError(self._starved_message(G, n_fresh, timeout) if allowed else
                                       self.contract.waited(timeout, self._counters["draws"], G, self._counters["added"]))
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1
            now = _clock()
            self._counters["stall_seconds"] += now - start
            previous = self._draws[slots].copy()
            self._draws[slots] += 1
            self._pins[slots] += 1
            staleness = now - self._added_at[slots]
            fresh = int((previous == 0).sum())
            c = self._counters
            c["draws"] += G
            c["fresh_draws"] += fresh
            c["batches"] += 1
            c["staleness_sum_s"] += float(staleness.sum())
            c["staleness_max_s"] = max(c["staleness_max_s"], float(staleness.max()))
            c["fresh_fraction_last"] = fresh / G
            caption_ids = torch.from_numpy(self._caption_ids[slots].copy())
            captions = [self._captions[s] for s in slots]
            image_choice = self._rng.random((G, self.images_per_group)).argsort(axis=1)[:, :n]
        try:
            images = self._gather(slots, image_choice)
        finally:
            with self._cond:
                if self._copy_stream is not None:  # the gather is only queued: mark when it is done reading
                    read_done = torch.cuda.Event()
                    read_done.record(torch.cuda.current_stream(self.device))
                    for slot in slots:
                        self._read_done[int(slot)] = read_done
                self._pins[slots] -= 1
                self._cond.notify_all()
        meta = {"reuse_mean": float(previous.mean()), "fresh_fraction": fresh / G}
        return Batch(images=images, caption_ids=caption_ids, captions=captions, meta=meta)  # type: ignore[arg-type]

    def _contract_allows(self, G: int) -> bool:
        """Whether the rate contract lets ``G`` more groups be drawn now (lock held)."""
        c = self._counters
        return self.contract is None or self.contract.allows(int(c["draws"]), G, int(c["added"]))

    def _select(self, G: int, n_fresh: int) -> np.ndarray | None:
        """``G`` eligible slots of distinct caption ids, ``n_fresh`` of them never drawn, in cells for a
        ``hard_fraction`` of batches (`trainer.data.replay_select`); None if not possible yet."""
        eligible = self._state == _READY
        if self.max_reuse is not None:
            eligible &= self._draws < self.max_reuse
        candidates = np.flatnonzero(eligible)
        if candidates.size < G:
            return None
        candidates = self._rng.permutation(candidates)
        if self.hard_fraction > 0 and self._rng.random() < self.hard_fraction:
            chosen = select_in_cells(candidates, self._caption_ids, self._draws, self._caption_words, G, n_fresh,
                                     self.cell_size, self.cell_words, self._rng)
            if chosen is not None:
                self._counters["hard_batches"] += 1
                return chosen
        return select_uniform(candidates, self._caption_ids, self._draws, G, n_fresh, self._rng)

    def _gather(self, slots: np.ndarray, image_choice: np.ndarray) -> torch.Tensor:
        """One ``index_select`` over storage seen as ``[C * P, H * W * 3]`` rows (whole-image row copies)
        into a fresh ``[G, n, H, W, 3]`` tensor (pinned when the storage is)."""
        G, n = image_choice.shape
        row_index = torch.from_numpy(slots[:, None] * self.images_per_group + image_choice).reshape(-1)
        rows = self.storage.view(self.capacity * self.images_per_group, -1)
        out = torch.empty(
            (G, n, self.height, self.width, 3), dtype=torch.uint8, device=self.device, pin_memory=self.pin_memory
        )
        torch.index_select(rows, 0, row_index.to(self.device, non_blocking=True), out=out.view(G * n, -1))
        return out

    def _starved_message(self, G: int, n_fresh: int, timeout: float | None) -> str:
        ready = self._state == _READY
        eligible = ready if self.max_reuse is None else ready & (self._draws < self.max_reuse)
        fresh = eligible & (self._draws == 0)
        return (
            f"ReplayBuffer.sample waited {timeout}s for {G} groups of distinct captions ({n_fresh} never drawn); "
            f"the buffer holds {int(ready.sum())}/{self.capacity} groups, {int(eligible.sum())} eligible over "
            f"{np.unique(self._caption_ids[eligible]).size} captions, {int(fresh.sum())} never drawn. "
            f"Is the generator producing (groups added so far: {int(self._counters['added'])})?"
        )

    # ------------------------------------------------------------------ bookkeeping
    def held_groups(self) -> list[dict[str, Any]]:
        """The groups in the buffer, oldest first: ``group_id``, ``caption_id``, ``draws``."""
        with self._cond:
            slots = np.flatnonzero(self._state == _READY)
            slots = slots[np.argsort(self._order[slots])]
            return [
                {"group_id": self._group_ids[s], "caption_id": int(self._caption_ids[s]), "draws": int(self._draws[s])}
                for s in slots
            ]

    def __len__(self) -> int:
        with self._cond:
            return int((self._state == _READY).sum())

    def stats(self) -> dict[str, float]:
        """Counters and reuse / staleness / freshness / stall numbers (see the module docstring)."""
        with self._cond:
            c = self._counters
            ready = self._state == _READY
            size = int(ready.sum())
            live_draws = self._draws[ready]
            seen = size + int(c["evicted"])
            draws = int(c["draws"])
            return {
                "size": size,
                "capacity": self.capacity,
                "added": int(c["added"]),
                "evicted": int(c["evicted"]),
                "evicted_unused": int(c["evicted_unused"]),
                "dropped": int(c["dropped"]),
                "repeats": int(c["repeats"]),
                "draws": draws,
                "batches": int(c["batches"]),
                "hard_batches": int(c["hard_batches"]),
                "reuse_mean": (float(live_draws.sum()) + c["evicted_draws_sum"]) / seen if seen else 0.0,
                "reuse_max": int(max(int(live_draws.max()) if size else 0, int(c["evicted_draws_max"]))),
                "staleness_mean_s": c["staleness_sum_s"] / draws if draws else 0.0,
                "staleness_max_s": float(c["staleness_max_s"]),
                "fresh_fraction_last": float(c["fresh_fraction_last"]),
                "fresh_fraction_cumulative": c["fresh_draws"] / draws if draws else 0.0,
                "stall_seconds": float(c["stall_seconds"]),
                "rate_limited_batches": int(c["rate_limited_batches"]),
                "samplers_waiting": self._waiting,
            }

    def state_dict(self) -> dict[str, Any]:
        """Counters, RNG state and the recent group ids (the images themselves are not checkpointed)."""
        with self._cond:
            return {"counters": dict(self._counters), "rng": self._rng.bit_generator.state, "recent_ids": list(self._seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._cond:
            missing = {"counters", "rng"} - set(state)
            if missing:
                raise KeyError(f"ReplayBuffer state is missing {sorted(missing)}")
            unknown = set(state["counters"]) - set(self._counters)
            if unknown:
                raise KeyError(f"ReplayBuffer state has unknown counters {sorted(unknown)}")
            self._counters.update(state["counters"])
            self._rng.bit_generator.state = state["rng"]
            for group_id in state.get("recent_ids", []):
                self._remember(str(group_id))

    def close(self) -> None:
        """Refuse further groups and wake blocked samplers with :class:`ReplayBufferClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
