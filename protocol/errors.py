"""The one exception the protocol raises."""
from __future__ import annotations

#: ``credit_limit`` (a grant went over the service's ``max_credit``: it was clamped) and ``busy``
#: (the service has ``max_clients`` sessions already) are sent by services only.
ERROR_CODES = ("version", "bad_message", "too_large", "credit_limit", "busy")


class ProtocolError(Exception):
    """A message that cannot be accepted.

    Attributes:
        code: ``"version"`` (wrong protocol version), ``"bad_message"`` (unknown type, missing or
            mistyped field, payload that disagrees with its header) or ``"too_large"`` (over the
            size limit). The same codes travel in ``error`` messages.
        message: a sentence naming the field and value at fault.
        msg_type: the refused message's type, when its header named a known one.
    """

    def __init__(self, code: str, message: str, msg_type: str | None = None):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown protocol error code {code!r}; expected one of {ERROR_CODES}")
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        #: the refused message's ``type`` when its header said one (a refused ``group`` used a credit)
        self.msg_type = msg_type


class BadGroup(ValueError):
    """Raised by a client's ``on_group`` for a well-formed group that cannot be used (undecodable,
    or not the size or image count its service announced): the client counts it, answers the
    service with ``error`` ``bad_message``, acknowledges it and goes on."""
