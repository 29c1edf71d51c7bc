"""Version and size limits of wire protocol v1."""
from __future__ import annotations

PROTOCOL_VERSION = 1

#: Largest multipart message (header plus payload frames) a peer accepts, in bytes. 256 MiB holds
#: a group of 10 images at 2048x2048 raw; the socket option ZMQ_MAXMSGSIZE enforces it per frame.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

#: Largest header frame (the MessagePack map), in bytes.
MAX_HEADER_BYTES = 64 * 1024

#: Most images one group may hold, and most credits one ``credit`` message may grant.
MAX_IMAGES_PER_GROUP = 1024
MAX_CREDIT = 1 << 20

#: Largest image side a service may announce (``welcome.generator`` height, width, save_size) or a
#: group may carry: numbers from the wire are bounded before they size a buffer or a decoder.
MAX_IMAGE_SIDE = 8192

#: Longest ``group_id`` (and so ``ack``); ids double as shard keys and log quotes.
MAX_GROUP_ID_CHARS = 256

#: Most entries (caption id and score pairs) one ``feedback`` may carry.
MAX_FEEDBACK_ENTRIES = 1024

#: Largest ``feedback`` header a service reads: 1024 ids and 1024 float64 scores take at most
#: 1024 * (9 + 9) bytes in MessagePack, plus the keys. Every other trainer header is far smaller.
MAX_FEEDBACK_HEADER_BYTES = 20 * 1024

#: ``caption_id`` is an int64 everywhere it is stored: [0, 2**63).
MAX_CAPTION_ID = 2**63 - 1

#: Image encodings a ``group`` may carry. ``raw`` is one frame of m*H*W*3 bytes; the others are
#: one encoded image per frame.
ENCODINGS = ("raw", "png", "jpeg", "webp")

#: Longest string of a generator description field, and most ``extra`` fields it may carry.
MAX_STRING_FIELD = 4096
MAX_INFO_EXTRA_FIELDS = 64

#: A peer silent for more than this many heartbeat intervals is dead.
DEAD_AFTER_HEARTBEATS = 3
