"""The generation run: caption set -> work items -> worker pool -> shards and/or the online server.

Modes (``ServiceOptions``):

- offline (``out``): one pass over the caption set into shards; a rerun resumes, skipping the
  groups already listed in ``OUT/manifest.json``.
- online (``bind``): protocol v1 through ``protocol.server.GroupServer``. The caption set is cycled
  in epochs without end (until ``max_groups`` or a stop signal); epoch ``e`` of caption ``c`` uses
  image indices ``e*m .. e*m+m-1`` of that caption's seed stream, so every epoch brings fresh images
  and epoch 0 equals the offline pass. ``archive`` also writes every served group to shards.
  ``state`` (default: the archive directory) keeps the run's position on disk
  (``generator_service.online_state``), so a restart serves new groups instead of epoch 0 again.
  ``caption_policy`` picks the caption of each position (``generator_service.caption_policy``:
  ``uniform``, the walk above, or ``hard``, steered by the trainers' ``feedback``); the server
  merges the feedback, ``CaptionSteering`` feeds it to the policy, and the state file keeps the
  policy and its scores. An epoch of a caption counts its groups handed out, whichever the policy.
- ``bind`` and ``out`` together: one pass, each group both served and written.

Group ids are ``{fingerprint[:8]}-{caption_id:09d}`` (epoch 0) and ``...-e{epoch}`` after, with
``-s{seed}`` appended for a base seed other than 0, so a rerun never writes a group twice and two
services that differ only in ``--seed`` (different images of the same captions) never share an id
(a trainer drops repeated ids).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from generator_service.caption_policy import CaptionPolicyConfig, build_policy
from generator_service.caption_steering import CaptionSteering
from generator_service.captions import CaptionSet
from generator_service.config import GeneratorConfig
from generator_service.online_state import OnlineState, RunIdentity
from generator_service.pool import GroupSink, PoolStats, StopSignal, WorkerPool, WorkItem
from generator_service.seeds import image_seed
from generator_service.shards import ShardWriter, staging_dir
from infra import storage
from generator_service.sinks import FanOutSink, PreviewSink, ServerSink, ShardSink
from protocol.feedback import FeedbackBoard

log = logging.getLogger(__name__)


def group_id_for(fingerprint: str, caption_id: int, epoch: int = 0, base_seed: int = 0) -> str:
    """Stable group id of caption ``caption_id`` in ``epoch`` under ``base_seed`` (no dots: it is the
    WebDataset key). Ids of base seed 0 carry no seed part (the ids of earlier versions)."""
    base = f"{fingerprint[:8]}-{caption_id:09d}"
    if epoch:
        base = f"{base}-e{epoch}"
    return base if base_seed == 0 else f"{base}-s{base_seed}"


def epoch_seeds(base_seed: int, caption_id: int, epoch: int, images_per_group: int) -> list[int]:
    """Seeds of a caption's group in ``epoch``: images ``e*m .. e*m+m-1`` of its seed stream."""
    first = epoch * images_per_group
    return [image_seed(base_seed, caption_id, first + j) for j in range(images_per_group)]


def work_items(
    captions: CaptionSet,
    fingerprint: str,
    base_seed: int,
    images_per_group: int,
    epochs: int | None = 1,
    skip_group_ids: set[str] | frozenset[str] = frozenset(),
    positions: Iterable[int] | None = None,
    draw: Callable[[int], tuple[int, int]] | None = None,
) -> Iterator[WorkItem]:
    """Work items over ``captions`` for ``epochs`` passes (``None``: endless), skipping done groups.

    ``positions`` (endless runs only) gives the places in the sequence "epoch 0 of every caption,
    epoch 1, ..." to visit instead of ``0, 1, 2, ...``: position ``p`` is caption ``p % N`` of epoch
    ``p // N`` (``generator_service.online_state`` hands them out so that a restart goes on), unless
    ``draw(p) -> (index, epoch)`` (a caption policy, endless runs) says which caption and epoch it is.
    """
    if positions is not None and epochs is not None:
        raise ValueError("positions apply to endless runs (epochs=None)")
    count = len(captions)
    if count == 0:
        return
    if positions is None:
        positions = itertools.count() if epochs is None else range(epochs * count)
    for position in positions:
        if draw is not None:
            index, epoch = draw(position)
        else:
            epoch, index = divmod(position, count)
        caption_id, caption = captions[index]
        group_id = group_id_for(fingerprint, caption_id, epoch, base_seed)
        if group_id not in skip_group_ids:
            yield WorkItem(group_id, caption_id, caption, epoch_seeds(base_seed, caption_id, epoch, images_per_group), epoch)


# --- the run ------------------------------------------------------------------------------------


@dataclass
class ServiceOptions:
    """One generation run (the CLI fills this from its flags)."""

    config: GeneratorConfig
    captions: CaptionSet
    devices: list[str]
    seed: int = 0
    worker_batch: int = 8
    out: str | None = None
    archive: str | None = None
    bind: str | None = None
    queue: int = 64
    heartbeat_ms: int = 1000
    shard_size: int = 1000
    image_format: str = "png"
    quality: int = 95
    max_groups: int | None = None
    preview: str | None = None
    preview_groups: int = 8
    drain_timeout: float = 300.0
    max_groups_per_s: float | None = None  # throttle (generator_service.throttle); None: as fast as the devices go
    max_credit: int = 256
    max_clients: int = 64
    max_client_mib: float = 512.0
    announce_host: bool = False
    curve_keys: str | None = None  # require CurveZMQ with this key directory (protocol.curve)
    state: str | None = None  # endless online runs: keep the position here (default: the --archive directory or its staging)
    caption_policy: CaptionPolicyConfig = field(default_factory=CaptionPolicyConfig)  # endless online runs

    def __post_init__(self) -> None:
        if self.state and not (self.bind and not self.out):
            raise ValueError("--state DIR applies to endless online runs (--bind without --out); "
                             "an --out run resumes from its manifest")
        if self.archive and not self.bind:
            raise ValueError("--archive DIR writes the groups served online; without --bind use --out DIR")
        if not (self.out or self.bind):
            raise ValueError("nothing to do: give --out DIR (offline shards) and/or --bind ENDPOINT (online)")
        if self.curve_keys and not self.bind:
            raise ValueError("--curve-keys DIR secures the online server; give --bind ENDPOINT too")
        if self.archive and self.out:
            raise ValueError("give either --out DIR or --archive DIR, not both (they write the same shards)")
        if self.caption_policy.name != "uniform" and self.epochs is not None:
            raise ValueError(f"--caption-policy {self.caption_policy.name} applies to endless online runs (--bind "
                             "without --out); one pass over the captions walks them in order")
        if self.max_groups is not None and self.max_groups < 1:
            raise ValueError(f"--max-groups must be >= 1, got {self.max_groups}")
        if self.queue < 1:
            raise ValueError(f"--queue must be >= 1, got {self.queue}")
        if self.max_groups_per_s is not None and not self.max_groups_per_s > 0:
            raise ValueError(f"--max-groups-per-s must be > 0, got {self.max_groups_per_s}")

    @property
    def shard_dir(self) -> str | None:
        return self.out or self.archive

    @property
    def state_dir(self) -> str | None:
        """Where an endless online run keeps its position: ``--state``, else ``--archive`` (a remote
        archive: its local staging folder, ``shards.staging_dir``, so a restart on this machine goes on)."""
        if self.epochs is not None:
            return None
        if self.state or not self.archive:
            return self.state
        return str(staging_dir(self.archive) / REMOTE_ARCHIVE_STATE) if storage.is_remote(self.archive) else self.archive

    @property
    def epochs(self) -> int | None:
        """Passes over the caption set: endless online (without --out), one otherwise."""
        return None if self.bind and not self.out else 1


@dataclass
class RunResult:
    stats: PoolStats
    endpoint: str | None
    shard_dir: str | None
    groups_written: int
    skipped_done: int
    server: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "groups": s.groups_delivered,
            "images": s.images_delivered,
            "seconds": round(s.elapsed_s, 3),
            "images_per_second": round(s.images_per_second, 3),
            "restarts": s.restarts,
            "duplicates_dropped": s.duplicates_dropped,
            "requeued": s.requeued,
            "undelivered_at_stop": s.settled_at_stop,
            "endpoint": self.endpoint,
            "shard_dir": self.shard_dir,
            "groups_written": self.groups_written,
            "skipped_already_done": self.skipped_done,
            "workers": s.workers,
            "server": self.server,
        }


def captions_digest(captions: CaptionSet) -> str:
    """Short hash of a caption set's ids and texts: a rerun into the same shards must use the same captions."""
    digest = hashlib.sha256()
    for caption_id, caption in captions:
        digest.update(f"{caption_id}\t{caption}\n".encode("utf-8"))
    return digest.hexdigest()[:16]


def service_id(announce_host: bool = False) -> str:
    """Name sent in ``welcome``: host name and pid only when asked (``--announce-host``)."""
    return f"stablerep-generator@{socket.gethostname()}:{os.getpid()}" if announce_host else "stablerep-generator"


def run_service(
    options: ServiceOptions,
    stop: StopSignal | None = None,
    on_tick: Callable[[WorkerPool, Any], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run generation as ``options`` say until done, ``max_groups`` or ``stop``.

    ``on_start(info)`` is called once the outputs are open (``info``: endpoint, to-do count);
    ``on_tick(pool, server)`` on every supervisor iteration (progress displays, metrics), and while a
    finished online run still serves its queue.
    """
    config = options.config
    fingerprint = config.fingerprint()
    stop = stop or StopSignal()
    writer: ShardWriter | None = None
    server = None
    sinks: list[GroupSink] = []
    preview = PreviewSink(options.preview, options.preview_groups) if options.preview else None
    if preview is not None:
        sinks.append(preview)
    skip: set[str] = set()
    state: OnlineState | None = None
    steering = _steering(options)
    try:
        state = _open_state(options, fingerprint, steering)
        if options.shard_dir:
            writer = _open_writer(options)
            skip = set(writer.done_group_ids)
            sinks.append(ShardSink(writer))
        if options.bind:
            server = _start_server(options, steering.board if steering is not None else None)
            sinks.append(ServerSink(server))
        items, todo, skipped = _work_plan(options, fingerprint, skip, state, stop, steering)
        if skipped:
            log.info("%d group(s) already in %s are skipped", skipped, options.shard_dir)
        if on_start is not None:
            on_start({"endpoint": server.endpoint if server else None, "todo": todo, "skipped": skipped,
                      "fingerprint": fingerprint})
        pool = WorkerPool(
            config,
            fingerprint,
            options.devices,
            worker_batch=options.worker_batch,
            drain_timeout=options.drain_timeout,
            log_level=logging.getLogger().getEffectiveLevel(),
            # Shards only: workers encode the images in parallel instead of the supervisor.
            image_codec=(options.image_format, options.quality) if options.out and not options.bind else None,
        )

        waiting = ClientWaitNotice(server) if server is not None else None

        def tick(p: WorkerPool) -> None:
            if server is not None:
                server.check()  # the I/O thread died: stop the run, exit non-zero
                waiting.check()
            if steering is not None:
                steering.tick()
            if on_tick is not None:
                on_tick(p, server)

        stats = pool.run(items, FanOutSink(sinks), stop=stop, on_tick=tick)
        if server is not None and not stop.requested:
            _wait_until_sent(server, stop, on_tick=lambda: tick(pool))
        if preview is not None:
            preview.write()
        return RunResult(
            stats=stats,
            endpoint=server.endpoint if server else None,
            shard_dir=options.shard_dir,
            groups_written=writer.groups_written if writer else 0,
            skipped_done=skipped,
            server=_server_summary(server) if server else None,
        )
    finally:
        if state is not None:
            state.close()
        if writer is not None:
            writer.close()
        if server is not None:
            server.close()


def _steering(options: ServiceOptions) -> CaptionSteering | None:
    """The caption policy of an endless online run, with the board the server merges feedback into
    (None for a pass over the captions). Its state file is set by ``_open_state``."""
    if options.epochs is not None:
        return None
    policy = build_policy(options.caption_policy, options.captions.caption_ids, options.seed)
    return CaptionSteering(policy, FeedbackBoard(frozenset(options.captions.caption_ids)))


#: the state folder of an endless run with a remote ``--archive`` and no ``--state``, inside the archive's staging folder
REMOTE_ARCHIVE_STATE = "online-state"


def _open_state(options: ServiceOptions, fingerprint: str, steering: CaptionSteering | None = None) -> OnlineState | None:
    """The online position file of an endless run with a state folder (None without one); it keeps
    ``steering``'s policy, restored from it."""
    if not options.state_dir:
        if options.epochs is None:
            log.warning("no --state DIR (or --archive DIR): a restart of this service serves the same group ids and "
                        "seeds again from epoch 0, and a trainer that saw them drops them as repeats")
        return None
    if options.archive and not options.state and storage.is_remote(options.archive):
        log.warning("--archive %s without --state: the online position is kept on this machine, in %s; give --state "
                    "DIR on shared storage to restart this service elsewhere", options.archive, options.state_dir)
    state = OnlineState(options.state_dir, RunIdentity(
        fingerprint=fingerprint, seed=options.seed, images_per_group=options.config.images_per_group,
        captions_digest=captions_digest(options.captions), caption_count=len(options.captions),
    ), policy_state=steering.policy.state_dict if steering is not None else None)
    if steering is not None:
        steering.state = state
    state.open()
    if steering is not None:
        steering.restore()
    if state.restarts:
        log.info("online state %s: restart %d, continuing at position %d (epoch %d)", state.path,
                 state.restarts, state.start_position, state.start_position // max(1, len(options.captions)))
    return state


def _open_writer(options: ServiceOptions) -> ShardWriter:
    """The shard writer of ``options.shard_dir``, opened (it knows the groups already written)."""
    return ShardWriter(
        options.shard_dir,
        options.config,
        shard_size=options.shard_size,
        image_format=options.image_format,
        quality=options.quality,
        run={
            "seed": options.seed,
            "images_per_group": options.config.images_per_group,
            "caption_shard": list(options.captions.shard),
            "captions_digest": captions_digest(options.captions),
        },
    ).open()


def _start_server(options: ServiceOptions, feedback: FeedbackBoard | None = None):
    """The protocol v1 server bound at ``options.bind`` (CurveZMQ with ``options.curve_keys``), started;
    trainers' ``feedback`` is merged into ``feedback`` (None: refused, as by a service without it)."""
    from protocol.server import GroupServer

    curve = None
    if options.curve_keys:
        from protocol.curve import CurveServer

        curve = CurveServer(options.curve_keys)
    return GroupServer(
        options.bind, service_id(options.announce_host), options.config.welcome_info(),
        heartbeat_ms=options.heartbeat_ms, max_queue=options.queue, max_credit=options.max_credit,
        max_clients=options.max_clients, max_client_bytes=int(options.max_client_mib * 2**20), curve=curve,
        feedback=feedback,
    ).start()


def _work_plan(options: ServiceOptions, fingerprint: str, skip: set[str], state: OnlineState | None,
               stop: StopSignal, steering: CaptionSteering | None = None) -> tuple[Iterator[WorkItem], int | None, int]:
    """``(items, todo, skipped)``: the work items (capped and throttled as ``options`` say), how many
    groups that is when known, and how many of the first pass are already done (in ``skip``)."""
    m = options.config.images_per_group
    items: Iterator[WorkItem] = work_items(options.captions, fingerprint, options.seed, m, options.epochs, skip,
                                           positions=state.positions() if state is not None else None,
                                           draw=steering.draw if steering is not None else None)
    remaining = sum(1 for caption_id, _ in options.captions if group_id_for(fingerprint, caption_id, 0, options.seed) not in skip)
    skipped = len(options.captions) - remaining
    todo = remaining if options.epochs is not None else None
    if options.max_groups is not None:
        items = itertools.islice(items, options.max_groups)
        todo = options.max_groups if todo is None else min(todo, options.max_groups)
    if options.max_groups_per_s is not None:
        from generator_service.throttle import throttled

        items = throttled(items, options.max_groups_per_s, stop)
    return items, todo, skipped


class ClientWaitNotice:
    """Says so (log, once per wait) when groups are ready and no client is connected, so a service
    with nothing to do is seen waiting for a trainer rather than hanging; and says when one came."""

    def __init__(self, server: Any, after_s: float = 2.0) -> None:
        self.server, self.after_s = server, after_s
        self.idle_since: float | None = None
        self.announced = False

    def check(self) -> None:
        stats = self.server.stats()
        if stats.clients:
            if self.announced:
                log.info("a client connected; serving")
            self.idle_since, self.announced = None, False
            return
        if stats.queue_depth == 0:
            return
        now = time.monotonic()
        if self.idle_since is None:
            self.idle_since = now
        elif not self.announced and now - self.idle_since >= self.after_s:
            self.announced = True
            log.warning("waiting for a client: %d group(s) ready at %s and no trainer connected "
                        "(start one with: stablerep-train --source online --generators %s ...)",
                        stats.queue_depth, self.server.endpoint, self.server.endpoint)


def _wait_until_sent(server: Any, stop: StopSignal, poll_s: float = 0.1,
                     on_tick: Callable[[], None] | None = None) -> None:
    """After a finite run, keep serving until every queued group went to a client (or stop);
    ``on_tick()`` every poll, so status lines and metrics stay current meanwhile.

    Then keep serving while groups are still unacknowledged, until no client has died for three
    heartbeat intervals: a client that dies re-queues its groups, and they go to another one.
    """
    settle_s = 3 * server.heartbeat_ms / 1000.0
    quiet_since: float | None = None
    requeued = server.stats().requeued
    while not stop.requested:
        server.check()
        if on_tick is not None:
            on_tick()
        stats = server.stats()
        if stats.queue_depth > 0 or stats.requeued != requeued:
            requeued, quiet_since = stats.requeued, None
        elif server.unacked() == 0:
            return
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > settle_s:
            return
        time.sleep(poll_s)


def _server_summary(server: Any) -> dict[str, Any]:
    stats = server.stats()
    return {
        "groups_sent": stats.groups_sent,
        "queue_depth": stats.queue_depth,
        "bad_messages": stats.bad_messages,
        "dead_clients": stats.dead_clients,
        "left_clients": stats.left_clients,
        "refused_clients": stats.refused_clients,
        "evicted_clients": stats.evicted_clients,
        "unknown_acks": stats.unknown_acks,
        "credit_clamped": stats.credit_clamped,
        "requeued": stats.requeued,
        "handler_errors": stats.handler_errors,
        "put_wait_seconds": round(stats.put_wait_seconds, 3),
        "auth_refused": stats.auth_refused,
        "feedback_merged": stats.feedback_merged,
        "feedback_rate_limited": stats.feedback_rate_limited,
        "feedback_unknown_ids": stats.feedback_unknown_ids,
    }
