"""Wire protocol v1 between the generator service and the trainer (ZeroMQ + MessagePack).

This package imports neither the trainer nor the generator service.
"""
from .codec import decode, decode_header, encode
from .errors import ERROR_CODES, ProtocolError
from .generator_info import GeneratorInfo
from .limits import ENCODINGS, MAX_HEADER_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from .messages import MESSAGE_TYPES, Bye, Credit, Error, Group, Heartbeat, Hello, Message, Welcome

__all__ = [
    "PROTOCOL_VERSION", "MAX_MESSAGE_BYTES", "MAX_HEADER_BYTES", "ENCODINGS", "ERROR_CODES",
    "ProtocolError", "GeneratorInfo", "Hello", "Welcome", "Credit", "Group", "Heartbeat", "Error", "Bye",
    "Message", "MESSAGE_TYPES", "encode", "decode", "decode_header",
]
