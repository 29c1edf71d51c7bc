"""Per-image seeds: one documented, language-independent rule.

``image_seed(base_seed, caption_id, image_index)`` is

    int.from_bytes(blake2b(f"stablerep/image_seed/v1:{base_seed}:{caption_id}:{image_index}".encode("ascii"),
                           digest_size=8).digest(), "little") >> 1

that is, the BLAKE2b-64 hash of the three decimal integers joined by ":" after a fixed prefix,
read as a little-endian unsigned integer and shifted right by one bit, giving a value in
``[0, 2**63)``. Any language with BLAKE2b can recompute it. Image ``j`` of caption ``i`` in a run
with base seed ``s`` is always generated from ``image_seed(s, i, j)``; the seed travels with the
image (protocol v1 ``group.seeds``), so regenerating it needs only that number.
"""

from __future__ import annotations

import hashlib

SEED_BITS = 63
_PREFIX = "stablerep/image_seed/v1"


def _check_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def image_seed(base_seed: int, caption_id: int, image_index: int) -> int:
    """The seed of image ``image_index`` of caption ``caption_id`` in a run seeded ``base_seed``.

    Returns an int in ``[0, 2**63)``; the rule is in the module docstring.
    """
    _check_int("base_seed", base_seed)
    _check_int("caption_id", caption_id)
    _check_int("image_index", image_index)
    message = f"{_PREFIX}:{base_seed}:{caption_id}:{image_index}".encode("ascii")
    return int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "little") >> 1
