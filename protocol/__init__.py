"""Wire protocol v1 between the generator service and the trainer (ZeroMQ + MessagePack), and the
shard layout both sides read (``protocol.shards``).

This package holds the wire and shard formats only and imports neither the trainer nor the
generator service. The shared helpers that are not wire format (the name registry, the metrics
server, the rate-limited log, the CLI parser, storage) live in ``infra``.
"""
from .codec import decode, decode_header, encode
from .errors import ERROR_CODES, ProtocolError
from .generator_info import GeneratorInfo
from .limits import ENCODINGS, MAX_HEADER_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from .messages import MESSAGE_TYPES, Bye, Credit, Error, Feedback, Group, Heartbeat, Hello, Message, Welcome

__all__ = [
    "PROTOCOL_VERSION", "MAX_MESSAGE_BYTES", "MAX_HEADER_BYTES", "ENCODINGS", "ERROR_CODES",
    "ProtocolError", "GeneratorInfo", "Hello", "Welcome", "Credit", "Group", "Heartbeat", "Error", "Bye", "Feedback",
    "Message", "MESSAGE_TYPES", "encode", "decode", "decode_header",
]
