"""A client for the settlegate wire protocol, version 1.

Written from ``docs/PROTOCOL.md`` alone (no server source was read), as an
independent check of that document. Standard library only.

Layers, bottom up:

* framing: :func:`encode_frame`, :func:`parse_header`, :func:`decode_frame`
  (28-byte header, CRC-32 checksums, validation in the order of section 2);
* body primitives: :class:`BodyWriter` / :class:`BodyReader` (section 1);
* status bodies (section 4), operation bodies (section 5), the signed
  inherent ID (section 5, "The inherent ID") and the signed age record
  (``REGISTER_AGE``); ``AUTHORIZE_BASKET`` requests and verdicts and
  ``SET_AGE_POLICY``;
* stores and the wallet (``UPSERT_STORE`` ... ``WALLET``), the EMVCo
  merchant-presented QR payload (TLV + CRC-16/CCITT-FALSE) and great-circle
  distances;
* payment codes and coupons (``ISSUE_CODE`` ... ``SUBSCRIBE_DEVICE``,
  ``REDEEM_CODE_BASKET``): the code text and its tag, requests and replies;
* :class:`SettlegateClient`: a blocking TCP connection with request-ID
  matching, pipelining, BUSY retries and NOTICE push handling.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hashlib
import hmac
import math
import os
import socket
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

# --------------------------------------------------------------------------
# Constants (sections 1-3)
# --------------------------------------------------------------------------

MAGIC = b"SG"
PROTOCOL_VERSION = 1
HEADER_LEN = 28
BODY_LENGTH_MAX = 65_536
PING_PAYLOAD_MAX = 64
IN_FLIGHT_MAX = 1_024

FLAG_RESPONSE = 0x01
FLAG_PUSH = 0x02
KNOWN_FLAGS = FLAG_RESPONSE | FLAG_PUSH

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7878

INHERENT_ID_FORMAT = 1
DEVICE_KEY_LEN = 32
CARD_IDM_LEN = 8
TAG_LEN = 32

AGE_RECORD_FORMAT = 0xA1
BASKET_ITEMS_MIN = 1
BASKET_ITEMS_MAX = 256
ITEM_ID_MAX = 32
CATEGORY_MAX = 16
QUANTITY_MAX = 1_000_000
BASKET_FLAG_AGE_CONFIRMATION = 0x01
KNOWN_BASKET_FLAGS = BASKET_FLAG_AGE_CONFIRMATION
REPORT_ROWS_MAX = 1_000

# magic, version, flags, opcode, status, request ID, body length, body CRC
_HEADER_PREFIX = struct.Struct(">2sBBHHQII")


class Op(enum.IntEnum):
    """Opcodes of section 5."""

    AUTH = 0x0001
    PING = 0x0002
    SERVER_INFO = 0x0003
    ENROLL = 0x0010
    LOGIN = 0x0011
    ADD_MEANS = 0x0012
    SET_DEFAULT_MEANS = 0x0013
    LIST_MEANS = 0x0014
    PROVISION_DEVICE = 0x0015
    ROTATE_DEVICE_KEY = 0x0016
    SUBSCRIBE_NOTICES = 0x0017
    NOTICE = 0x0018
    REVOKE_DEVICE_KEY = 0x0019
    REGISTER_TERMINALS = 0x0020
    REMOVE_TERMINALS = 0x0021
    CONFIRM_TERMINAL = 0x0022
    AUTHORIZE = 0x0030
    AUTHORIZE_BASKET = 0x0031
    REGISTER_AGE = 0x0040
    SET_AGE_POLICY = 0x0041
    UPSERT_STORE = 0x0050
    REMOVE_STORE = 0x0051
    STORE_AT = 0x0052
    STORE_BY_SIGNAL = 0x0053
    TOP_UP = 0x0054
    USABLE_METHODS = 0x0055
    WALLET = 0x0056
    ISSUE_CODE = 0x0060
    REDEEM_CODE = 0x0061
    CODE_STATE = 0x0062
    ISSUE_COUPONS = 0x0063
    NOTIFY_DELIVERY = 0x0064
    SUBSCRIBE_DEVICE = 0x0065
    DEVICE_MESSAGE = 0x0066
    REDEEM_CODE_BASKET = 0x0067
    VOID = 0x0068
    REFUND = 0x0069
    REPORT = 0x0070


class Status(enum.IntEnum):
    """Response status codes of section 4."""

    OK = 0
    REFUSED = 1
    BUSY = 2
    IN_FLIGHT = 3
    UNAUTHENTICATED = 4
    FORBIDDEN = 5
    BAD_REQUEST = 6
    UNKNOWN_OPCODE = 7
    SHUTTING_DOWN = 8
    INTERNAL = 9
    MOVED = 10
    FRAME_ERROR = 16


class FrameErrorKind(enum.IntEnum):
    """``FRAME_ERROR`` kinds of section 4."""

    BAD_MAGIC = 1
    UNSUPPORTED_VERSION = 2
    HEADER_CHECKSUM = 3
    BODY_TOO_LARGE = 4
    BODY_CHECKSUM = 5
    READ_TIMEOUT = 6
    RESERVED_FLAGS = 7


class Reason(enum.IntEnum):
    """Reason codes of section 6 (declines and ``REFUSED``)."""

    MALFORMED = 1
    UNKNOWN_DEVICE = 2
    FORGED_TAG = 3
    KEY_VERSION_INVALID = 4
    USER_DEVICE_MISMATCH = 5
    UNKNOWN_USER = 6
    STALE_TIMESTAMP = 7
    REPLAYED_NONCE = 8
    MEANS_NOT_REGISTERED = 9
    MEANS_MISMATCH = 10
    UNKNOWN_PROVIDER = 11
    INVALID_AMOUNT = 12
    PROVIDER_INSUFFICIENT_FUNDS = 20
    PROVIDER_DO_NOT_HONOR = 21
    PROVIDER_LIMIT_EXCEEDED = 22
    PROVIDER_INVALID_ACCOUNT = 23
    PROVIDER_TIMEOUT = 30
    PROVIDER_UNAVAILABLE = 31
    IDEMPOTENCY_CONFLICT = 40
    USER_EXISTS = 50
    INVALID_USER_ID = 51
    PASSWORD_POLICY = 52
    WRONG_PASSWORD = 53
    USER_LOCKED = 54
    INVALID_CARD_NUMBER = 55
    INVALID_MEANS = 56
    TOO_MANY_MEANS = 57
    TOO_MANY_DEVICES = 58
    DEVICE_IN_USE = 59
    INVALID_TERMINAL = 60
    INVALID_SERVICE = 61
    TOO_MANY_TERMINALS = 62
    AGE_CONDITION_NOT_MET = 70
    BASKET_MISMATCH = 71
    INVALID_AGE_REGISTRATION = 72
    INVALID_AGE_POLICY = 73
    INVALID_STORE = 80
    INVALID_QR_CODE = 81
    UNKNOWN_STORE = 82
    NO_STORE_IN_RANGE = 83
    INSUFFICIENT_BALANCE = 84
    NOT_STORED_VALUE = 85
    BALANCE_LIMIT = 86
    STORE_ID_IN_USE = 87
    TOO_MANY_STORES = 88
    INVALID_POSITION = 89
    CURRENCY_MISMATCH = 90
    INVALID_CODE = 100
    FORGED_CODE = 101
    UNKNOWN_CODE = 102
    CODE_EXPIRED = 103
    CODE_REDEEMED = 104
    CODE_MISMATCH = 105
    AMOUNT_ABOVE_AUTHORIZED = 106
    COUPON_USED_UP = 107
    COUPON_NOT_APPLICABLE = 108
    INVALID_COUPON = 109
    INVALID_CODE_REQUEST = 110
    NOT_REFUNDABLE = 111
    REFUND_ABOVE_CAPTURED = 112
    CODE_VOIDED = 113
    UNKNOWN_PAYMENT = 114
    REPORT_UNAVAILABLE = 120


class AgeCheck(enum.IntEnum):
    """``age_check`` of an ``AUTHORIZE_BASKET`` verdict."""

    NOT_CHECKED = 0
    NO_RESTRICTED_ITEMS = 1
    PASSED = 2
    FAILED = 3


class VerificationMethod(enum.IntEnum):
    """How an age record's birth date was verified (``REGISTER_AGE``)."""

    DOCUMENT_IN_PERSON = 1
    DOCUMENT_CHIP = 2
    EKYC = 3


class OnFailure(enum.IntEnum):
    """``SET_AGE_POLICY`` ``on_failure``."""

    REFUSE = 1
    REMOVE_ITEMS = 2


class Permission(enum.IntFlag):
    """Identity permission bits of section 3."""

    AUTHORIZE = 0x1
    ACCOUNTS = 0x2
    PROVIDERS = 0x4
    STORES = 0x8
    REPORT = 0x10


class AuthMethod(enum.IntEnum):
    """``AUTH`` methods."""

    API_KEY = 1


class UserIdType(enum.IntEnum):
    """Kinds of user ID (section 1, ``user``)."""

    MAIL = 1
    INHERENT_NUMBER = 2


class MeansKind(enum.IntEnum):
    """Settlement means kinds (``ADD_MEANS`` and the inherent ID)."""

    CREDIT_CARD = 1
    E_MONEY = 2
    QR_CODE = 3
    BANK_ACCOUNT = 4


class ListOrder(enum.IntEnum):
    """``LIST_MEANS`` orders."""

    REGISTRATION = 0
    MOST_USED = 1
    MOST_RECENTLY_USED = 2


class DiscountKind(enum.IntEnum):
    """Discount kinds of a terminal ``service``."""

    PERCENT = 1
    FIXED = 2


class Result(enum.IntEnum):
    """``outcome`` result byte."""

    APPROVED = 0
    DECLINED = 1


def _maybe_enum(enum_cls, value: int):
    """Return ``enum_cls(value)`` when defined, else the plain integer."""
    try:
        return enum_cls(value)
    except ValueError:
        return value


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class ProtocolError(Exception):
    """The peer sent something this document does not allow."""


class DecodeError(ProtocolError):
    """A body does not parse as the document describes."""


class FrameValidationError(ProtocolError):
    """A received frame fails the checks of section 2.

    ``kind`` is the :class:`FrameErrorKind` the server would report for the
    same fault, or ``None`` for client-side-only checks (e.g. a missing
    ``RESPONSE`` flag).
    """

    def __init__(self, message: str, kind: Optional[FrameErrorKind] = None):
        super().__init__(message)
        self.kind = kind


class ConnectionClosed(ConnectionError):
    """The server closed the connection."""


class StatusError(Exception):
    """A response with a status other than ``OK``."""

    def __init__(self, opcode: int, reply: "StatusReply"):
        self.opcode = opcode
        self.reply = reply
        super().__init__(f"opcode 0x{opcode:04x}: {reply.describe()}")

    @property
    def status(self):
        """The response status."""
        return self.reply.status

    @property
    def reason(self):
        """The reason code of a ``REFUSED`` response (else ``None``)."""
        return self.reply.reason


# --------------------------------------------------------------------------
# Checksums and framing (section 2)
# --------------------------------------------------------------------------


def crc32(data: bytes) -> int:
    """CRC-32/ISO-HDLC as computed by zlib (section 1)."""
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    opcode: int
    status: int
    request_id: int
    body: bytes = b""
    flags: int = 0

    @property
    def is_response(self) -> bool:
        """Whether the ``RESPONSE`` flag is set."""
        return bool(self.flags & FLAG_RESPONSE)

    @property
    def is_push(self) -> bool:
        """Whether the ``PUSH`` flag is set (a server-initiated notice)."""
        return bool(self.flags & FLAG_PUSH)

    def encode(self) -> bytes:
        """Serialize this frame (see :func:`encode_frame`)."""
        return encode_frame(self.opcode, self.request_id, self.body,
                            status=self.status, flags=self.flags)


@dataclass(frozen=True)
class Header:
    """A validated frame header."""

    flags: int
    opcode: int
    status: int
    request_id: int
    body_length: int
    body_crc: int


def encode_frame(opcode: int, request_id: int, body: bytes = b"", *,
                 status: int = 0, flags: int = 0) -> bytes:
    """Build a complete frame: the 28-byte header followed by ``body``."""
    body = bytes(body)
    if len(body) > BODY_LENGTH_MAX:
        raise ValueError(f"body of {len(body)} bytes exceeds {BODY_LENGTH_MAX}")
    prefix = _HEADER_PREFIX.pack(MAGIC, PROTOCOL_VERSION, flags, opcode,
                                 status, request_id, len(body), crc32(body))
    return prefix + struct.pack(">I", crc32(prefix)) + body


def parse_header(data: bytes, *, require_response: bool = False,
                 body_length_max: int = BODY_LENGTH_MAX) -> Header:
    """Validate and decode a 28-byte header.

    Checks run in the server's order (section 2): header checksum, magic,
    version, flags, body length. ``require_response`` additionally demands
    the ``RESPONSE`` flag, which every server-sent frame carries.
    """
    if len(data) != HEADER_LEN:
        raise FrameValidationError(f"header must be {HEADER_LEN} bytes, got {len(data)}")
    (stored_crc,) = struct.unpack(">I", data[24:28])
    if crc32(data[:24]) != stored_crc:
        raise FrameValidationError("header checksum mismatch", FrameErrorKind.HEADER_CHECKSUM)
    magic, version, flags, opcode, status, request_id, length, body_crc = (
        _HEADER_PREFIX.unpack(data[:24]))
    if magic != MAGIC:
        raise FrameValidationError(f"bad magic {magic!r}", FrameErrorKind.BAD_MAGIC)
    if version != PROTOCOL_VERSION:
        raise FrameValidationError(f"unsupported version {version}",
                                   FrameErrorKind.UNSUPPORTED_VERSION)
    if flags & ~KNOWN_FLAGS:
        raise FrameValidationError(f"reserved flag bits set: 0x{flags:02x}",
                                   FrameErrorKind.RESERVED_FLAGS)
    if length > body_length_max:
        raise FrameValidationError(f"body length {length} exceeds {body_length_max}",
                                   FrameErrorKind.BODY_TOO_LARGE)
    if require_response and not flags & FLAG_RESPONSE:
        raise FrameValidationError("server frame without the RESPONSE flag")
    return Header(flags, opcode, status, request_id, length, body_crc)


def check_body(header: Header, body: bytes) -> Frame:
    """Check ``body`` against ``header`` and return the whole frame."""
    if len(body) != header.body_length:
        raise FrameValidationError(
            f"body is {len(body)} bytes, header says {header.body_length}")
    if crc32(body) != header.body_crc:
        raise FrameValidationError("body checksum mismatch", FrameErrorKind.BODY_CHECKSUM)
    return Frame(header.opcode, header.status, header.request_id, bytes(body), header.flags)


def decode_frame(data: bytes, *, require_response: bool = False) -> Frame:
    """Decode exactly one complete frame from ``data``."""
    header = parse_header(bytes(data[:HEADER_LEN]), require_response=require_response)
    return check_body(header, bytes(data[HEADER_LEN:]))


# --------------------------------------------------------------------------
# Body primitives (section 1)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    """A ``user``: ID type and ID (mail address or inherent number)."""

    id_type: int
    user_id: str

    @classmethod
    def mail(cls, address: str) -> "User":
        """A user identified by mail address."""
        return cls(UserIdType.MAIL, address)

    @classmethod
    def number(cls, digits: str) -> "User":
        """A user identified by inherent number."""
        return cls(UserIdType.INHERENT_NUMBER, digits)


class BodyWriter:
    """Accumulates big-endian body fields. Every method returns ``self``."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def _pack(self, fmt: str, value: int) -> "BodyWriter":
        try:
            self._buf += struct.pack(fmt, value)
        except struct.error as exc:
            raise ValueError(f"{value!r} does not fit {fmt}: {exc}") from None
        return self

    def u8(self, value: int) -> "BodyWriter":
        """Append a ``u8``."""
        return self._pack(">B", value)

    def u16(self, value: int) -> "BodyWriter":
        """Append a ``u16``."""
        return self._pack(">H", value)

    def u32(self, value: int) -> "BodyWriter":
        """Append a ``u32``."""
        return self._pack(">I", value)

    def u64(self, value: int) -> "BodyWriter":
        """Append a ``u64``."""
        return self._pack(">Q", value)

    def i32(self, value: int) -> "BodyWriter":
        """Append a signed ``i32``."""
        return self._pack(">i", value)

    def i64(self, value: int) -> "BodyWriter":
        """Append a signed ``i64``."""
        return self._pack(">q", value)

    def u128(self, value: int) -> "BodyWriter":
        """Append a ``u128`` (16 bytes, big-endian)."""
        if not 0 <= value < 1 << 128:
            raise ValueError(f"{value!r} does not fit u128")
        self._buf += value.to_bytes(16, "big")
        return self

    def raw(self, data: bytes, size: Optional[int] = None) -> "BodyWriter":
        """Append raw bytes; with ``size``, require exactly that many."""
        if size is not None and len(data) != size:
            raise ValueError(f"expected exactly {size} bytes, got {len(data)}")
        self._buf += data
        return self

    def ascii(self, text: str, size: int) -> "BodyWriter":
        """Append a fixed-size ASCII field such as ``[3] currency``."""
        return self.raw(text.encode("ascii"), size)

    def str8(self, text: Union[str, bytes]) -> "BodyWriter":
        """Append a ``str8``: length byte then UTF-8 bytes."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if len(data) > 255:
            raise ValueError(f"str8 of {len(data)} bytes exceeds 255")
        return self.u8(len(data)).raw(data)

    def bytes16(self, data: bytes) -> "BodyWriter":
        """Append a ``bytes16``: ``u16`` length then the bytes."""
        return self.u16(len(data)).raw(bytes(data))

    def user(self, user: User) -> "BodyWriter":
        """Append a ``user``: ``u8`` ID type then ``str8`` ID."""
        return self.u8(user.id_type).str8(user.user_id)

    def getvalue(self) -> bytes:
        """The bytes written so far."""
        return bytes(self._buf)


class BodyReader:
    """Consumes big-endian body fields; raises :class:`DecodeError` on underrun."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._pos = 0

    def take(self, size: int) -> bytes:
        """Consume exactly ``size`` raw bytes."""
        end = self._pos + size
        if end > len(self._data):
            raise DecodeError(f"body ends at {len(self._data)}, need {end} bytes")
        chunk = self._data[self._pos:end]
        self._pos = end
        return chunk

    def _unpack(self, fmt: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def u8(self) -> int:
        """Read a ``u8``."""
        return self._unpack(">B")

    def u16(self) -> int:
        """Read a ``u16``."""
        return self._unpack(">H")

    def u32(self) -> int:
        """Read a ``u32``."""
        return self._unpack(">I")

    def u64(self) -> int:
        """Read a ``u64``."""
        return self._unpack(">Q")

    def i32(self) -> int:
        """Read a signed ``i32``."""
        return self._unpack(">i")

    def i64(self) -> int:
        """Read a signed ``i64``."""
        return self._unpack(">q")

    def u128(self) -> int:
        """Read a ``u128``."""
        return int.from_bytes(self.take(16), "big")

    def flag(self) -> bool:
        """Read a ``u8`` that must be 0 or 1."""
        value = self.u8()
        if value not in (0, 1):
            raise DecodeError(f"boolean byte must be 0 or 1, got {value}")
        return bool(value)

    def ascii(self, size: int) -> str:
        """Read a fixed-size ASCII field."""
        try:
            return self.take(size).decode("ascii")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"not ASCII: {exc}") from None

    def str8(self) -> str:
        """Read a ``str8`` as text."""
        try:
            return self.take(self.u8()).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"str8 is not UTF-8: {exc}") from None

    def bytes16(self) -> bytes:
        """Read a ``bytes16``."""
        return self.take(self.u16())

    def user(self) -> User:
        """Read a ``user``."""
        id_type = _maybe_enum(UserIdType, self.u8())
        return User(id_type, self.str8())

    def remaining(self) -> int:
        """Bytes not yet consumed."""
        return len(self._data) - self._pos

    def rest(self) -> bytes:
        """Consume and return everything left."""
        return self.take(self.remaining())

    def finish(self) -> None:
        """Require that the whole body was consumed."""
        if self.remaining():
            raise DecodeError(f"{self.remaining()} trailing bytes in body")


# --------------------------------------------------------------------------
# Status bodies (section 4)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusReply:
    """The decoded body of a non-``OK`` response."""

    status: int
    reason: Optional[int] = None
    retry_after_ms: Optional[int] = None
    detail: Optional[str] = None
    frame_error_kind: Optional[int] = None
    partition: Optional[int] = None
    epoch: Optional[int] = None
    address: Optional[str] = None

    def describe(self) -> str:
        """A one-line human description (never contains request data)."""
        name = getattr(self.status, "name", str(self.status))
        parts = [name]
        if self.reason is not None:
            parts.append(f"reason {int(self.reason)} ({getattr(self.reason, 'name', '?')})")
        if self.retry_after_ms is not None:
            parts.append(f"retry after {self.retry_after_ms} ms")
        if self.frame_error_kind is not None:
            parts.append(f"kind {int(self.frame_error_kind)}")
        if self.partition is not None:
            parts.append(f"partition {self.partition} epoch {self.epoch} at {self.address!r}")
        if self.detail:
            parts.append(repr(self.detail))
        return ", ".join(parts)


_DETAIL_STATUSES = {Status.UNAUTHENTICATED, Status.FORBIDDEN,
                    Status.BAD_REQUEST, Status.INTERNAL}
_EMPTY_STATUSES = {Status.OK, Status.IN_FLIGHT, Status.UNKNOWN_OPCODE,
                   Status.SHUTTING_DOWN}


def decode_status_body(status: int, body: bytes) -> StatusReply:
    """Decode the body of a response with a non-``OK`` status.

    For ``OK`` the body is operation-specific; this returns an empty reply.
    """
    try:
        status = Status(status)
    except ValueError:
        raise DecodeError(f"unknown status {status}") from None
    if status == Status.OK:
        return StatusReply(status)
    reader = BodyReader(body)
    if status == Status.REFUSED:
        reply = StatusReply(status, reason=_maybe_enum(Reason, reader.u16()))
    elif status == Status.BUSY:
        reply = StatusReply(status, retry_after_ms=reader.u32())
    elif status in _DETAIL_STATUSES:
        reply = StatusReply(status, detail=reader.str8())
    elif status == Status.MOVED:
        reply = StatusReply(status, partition=reader.u16(), epoch=reader.u64(),
                            address=reader.str8())
    elif status == Status.FRAME_ERROR:
        kind = _maybe_enum(FrameErrorKind, reader.u16())
        reply = StatusReply(status, frame_error_kind=kind, detail=reader.str8())
    else:
        reply = StatusReply(status)
    reader.finish()
    return reply


def encode_status_body(reply: StatusReply) -> bytes:
    """Encode a non-``OK`` status body (the inverse of :func:`decode_status_body`)."""
    writer = BodyWriter()
    status = Status(reply.status)
    if status == Status.REFUSED:
        writer.u16(reply.reason)
    elif status == Status.BUSY:
        writer.u32(reply.retry_after_ms)
    elif status in _DETAIL_STATUSES:
        writer.str8(reply.detail or "")
    elif status == Status.MOVED:
        writer.u16(reply.partition).u64(reply.epoch).str8(reply.address or "")
    elif status == Status.FRAME_ERROR:
        writer.u16(reply.frame_error_kind).str8(reply.detail or "")
    return writer.getvalue()


# --------------------------------------------------------------------------
# Operation bodies (section 5)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthReply:
    """``AUTH`` reply."""

    identity_name: str
    permissions: Permission


@dataclass(frozen=True)
class ProviderInfo:
    """One provider listed by ``SERVER_INFO``."""

    code: int
    name: str


@dataclass(frozen=True)
class ServerInfo:
    """``SERVER_INFO`` reply."""

    server_version: str
    protocol_version: int
    shards: int
    body_length_max: int
    in_flight_max: int
    providers: Tuple[ProviderInfo, ...]


@dataclass(frozen=True)
class DeviceCredential:
    """``device_credential``: what a device needs to sign inherent IDs."""

    card_idm: bytes
    key_version: int
    device_key: bytes

    def __repr__(self) -> str:  # never leak the key into logs
        return (f"DeviceCredential(card_idm={self.card_idm.hex()}, "
                f"key_version={self.key_version}, device_key=<redacted>)")


@dataclass(frozen=True)
class CreditCard:
    """``ADD_MEANS`` kind 1."""

    pan: str
    kind = MeansKind.CREDIT_CARD

    def __repr__(self) -> str:  # never leak the card number into logs
        return "CreditCard(pan=<redacted>)"


@dataclass(frozen=True)
class EMoney:
    """``ADD_MEANS`` kind 2."""

    emoney_type: str
    kind = MeansKind.E_MONEY


@dataclass(frozen=True)
class QrCode:
    """``ADD_MEANS`` kind 3."""

    scheme: str
    settlement_number: str
    kind = MeansKind.QR_CODE


@dataclass(frozen=True)
class BankAccount:
    """``ADD_MEANS`` kind 4."""

    bank_code: str
    account_number: str
    kind = MeansKind.BANK_ACCOUNT


Means = Union[CreditCard, EMoney, QrCode, BankAccount]


@dataclass(frozen=True)
class AddedMeans:
    """``ADD_MEANS`` reply."""

    means_id: int
    last4: str


@dataclass(frozen=True)
class MeansEntry:
    """One entry of a ``LIST_MEANS`` reply."""

    means_id: int
    kind: int
    is_default: bool
    label: str
    last4: str
    token: bytes
    uses: int
    last_used_ms: Optional[int]
    registered_ms: int


@dataclass(frozen=True)
class Service:
    """A terminal ``service``: a discount valid in ``[valid_from_ms, valid_until_ms)``.

    Percent discounts set ``bps``; fixed discounts set ``amount_minor`` and
    ``currency``.
    """

    discount_kind: int
    valid_from_ms: int
    valid_until_ms: int
    description: str = ""
    bps: Optional[int] = None
    amount_minor: Optional[int] = None
    currency: Optional[str] = None

    @classmethod
    def percent(cls, bps: int, valid_from_ms: int, valid_until_ms: int,
                description: str = "") -> "Service":
        """A percentage discount in basis points."""
        return cls(DiscountKind.PERCENT, valid_from_ms, valid_until_ms, description, bps=bps)

    @classmethod
    def fixed(cls, amount_minor: int, currency: str, valid_from_ms: int,
              valid_until_ms: int, description: str = "") -> "Service":
        """A fixed discount in minor units."""
        return cls(DiscountKind.FIXED, valid_from_ms, valid_until_ms, description,
                   amount_minor=amount_minor, currency=currency)


@dataclass(frozen=True)
class TerminalEntry:
    """One terminal of ``REGISTER_TERMINALS``."""

    terminal_id: str
    service: Optional[Service] = None


@dataclass(frozen=True)
class TerminalStatus:
    """``CONFIRM_TERMINAL`` reply."""

    listed: bool
    service: Optional[Service]


@dataclass(frozen=True)
class Approved:
    """An approved ``outcome``."""

    auth_code: str
    provider_code: int
    amount_requested_minor: int
    discount_minor: int
    amount_final_minor: int
    currency: str
    approved = True


@dataclass(frozen=True)
class Declined:
    """A declined ``outcome``."""

    reason: int
    approved = False


Outcome = Union[Approved, Declined]


@dataclass(frozen=True)
class Notice:
    """A ``NOTICE`` push body."""

    user: User
    client_request_id: int
    terminal_id: str
    at_ms: int
    outcome: Outcome


def new_client_request_id() -> int:
    """A random, practically unique ``u128`` client request ID."""
    return int.from_bytes(os.urandom(16), "big") or 1


# AUTH ---------------------------------------------------------------------

def encode_auth(key: str, method: int = AuthMethod.API_KEY) -> bytes:
    """``AUTH`` request body."""
    return BodyWriter().u8(method).str8(key).getvalue()


def decode_auth_reply(body: bytes) -> AuthReply:
    """``AUTH`` reply body."""
    reader = BodyReader(body)
    reply = AuthReply(reader.str8(), Permission(reader.u32()))
    reader.finish()
    return reply


# PING / SERVER_INFO -------------------------------------------------------

def encode_ping(payload: bytes = b"") -> bytes:
    """``PING`` request body (0-64 bytes, returned unchanged)."""
    return bytes(payload)


def decode_server_info(body: bytes) -> ServerInfo:
    """``SERVER_INFO`` reply body."""
    reader = BodyReader(body)
    version, protocol, shards = reader.str8(), reader.u16(), reader.u16()
    body_max, in_flight, count = reader.u32(), reader.u16(), reader.u16()
    providers = tuple(ProviderInfo(reader.u32(), reader.str8()) for _ in range(count))
    reader.finish()
    return ServerInfo(version, protocol, shards, body_max, in_flight, providers)


def encode_server_info(info: ServerInfo) -> bytes:
    """``SERVER_INFO`` reply body (used by offline round-trip tests)."""
    writer = (BodyWriter().str8(info.server_version).u16(info.protocol_version)
              .u16(info.shards).u32(info.body_length_max).u16(info.in_flight_max)
              .u16(len(info.providers)))
    for provider in info.providers:
        writer.u32(provider.code).str8(provider.name)
    return writer.getvalue()


# Accounts -----------------------------------------------------------------

def encode_enroll(client_request_id: int, user: User, password: str, card_idm: bytes) -> bytes:
    """``ENROLL`` request body."""
    return (BodyWriter().u128(client_request_id).user(user).str8(password)
            .raw(card_idm, CARD_IDM_LEN).getvalue())


def encode_device_credential(credential: DeviceCredential) -> bytes:
    """``device_credential`` body."""
    return (BodyWriter().raw(credential.card_idm, CARD_IDM_LEN).u16(credential.key_version)
            .raw(credential.device_key, DEVICE_KEY_LEN).getvalue())


def decode_device_credential(body: bytes) -> DeviceCredential:
    """``device_credential`` reply body (``ENROLL``, ``PROVISION_DEVICE``, ``ROTATE_DEVICE_KEY``)."""
    reader = BodyReader(body)
    credential = DeviceCredential(reader.take(CARD_IDM_LEN), reader.u16(),
                                  reader.take(DEVICE_KEY_LEN))
    reader.finish()
    return credential


def encode_login(user: User, password: str) -> bytes:
    """``LOGIN`` request body."""
    return BodyWriter().user(user).str8(password).getvalue()


def _write_means(writer: BodyWriter, means: Means) -> None:
    """Append ``u8 kind`` and the kind's fields."""
    writer.u8(means.kind)
    if isinstance(means, CreditCard):
        writer.str8(means.pan)
    elif isinstance(means, EMoney):
        writer.str8(means.emoney_type)
    elif isinstance(means, QrCode):
        writer.str8(means.scheme).str8(means.settlement_number)
    elif isinstance(means, BankAccount):
        writer.str8(means.bank_code).str8(means.account_number)
    else:
        raise TypeError(f"not a means: {type(means).__name__}")


def encode_add_means(client_request_id: int, user: User, means: Means,
                     make_default: bool = False) -> bytes:
    """``ADD_MEANS`` request body."""
    writer = BodyWriter().u128(client_request_id).user(user).u8(int(make_default))
    _write_means(writer, means)
    return writer.getvalue()


def decode_add_means_reply(body: bytes) -> AddedMeans:
    """``ADD_MEANS`` reply body."""
    reader = BodyReader(body)
    reply = AddedMeans(reader.u32(), reader.str8())
    reader.finish()
    return reply


def encode_set_default_means(client_request_id: int, user: User, means_id: int) -> bytes:
    """``SET_DEFAULT_MEANS`` request body."""
    return BodyWriter().u128(client_request_id).user(user).u32(means_id).getvalue()


def encode_list_means(user: User, order: int = ListOrder.REGISTRATION) -> bytes:
    """``LIST_MEANS`` request body."""
    return BodyWriter().user(user).u8(order).getvalue()


def _read_means_entry(reader: BodyReader) -> MeansEntry:
    """One ``LIST_MEANS`` entry."""
    means_id, kind = reader.u32(), _maybe_enum(MeansKind, reader.u8())
    is_default, label, last4 = reader.flag(), reader.str8(), reader.str8()
    token, uses, has_last_used = reader.take(16), reader.u64(), reader.flag()
    last_used_ms, registered_ms = reader.i64(), reader.i64()
    if not has_last_used and last_used_ms != 0:
        raise DecodeError("last_used_ms must be 0 when has_last_used is 0")
    return MeansEntry(means_id, kind, is_default, label, last4, token, uses,
                      last_used_ms if has_last_used else None, registered_ms)


def _write_means_entry(writer: BodyWriter, entry: MeansEntry) -> None:
    """Append one ``LIST_MEANS`` entry."""
    (writer.u32(entry.means_id).u8(entry.kind).u8(int(entry.is_default))
     .str8(entry.label).str8(entry.last4).raw(entry.token, 16).u64(entry.uses)
     .u8(int(entry.last_used_ms is not None)).i64(entry.last_used_ms or 0)
     .i64(entry.registered_ms))


def decode_list_means(body: bytes) -> List[MeansEntry]:
    """``LIST_MEANS`` reply body."""
    reader = BodyReader(body)
    entries = [_read_means_entry(reader) for _ in range(reader.u8())]
    reader.finish()
    return entries


def encode_list_means_reply(entries: Sequence[MeansEntry]) -> bytes:
    """``LIST_MEANS`` reply body (used by offline round-trip tests)."""
    writer = BodyWriter().u8(len(entries))
    for entry in entries:
        _write_means_entry(writer, entry)
    return writer.getvalue()


def encode_provision_device(client_request_id: int, user: User, password: str,
                            card_idm: bytes) -> bytes:
    """``PROVISION_DEVICE`` request body."""
    return (BodyWriter().u128(client_request_id).user(user).str8(password)
            .raw(card_idm, CARD_IDM_LEN).getvalue())


def encode_rotate_device_key(client_request_id: int, user: User, password: str,
                             card_idm: bytes) -> bytes:
    """``ROTATE_DEVICE_KEY`` request body (the same layout as ``PROVISION_DEVICE``)."""
    return (BodyWriter().u128(client_request_id).user(user).str8(password)
            .raw(card_idm, CARD_IDM_LEN).getvalue())


def encode_revoke_device_key(client_request_id: int, user: User, password: str,
                             card_idm: bytes) -> bytes:
    """``REVOKE_DEVICE_KEY`` request body (the same layout as ``ROTATE_DEVICE_KEY``)."""
    return (BodyWriter().u128(client_request_id).user(user).str8(password)
            .raw(card_idm, CARD_IDM_LEN).getvalue())


def encode_subscribe_notices(user: User, password: str) -> bytes:
    """``SUBSCRIBE_NOTICES`` request body."""
    return BodyWriter().user(user).str8(password).getvalue()


# Terminals ----------------------------------------------------------------

def _write_service(writer: BodyWriter, service: Service) -> None:
    """Append a ``service``."""
    writer.u8(service.discount_kind)
    if service.discount_kind == DiscountKind.PERCENT:
        writer.u16(service.bps)
    elif service.discount_kind == DiscountKind.FIXED:
        writer.u64(service.amount_minor).ascii(service.currency, 3)
    else:
        raise ValueError(f"unknown discount kind {service.discount_kind}")
    writer.i64(service.valid_from_ms).i64(service.valid_until_ms).str8(service.description)


def _read_service(reader: BodyReader) -> Service:
    """Read a ``service``."""
    kind = reader.u8()
    bps = amount = currency = None
    if kind == DiscountKind.PERCENT:
        bps = reader.u16()
    elif kind == DiscountKind.FIXED:
        amount, currency = reader.u64(), reader.ascii(3)
    else:
        raise DecodeError(f"unknown discount kind {kind}")
    valid_from, valid_until, description = reader.i64(), reader.i64(), reader.str8()
    return Service(DiscountKind(kind), valid_from, valid_until, description,
                   bps=bps, amount_minor=amount, currency=currency)


def encode_register_terminals(client_request_id: int, provider_code: int,
                              terminals: Sequence[TerminalEntry]) -> bytes:
    """``REGISTER_TERMINALS`` request body."""
    writer = BodyWriter().u128(client_request_id).u32(provider_code).u16(len(terminals))
    for terminal in terminals:
        writer.str8(terminal.terminal_id).u8(int(terminal.service is not None))
        if terminal.service is not None:
            _write_service(writer, terminal.service)
    return writer.getvalue()


def encode_remove_terminals(client_request_id: int, provider_code: int,
                            terminal_ids: Sequence[str]) -> bytes:
    """``REMOVE_TERMINALS`` request body."""
    writer = BodyWriter().u128(client_request_id).u32(provider_code).u16(len(terminal_ids))
    for terminal_id in terminal_ids:
        writer.str8(terminal_id)
    return writer.getvalue()


def encode_confirm_terminal(provider_code: int, terminal_id: str) -> bytes:
    """``CONFIRM_TERMINAL`` request body."""
    return BodyWriter().u32(provider_code).str8(terminal_id).getvalue()


def decode_confirm_terminal(body: bytes) -> TerminalStatus:
    """``CONFIRM_TERMINAL`` reply body."""
    reader = BodyReader(body)
    listed, has_service = reader.flag(), reader.flag()
    service = _read_service(reader) if has_service else None
    reader.finish()
    return TerminalStatus(listed, service)


def encode_confirm_terminal_reply(status: TerminalStatus) -> bytes:
    """``CONFIRM_TERMINAL`` reply body (used by offline round-trip tests)."""
    writer = BodyWriter().u8(int(status.listed)).u8(int(status.service is not None))
    if status.service is not None:
        _write_service(writer, status.service)
    return writer.getvalue()


# AUTHORIZE / outcome / NOTICE --------------------------------------------

def encode_authorize(client_request_id: int, inherent_id: bytes) -> bytes:
    """``AUTHORIZE`` request body."""
    return BodyWriter().u128(client_request_id).bytes16(inherent_id).getvalue()


def _write_outcome(writer: BodyWriter, outcome: Outcome) -> None:
    """Append an ``outcome``."""
    if isinstance(outcome, Approved):
        (writer.u8(Result.APPROVED).ascii(outcome.auth_code, 6).u32(outcome.provider_code)
         .u64(outcome.amount_requested_minor).u64(outcome.discount_minor)
         .u64(outcome.amount_final_minor).ascii(outcome.currency, 3))
    else:
        writer.u8(Result.DECLINED).u16(outcome.reason)


def _read_outcome(reader: BodyReader) -> Outcome:
    """Read an ``outcome``."""
    result = reader.u8()
    if result == Result.APPROVED:
        return Approved(reader.ascii(6), reader.u32(), reader.u64(), reader.u64(),
                        reader.u64(), reader.ascii(3))
    if result == Result.DECLINED:
        return Declined(_maybe_enum(Reason, reader.u16()))
    raise DecodeError(f"unknown outcome result {result}")


def encode_outcome(outcome: Outcome) -> bytes:
    """``AUTHORIZE`` reply body."""
    writer = BodyWriter()
    _write_outcome(writer, outcome)
    return writer.getvalue()


def decode_outcome(body: bytes) -> Outcome:
    """``AUTHORIZE`` reply body."""
    reader = BodyReader(body)
    outcome = _read_outcome(reader)
    reader.finish()
    return outcome


def encode_notice(notice: Notice) -> bytes:
    """``NOTICE`` push body (used by offline round-trip tests)."""
    writer = (BodyWriter().user(notice.user).u128(notice.client_request_id)
              .str8(notice.terminal_id).i64(notice.at_ms))
    _write_outcome(writer, notice.outcome)
    return writer.getvalue()


def decode_notice(body: bytes) -> Notice:
    """``NOTICE`` push body."""
    reader = BodyReader(body)
    notice = Notice(reader.user(), reader.u128(), reader.str8(), reader.i64(),
                    _read_outcome(reader))
    reader.finish()
    return notice


# --------------------------------------------------------------------------
# The inherent ID (section 5)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class InherentIdFields:
    """The signed fields of an inherent ID, in wire order."""

    key_version: int
    amount_minor: int
    currency: str
    means_kind: int
    means_id: int
    provider_code: int
    card_idm: bytes
    user: User
    terminal_id: str
    counter: int
    timestamp_ms: int
    format_version: int = INHERENT_ID_FORMAT


def inherent_id_signed_part(fields: InherentIdFields) -> bytes:
    """Every byte of the record that the HMAC tag covers (offsets 0 to 50+L+T)."""
    return (BodyWriter().u8(fields.format_version).u16(fields.key_version)
            .u64(fields.amount_minor).ascii(fields.currency, 3).u8(fields.means_kind)
            .u32(fields.means_id).u32(fields.provider_code)
            .raw(fields.card_idm, CARD_IDM_LEN).u8(fields.user.id_type)
            .str8(fields.user.user_id).str8(fields.terminal_id.encode("ascii"))
            .u64(fields.counter).i64(fields.timestamp_ms).getvalue())


def inherent_id_tag(signed_part: bytes, device_key: bytes) -> bytes:
    """HMAC-SHA256 of ``signed_part`` under ``device_key``."""
    return hmac.new(device_key, signed_part, hashlib.sha256).digest()


def sign_inherent_id(fields: InherentIdFields, device_key: bytes) -> bytes:
    """Build a complete inherent ID record: the fields plus their HMAC tag."""
    signed = inherent_id_signed_part(fields)
    return signed + inherent_id_tag(signed, device_key)


def parse_inherent_id(record: bytes) -> Tuple[InherentIdFields, bytes]:
    """Split a record into its fields and its 32-byte tag (no verification)."""
    reader = BodyReader(record)
    format_version, key_version, amount = reader.u8(), reader.u16(), reader.u64()
    currency, means_kind, means_id = reader.ascii(3), reader.u8(), reader.u32()
    provider, card_idm, user = reader.u32(), reader.take(CARD_IDM_LEN), reader.user()
    terminal_id = reader.take(reader.u8()).decode("ascii", errors="replace")
    counter, timestamp, tag = reader.u64(), reader.i64(), reader.take(TAG_LEN)
    reader.finish()
    fields = InherentIdFields(key_version, amount, currency, means_kind, means_id,
                              provider, card_idm, user, terminal_id, counter,
                              timestamp, format_version)
    return fields, tag


def verify_inherent_id(record: bytes, device_key: bytes) -> bool:
    """Whether the record's tag verifies under ``device_key`` (constant time)."""
    if len(record) < TAG_LEN:
        return False
    expected = inherent_id_tag(record[:-TAG_LEN], device_key)
    return hmac.compare_digest(expected, record[-TAG_LEN:])


# --------------------------------------------------------------------------
# The age record (section 5, REGISTER_AGE)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AgeRecordFields:
    """The signed fields of an age record, in wire order."""

    key_version: int
    card_idm: bytes
    user: User
    birth_year: int
    birth_month: int
    birth_day: int
    method: int
    verified_at_ms: int
    valid_until_ms: int
    counter: int
    timestamp_ms: int
    format: int = AGE_RECORD_FORMAT

    @property
    def birth_date(self) -> Tuple[int, int, int]:
        """``(year, month, day)``."""
        return self.birth_year, self.birth_month, self.birth_day


def age_record_signed_part(fields: AgeRecordFields) -> bytes:
    """Every byte of the age record that the HMAC tag covers (offsets 0 to 50+L)."""
    return (BodyWriter().u8(fields.format).u16(fields.key_version)
            .raw(fields.card_idm, CARD_IDM_LEN).u8(fields.user.id_type)
            .str8(fields.user.user_id).u16(fields.birth_year).u8(fields.birth_month)
            .u8(fields.birth_day).u8(fields.method).i64(fields.verified_at_ms)
            .i64(fields.valid_until_ms).u64(fields.counter).i64(fields.timestamp_ms)
            .getvalue())


def sign_age_record(fields: AgeRecordFields, device_key: bytes) -> bytes:
    """Build a complete age record: the fields plus their HMAC-SHA256 tag."""
    signed = age_record_signed_part(fields)
    return signed + inherent_id_tag(signed, device_key)


def parse_age_record(record: bytes) -> Tuple[AgeRecordFields, bytes]:
    """Split an age record into its fields and its 32-byte tag (no verification)."""
    reader = BodyReader(record)
    record_format, key_version = reader.u8(), reader.u16()
    if record_format != AGE_RECORD_FORMAT:
        raise DecodeError(f"age record format must be 0xA1, got 0x{record_format:02x}")
    card_idm, user = reader.take(CARD_IDM_LEN), reader.user()
    year, month, day, method = reader.u16(), reader.u8(), reader.u8(), reader.u8()
    verified_at, valid_until = reader.i64(), reader.i64()
    counter, timestamp, tag = reader.u64(), reader.i64(), reader.take(TAG_LEN)
    reader.finish()
    fields = AgeRecordFields(key_version, card_idm, user, year, month, day,
                             _maybe_enum(VerificationMethod, method), verified_at,
                             valid_until, counter, timestamp, record_format)
    return fields, tag


def verify_age_record(record: bytes, device_key: bytes) -> bool:
    """Whether the age record's tag verifies under ``device_key``."""
    return verify_inherent_id(record, device_key)


def encode_register_age(client_request_id: int, age_record: bytes) -> bytes:
    """``REGISTER_AGE`` request body."""
    return BodyWriter().u128(client_request_id).bytes16(age_record).getvalue()


def decode_register_age(body: bytes) -> Tuple[int, bytes]:
    """``REGISTER_AGE`` request body: ``(client_request_id, age_record)``."""
    reader = BodyReader(body)
    result = reader.u128(), reader.bytes16()
    reader.finish()
    return result


# --------------------------------------------------------------------------
# AUTHORIZE_BASKET (section 5)
# --------------------------------------------------------------------------

_CATEGORY_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_")


@dataclass(frozen=True)
class BasketItem:
    """One basket line: ``quantity`` × ``unit_amount_minor``."""

    item_id: str
    category: str
    quantity: int
    unit_amount_minor: int

    @property
    def total_minor(self) -> int:
        """``quantity × unit_amount_minor``."""
        return self.quantity * self.unit_amount_minor


@dataclass(frozen=True)
class BasketRequest:
    """A decoded ``AUTHORIZE_BASKET`` request body."""

    client_request_id: int
    inherent_id: bytes
    flags: int
    items: Tuple[BasketItem, ...]

    @property
    def age_confirmation(self) -> bool:
        """The age-confirmation flag (bit 0)."""
        return bool(self.flags & BASKET_FLAG_AGE_CONFIRMATION)


@dataclass(frozen=True)
class AgeVerdict:
    """The verdict of an ``AUTHORIZE_BASKET`` reply."""

    age_check: int
    amount_minor: int
    item_ids: Tuple[str, ...] = ()


@dataclass(frozen=True)
class BasketReply:
    """``AUTHORIZE_BASKET`` reply: the outcome and, when present, the verdict."""

    outcome: Outcome
    verdict: Optional[AgeVerdict]


def validate_basket_item(item: BasketItem) -> None:
    """Raise ``ValueError`` when ``item`` breaks a limit of section 5."""
    raw_id = item.item_id.encode("utf-8")
    if not 1 <= len(raw_id) <= ITEM_ID_MAX:
        raise ValueError(f"item ID must be 1-{ITEM_ID_MAX} bytes, got {len(raw_id)}")
    # "printable ASCII": the document does not say whether the space counts
    # (it says so only for terminal IDs); the server declines an item ID
    # with a space (reason 71), so we keep to 0x21-0x7E.
    if any(not 0x21 <= byte <= 0x7E for byte in raw_id):
        raise ValueError("item ID must be printable ASCII without the space")
    raw_category = item.category.encode("utf-8")
    if len(raw_category) > CATEGORY_MAX:
        raise ValueError(f"category must be 0-{CATEGORY_MAX} bytes, got {len(raw_category)}")
    if any(byte not in _CATEGORY_CHARS for byte in raw_category):
        raise ValueError("category may hold only a-z, 0-9 and _")
    if not 1 <= item.quantity <= QUANTITY_MAX:
        raise ValueError(f"quantity must be 1-{QUANTITY_MAX}, got {item.quantity}")
    if not 0 <= item.unit_amount_minor < 1 << 64:
        raise ValueError(f"unit amount {item.unit_amount_minor} does not fit u64")


def _check_unique_item_ids(items: Sequence[BasketItem]) -> None:
    """Item IDs must be unique within a basket (a duplicate is reason 71)."""
    seen = set()
    for item in items:
        if item.item_id in seen:
            raise ValueError(f"duplicate item ID {item.item_id!r}")
        seen.add(item.item_id)


def _check_basket_shape(flags: int, count: int) -> None:
    if flags & ~KNOWN_BASKET_FLAGS:
        raise ValueError(f"basket flags 0x{flags:02x}: only bit 0 is defined")
    if not BASKET_ITEMS_MIN <= count <= BASKET_ITEMS_MAX:
        raise ValueError(f"item count must be {BASKET_ITEMS_MIN}-{BASKET_ITEMS_MAX}, got {count}")


def _write_basket(writer: BodyWriter, items: Sequence[BasketItem], age_confirmation: bool,
                  flags: Optional[int], validate: bool) -> BodyWriter:
    """Append ``u8 flags``, ``u16 item_count`` and the lines, as ``AUTHORIZE_BASKET``
    lays them out (``REDEEM_CODE_BASKET`` reuses the layout).

    ``flags`` overrides ``age_confirmation`` (for tests of reserved bits);
    ``validate=False`` skips the client-side limit checks so that a test can
    send what the server must reject.
    """
    if flags is None:
        flags = BASKET_FLAG_AGE_CONFIRMATION if age_confirmation else 0
    if validate:
        _check_basket_shape(flags, len(items))
        for item in items:
            validate_basket_item(item)
        _check_unique_item_ids(items)
    writer.u8(flags).u16(len(items))
    for item in items:
        (writer.str8(item.item_id).str8(item.category).u32(item.quantity)
         .u64(item.unit_amount_minor))
    return writer


def encode_authorize_basket(client_request_id: int, inherent_id: bytes,
                            items: Sequence[BasketItem], *, age_confirmation: bool = False,
                            flags: Optional[int] = None, validate: bool = True) -> bytes:
    """``AUTHORIZE_BASKET`` request body (see :func:`_write_basket` for the
    keyword arguments)."""
    writer = BodyWriter().u128(client_request_id).bytes16(inherent_id)
    return _write_basket(writer, items, age_confirmation, flags, validate).getvalue()


def decode_authorize_basket(body: bytes, *, validate: bool = True) -> BasketRequest:
    """``AUTHORIZE_BASKET`` request body (offline tests; a server's view)."""
    reader = BodyReader(body)
    client_request_id, inherent_id = reader.u128(), reader.bytes16()
    flags, count = reader.u8(), reader.u16()
    if validate:
        try:
            _check_basket_shape(flags, count)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
    items = []
    for _ in range(count):
        item = BasketItem(reader.str8(), reader.str8(), reader.u32(), reader.u64())
        if validate:
            try:
                validate_basket_item(item)
            except ValueError as exc:
                raise DecodeError(str(exc)) from None
        items.append(item)
    reader.finish()
    if validate:
        try:
            _check_unique_item_ids(items)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
    return BasketRequest(client_request_id, inherent_id, flags, tuple(items))


def encode_basket_reply(reply: BasketReply) -> bytes:
    """``AUTHORIZE_BASKET`` reply body."""
    writer = BodyWriter()
    _write_outcome(writer, reply.outcome)
    if reply.verdict is None:
        writer.u8(0)
    else:
        verdict = reply.verdict
        writer.u8(1).u8(verdict.age_check).u64(verdict.amount_minor).u16(len(verdict.item_ids))
        for item_id in verdict.item_ids:
            writer.str8(item_id)
    return writer.getvalue()


def decode_basket_reply(body: bytes) -> BasketReply:
    """``AUTHORIZE_BASKET`` reply body."""
    reader = BodyReader(body)
    outcome = _read_outcome(reader)
    verdict = None
    if reader.flag():
        age_check = reader.u8()
        if age_check not in tuple(AgeCheck):
            raise DecodeError(f"unknown age_check {age_check}")
        amount, count = reader.u64(), reader.u16()
        verdict = AgeVerdict(AgeCheck(age_check), amount,
                             tuple(reader.str8() for _ in range(count)))
    reader.finish()
    return BasketReply(outcome, verdict)


# --------------------------------------------------------------------------
# SET_AGE_POLICY (section 5)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AgePolicy:
    """A store terminal's own age policy."""

    jurisdiction: str
    time_zone: str
    on_failure: int = OnFailure.REFUSE
    strict: bool = False


@dataclass(frozen=True)
class SetAgePolicyRequest:
    """A decoded ``SET_AGE_POLICY`` request body."""

    client_request_id: int
    provider_code: int
    terminal_id: str
    policy: Optional[AgePolicy]


def encode_set_age_policy(client_request_id: int, provider_code: int, terminal_id: str,
                          policy: Optional[AgePolicy]) -> bytes:
    """``SET_AGE_POLICY`` request body (``policy`` ``None``: clear it)."""
    writer = (BodyWriter().u128(client_request_id).u32(provider_code).str8(terminal_id)
              .u8(int(policy is not None)))
    if policy is not None:
        (writer.str8(policy.jurisdiction).str8(policy.time_zone).u8(policy.on_failure)
         .u8(int(policy.strict)))
    return writer.getvalue()


def decode_set_age_policy(body: bytes) -> SetAgePolicyRequest:
    """``SET_AGE_POLICY`` request body (offline round-trip tests)."""
    reader = BodyReader(body)
    client_request_id, provider_code, terminal_id = reader.u128(), reader.u32(), reader.str8()
    policy = None
    if reader.flag():
        jurisdiction, time_zone, on_failure = reader.str8(), reader.str8(), reader.u8()
        if on_failure not in tuple(OnFailure):
            raise DecodeError(f"on_failure must be 1 or 2, got {on_failure}")
        policy = AgePolicy(jurisdiction, time_zone, OnFailure(on_failure), reader.flag())
    reader.finish()
    return SetAgePolicyRequest(client_request_id, provider_code, terminal_id, policy)


# --------------------------------------------------------------------------
# Stores and the wallet (section 5, W1-W3)
# --------------------------------------------------------------------------

STORE_ID_MAX = 32
STORE_NAME_MAX = 64
STORE_INDUSTRY_MAX = 32
STORE_ADDRESS_MAX = 128
STORE_SIGNALS_MAX = 16          # beacons, and Wi-Fi IDs, per store
SIGNAL_ID_MAX = 64
QR_CODE_MAX = 512
ACCEPTED_MAX = 16
BRAND_MAX = 32
RADIUS_MIN_M = 1
RADIUS_MAX_M = 50_000
LATITUDE_E7_MAX = 900_000_000
LONGITUDE_E7_MAX = 1_800_000_000
TOP_UP_MAX = 10 ** 12
BALANCE_MAX = 10 ** 12
EARTH_RADIUS_M = 6_371_008.8
MPM_PREFIX = "000201"
MPM_CRC_TAG = "6304"
MPM_MAX = 512
MPM_NETWORK_TEMPLATES = range(26, 52)   # merchant account templates 26-51


class Signal(enum.IntEnum):
    """``STORE_BY_SIGNAL`` signal kinds."""

    BEACON = 1
    WIFI = 2
    QR_POSTER = 3


class BestBy(enum.IntEnum):
    """``USABLE_METHODS`` ``best_by``."""

    MOST_USED = 0
    LARGEST_BALANCE = 1


@dataclass(frozen=True)
class AcceptedMethod:
    """A store's accepted method: a means kind and a brand (empty: any)."""

    means_kind: int
    brand: str = ""


@dataclass(frozen=True)
class Store:
    """A ``store`` (section 5, "Stores and the wallet")."""

    store_id: str
    name: str
    latitude_e7: int
    longitude_e7: int
    industry: str = ""
    address: str = ""
    beacons: Tuple[str, ...] = ()
    wifi_ids: Tuple[str, ...] = ()
    qr_code: bytes = b""
    accepted: Tuple[AcceptedMethod, ...] = ()


@dataclass(frozen=True)
class Entered:
    """``entered``: the store found and how (distance, ties, MPM networks)."""

    store: Store
    distance_mm: Optional[int] = None
    tied: Tuple[str, ...] = ()
    networks: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Balance:
    """``balance``: a stored-value purse (``TOP_UP`` reply)."""

    balance_minor: int
    available_minor: int
    currency: str


@dataclass(frozen=True)
class WalletEntry:
    """``wallet_entry``: a ``LIST_MEANS`` entry plus its purse.

    ``balance`` is ``None`` when ``has_balance`` is 0. A purse that never had
    a top-up has zeros; its currency (three zero bytes) decodes as ``""``.
    """

    means: MeansEntry
    balance: Optional[Balance]


@dataclass(frozen=True)
class UsableMethods:
    """``USABLE_METHODS`` reply."""

    store_id: str
    methods: Tuple[Tuple[WalletEntry, bool], ...]
    best_means_id: Optional[int]
    accepted: Tuple[AcceptedMethod, ...]

    @property
    def usable_ids(self) -> List[int]:
        """Means IDs marked usable, in reply order."""
        return [entry.means.means_id for entry, usable in self.methods if usable]


def degrees_to_e7(degrees: float) -> int:
    """Degrees to the wire's ``degrees × 10^7`` (rounded)."""
    return int(round(degrees * 10_000_000))


def e7_to_degrees(value: int) -> float:
    """The wire's ``degrees × 10^7`` to degrees."""
    return value / 10_000_000


def great_circle_m(lat1_e7: int, lon1_e7: int, lat2_e7: int, lon2_e7: int) -> float:
    """Great-circle distance in metres on a sphere of radius 6,371,008.8 m.

    Haversine form, numerically sound for the short distances of the tests.
    """
    phi1, phi2 = math.radians(e7_to_degrees(lat1_e7)), math.radians(e7_to_degrees(lat2_e7))
    dphi = phi2 - phi1
    dlam = math.radians(e7_to_degrees(lon2_e7) - e7_to_degrees(lon1_e7))
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlam / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


# CRC-16/CCITT-FALSE and the EMVCo merchant-presented payload -------------

def crc16_ccitt_false(data: Union[bytes, str]) -> int:
    """CRC-16/CCITT-FALSE: polynomial 0x1021, init 0xFFFF, no reflection, no xorout.

    ``crc16_ccitt_false(b"123456789") == 0x29B1``.
    """
    if isinstance(data, str):
        data = data.encode("ascii")
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


class MpmError(ValueError):
    """An MPM payload with a bad structure or CRC (the server's reason 81)."""


def mpm_object(tag: Union[int, str], value: str) -> str:
    """One data object ``ID LEN VALUE`` (two digits, two digits, value)."""
    tag = f"{int(tag):02d}" if not isinstance(tag, str) else tag
    if len(tag) != 2 or not tag.isdigit():
        raise ValueError(f"MPM object ID must be two digits, got {tag!r}")
    if len(value) > 99:
        raise ValueError(f"MPM object value of {len(value)} characters exceeds 99")
    return f"{tag}{len(value):02d}{value}"


def mpm_with_crc(body: str) -> str:
    """Append the CRC object: ``6304`` and four upper-case hex digits over
    every character before them (``6304`` included)."""
    head = body + MPM_CRC_TAG
    return head + f"{crc16_ccitt_false(head):04X}"


def build_mpm(objects: Sequence[Tuple[Union[int, str], str]]) -> str:
    """An MPM payload from ``(ID, value)`` objects, with ``00`` = ``01`` first
    when absent, and the CRC object appended."""
    objects = list(objects)
    if not objects or f"{int(objects[0][0]):02d}" != "00":
        objects.insert(0, ("00", "01"))
    return mpm_with_crc("".join(mpm_object(tag, value) for tag, value in objects))


def build_merchant_mpm(networks: Sequence[str], *, name: str = "PY SPEC SHOP",
                       city: str = "TOKYO", mcc: str = "5411", currency: str = "392",
                       country: str = "JP", dynamic: bool = False,
                       extra: Sequence[Tuple[Union[int, str], str]] = ()) -> str:
    """A typical merchant-presented payload naming ``networks`` (templates
    26, 27, ... each with sub-object ``00`` = the network and ``01`` = a
    merchant number)."""
    objects: List[Tuple[Union[int, str], str]] = [("00", "01"), ("01", "12" if dynamic else "11")]
    for index, network in enumerate(networks):
        template = mpm_object("00", network) + mpm_object("01", f"M{index:04d}")
        objects.append((26 + index, template))
    objects += [("52", mcc), ("53", currency), ("58", country), ("59", name), ("60", city)]
    objects += list(extra)
    return build_mpm(objects)


def parse_tlv(text: str) -> List[Tuple[str, str]]:
    """Split ``text`` into ``(ID, value)`` objects; :class:`MpmError` if it
    is not a sequence of ``ID LEN VALUE``."""
    objects, pos = [], 0
    while pos < len(text):
        if pos + 4 > len(text):
            raise MpmError(f"truncated object header at {pos}")
        tag, length = text[pos:pos + 2], text[pos + 2:pos + 4]
        if not (tag.isdigit() and tag.isascii() and length.isdigit() and length.isascii()):
            raise MpmError(f"object ID/length not digits at {pos}: {text[pos:pos + 4]!r}")
        end = pos + 4 + int(length)
        if end > len(text):
            raise MpmError(f"object {tag} runs past the end")
        objects.append((tag, text[pos + 4:end]))
        pos = end
    return objects


def is_mpm(payload: Union[bytes, str]) -> bool:
    """Whether a poster payload is an EMVCo MPM payload (starts with ``000201``)."""
    if isinstance(payload, bytes):
        return payload.startswith(MPM_PREFIX.encode("ascii"))
    return payload.startswith(MPM_PREFIX)


def _unique_ids(objects: List[Tuple[str, str]]) -> None:
    """An ID appears at most once at the top level and within a template."""
    tags = [tag for tag, _ in objects]
    if len(set(tags)) != len(tags):
        raise MpmError("MPM data object ID repeated")


def parse_mpm(payload: Union[bytes, str]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """Check an MPM payload as section 5 describes; return its objects and
    the networks its templates 26-51 name (in payload order).

    Raises :class:`MpmError` for a bad structure or CRC.
    """
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("ascii")
        except UnicodeDecodeError:
            raise MpmError("MPM payload is not ASCII") from None
    if not payload.isascii():
        raise MpmError("MPM payload is not ASCII")
    if not payload.startswith(MPM_PREFIX):
        raise MpmError("MPM payload must start with 000201")
    if len(payload) > MPM_MAX:
        raise MpmError(f"MPM payload of {len(payload)} characters exceeds {MPM_MAX}")
    objects = parse_tlv(payload)
    _unique_ids(objects)
    if not objects or objects[-1][0] != "63" or len(objects[-1][1]) != 4:
        raise MpmError("MPM payload must end with the CRC object 6304")
    crc_text = objects[-1][1]
    if any(c not in "0123456789ABCDEF" for c in crc_text):
        raise MpmError(f"CRC {crc_text!r} is not four upper-case hex digits")
    if int(crc_text, 16) != crc16_ccitt_false(payload[:-4]):
        raise MpmError(f"CRC {crc_text} does not match "
                       f"{crc16_ccitt_false(payload[:-4]):04X}")
    networks = []
    for tag, value in objects:
        if int(tag) in MPM_NETWORK_TEMPLATES:
            subs = parse_tlv(value)
            _unique_ids(subs)
            subs = dict(subs)
            if "00" in subs:
                networks.append(subs["00"])
    return objects, networks


def mpm_networks(payload: Union[bytes, str]) -> List[str]:
    """The networks an MPM payload names (see :func:`parse_mpm`)."""
    return parse_mpm(payload)[1]


# Store validation ----------------------------------------------------------

def _visible_ascii(data: bytes) -> bool:
    return all(0x21 <= byte <= 0x7E for byte in data)


def _no_controls(text: str) -> bool:
    return not any(ord(ch) < 0x20 or ord(ch) == 0x7F or 0x80 <= ord(ch) < 0xA0 for ch in text)


def validate_store(store: Store) -> None:
    """Raise ``ValueError`` when ``store`` breaks a limit of section 5
    (the server's reason 80, or 81 for a bad MPM poster)."""
    def check_text(label, text, low, high):
        size = len(text.encode("utf-8"))
        if not low <= size <= high:
            raise ValueError(f"{label} must be {low}-{high} bytes, got {size}")
        if not _no_controls(text):
            raise ValueError(f"{label} holds a control character")

    raw_id = store.store_id.encode("utf-8")
    if not 1 <= len(raw_id) <= STORE_ID_MAX or not _visible_ascii(raw_id):
        raise ValueError(f"store ID must be 1-{STORE_ID_MAX} bytes of 0x21-0x7E")
    check_text("name", store.name, 1, STORE_NAME_MAX)
    check_text("industry", store.industry, 0, STORE_INDUSTRY_MAX)
    check_text("address", store.address, 0, STORE_ADDRESS_MAX)
    if not -LATITUDE_E7_MAX <= store.latitude_e7 <= LATITUDE_E7_MAX:
        raise ValueError(f"latitude_e7 {store.latitude_e7} out of -90..90 degrees")
    if not -LONGITUDE_E7_MAX <= store.longitude_e7 <= LONGITUDE_E7_MAX:
        raise ValueError(f"longitude_e7 {store.longitude_e7} out of -180..180 degrees")
    for label, ids in (("beacon", store.beacons), ("Wi-Fi ID", store.wifi_ids)):
        if len(ids) > STORE_SIGNALS_MAX:
            raise ValueError(f"at most {STORE_SIGNALS_MAX} {label}s, got {len(ids)}")
        for signal_id in ids:
            raw = signal_id.encode("utf-8")
            if not 1 <= len(raw) <= SIGNAL_ID_MAX or not _visible_ascii(raw):
                raise ValueError(f"{label} must be 1-{SIGNAL_ID_MAX} bytes of 0x21-0x7E")
    if store.qr_code:
        if is_mpm(store.qr_code):
            parse_mpm(store.qr_code)       # MpmError is a ValueError
        elif len(store.qr_code) > QR_CODE_MAX or not _visible_ascii(store.qr_code):
            raise ValueError(f"plain poster code must be 1-{QR_CODE_MAX} bytes of 0x21-0x7E")
    if len(store.accepted) > ACCEPTED_MAX:
        raise ValueError(f"at most {ACCEPTED_MAX} accepted methods, got {len(store.accepted)}")
    for method in store.accepted:
        if method.means_kind not in tuple(MeansKind):
            raise ValueError(f"unknown means kind {method.means_kind}")
        check_text("brand", method.brand, 0, BRAND_MAX)


def _write_store(writer: BodyWriter, store: Store) -> None:
    """Append a ``store``."""
    writer.str8(store.store_id).str8(store.name).str8(store.industry).str8(store.address)
    writer.i32(store.latitude_e7).i32(store.longitude_e7)
    writer.u8(len(store.beacons))
    for beacon in store.beacons:
        writer.str8(beacon)
    writer.u8(len(store.wifi_ids))
    for wifi_id in store.wifi_ids:
        writer.str8(wifi_id)
    writer.bytes16(store.qr_code)
    writer.u8(len(store.accepted))
    for method in store.accepted:
        writer.u8(method.means_kind).str8(method.brand)


def _read_store(reader: BodyReader) -> Store:
    """Read a ``store``."""
    store_id, name, industry, address = reader.str8(), reader.str8(), reader.str8(), reader.str8()
    lat, lon = reader.i32(), reader.i32()
    beacons = tuple(reader.str8() for _ in range(reader.u8()))
    wifi_ids = tuple(reader.str8() for _ in range(reader.u8()))
    qr_code = reader.bytes16()
    accepted = tuple(AcceptedMethod(_maybe_enum(MeansKind, reader.u8()), reader.str8())
                     for _ in range(reader.u8()))
    return Store(store_id, name, lat, lon, industry, address, beacons, wifi_ids,
                 qr_code, accepted)


def encode_store(store: Store) -> bytes:
    """A ``store`` on its own."""
    writer = BodyWriter()
    _write_store(writer, store)
    return writer.getvalue()


def decode_store(body: bytes) -> Store:
    """A ``store`` on its own."""
    reader = BodyReader(body)
    store = _read_store(reader)
    reader.finish()
    return store


# UPSERT_STORE / REMOVE_STORE ------------------------------------------------

def encode_upsert_store(client_request_id: int, store: Store, *, validate: bool = True) -> bytes:
    """``UPSERT_STORE`` request body (``validate=False`` to send what the
    server must refuse)."""
    if validate:
        validate_store(store)
    writer = BodyWriter().u128(client_request_id)
    _write_store(writer, store)
    return writer.getvalue()


def decode_upsert_store(body: bytes) -> Tuple[int, Store]:
    """``UPSERT_STORE`` request body: ``(client_request_id, store)``."""
    reader = BodyReader(body)
    client_request_id = reader.u128()
    store = _read_store(reader)
    reader.finish()
    return client_request_id, store


def encode_remove_store(client_request_id: int, store_id: str) -> bytes:
    """``REMOVE_STORE`` request body."""
    return BodyWriter().u128(client_request_id).str8(store_id).getvalue()


# STORE_AT / STORE_BY_SIGNAL / entered --------------------------------------

def encode_store_at(latitude_e7: int, longitude_e7: int, radius_m: int) -> bytes:
    """``STORE_AT`` request body (no client-side range checks: the server
    answers reason 89 for a coordinate or radius out of range)."""
    return BodyWriter().i32(latitude_e7).i32(longitude_e7).u32(radius_m).getvalue()


def decode_store_at(body: bytes) -> Tuple[int, int, int]:
    """``STORE_AT`` request body: ``(latitude_e7, longitude_e7, radius_m)``."""
    reader = BodyReader(body)
    result = reader.i32(), reader.i32(), reader.u32()
    reader.finish()
    return result


def encode_store_by_signal(signal: int, signal_id: Union[str, bytes], *,
                           validate: bool = True) -> bytes:
    """``STORE_BY_SIGNAL`` request body (``signal`` 1-3 unless ``validate``
    is false)."""
    if validate and signal not in tuple(Signal):
        raise ValueError(f"signal must be 1-3, got {signal}")
    data = signal_id.encode("utf-8") if isinstance(signal_id, str) else bytes(signal_id)
    return BodyWriter().u8(signal).bytes16(data).getvalue()


def decode_store_by_signal(body: bytes) -> Tuple[int, bytes]:
    """``STORE_BY_SIGNAL`` request body: ``(signal, id)``; a signal byte
    other than 1-3 is a :class:`DecodeError`."""
    reader = BodyReader(body)
    signal = reader.u8()
    if signal not in tuple(Signal):
        raise DecodeError(f"signal must be 1-3, got {signal}")
    data = reader.bytes16()
    reader.finish()
    return Signal(signal), data


def encode_entered(entered: Entered) -> bytes:
    """``entered`` reply body (``STORE_AT``, ``STORE_BY_SIGNAL``)."""
    writer = BodyWriter()
    _write_store(writer, entered.store)
    writer.u8(int(entered.distance_mm is not None)).u64(entered.distance_mm or 0)
    writer.u8(len(entered.tied))
    for store_id in entered.tied:
        writer.str8(store_id)
    writer.u8(len(entered.networks))
    for network in entered.networks:
        writer.str8(network)
    return writer.getvalue()


def decode_entered(body: bytes) -> Entered:
    """``entered`` reply body."""
    reader = BodyReader(body)
    store = _read_store(reader)
    has_distance, distance = reader.flag(), reader.u64()
    if not has_distance and distance != 0:
        raise DecodeError("distance_mm must be 0 when has_distance is 0")
    tied = tuple(reader.str8() for _ in range(reader.u8()))
    networks = tuple(reader.str8() for _ in range(reader.u8()))
    reader.finish()
    return Entered(store, distance if has_distance else None, tied, networks)


# VOID / REFUND -----------------------------------------------------------------

TARGET_CODE = 1
"""``target`` of ``VOID`` and ``REFUND``: a payment code by issue number."""
TARGET_PAYMENT = 2
"""``target`` of ``REFUND``: a settled payment, by its user and its ``AUTHORIZE``'s client
request ID."""


@dataclasses.dataclass(frozen=True)
class Refunded:
    """A ``REFUND`` reply."""
    amount_minor: int
    refunded_minor: int
    captured_minor: int


def encode_void(client_request_id: int, number: int, terminal_id: str) -> bytes:
    """``VOID`` request body: ``u128``, ``u8 target`` (1), ``u64 number``, ``str8``."""
    return (BodyWriter().u128(client_request_id).u8(TARGET_CODE).u64(number)
            .str8(terminal_id).getvalue())


def decode_voided(body: bytes) -> int:
    """``VOID`` reply body: ``u64 released_minor``."""
    reader = BodyReader(body)
    released = reader.u64()
    reader.finish()
    return released


def encode_refund(client_request_id: int, number: int, amount_minor: int,
                  terminal_id: str) -> bytes:
    """``REFUND`` request body: ``u128``, ``u8 target`` (1), ``u64 number``,
    ``u64 amount_minor``, ``str8 terminal_id``."""
    return (BodyWriter().u128(client_request_id).u8(TARGET_CODE).u64(number)
            .u64(amount_minor).str8(terminal_id).getvalue())


def encode_refund_payment(client_request_id: int, user: User, payment_request_id: int,
                          amount_minor: int, terminal_id: str) -> bytes:
    """``REFUND`` of a settled payment: ``u128``, ``u8 target`` (2), ``user``,
    ``u128 payment_request_id``, ``u64 amount_minor``, ``str8 terminal_id``."""
    return (BodyWriter().u128(client_request_id).u8(TARGET_PAYMENT).user(user)
            .u128(payment_request_id).u64(amount_minor).str8(terminal_id).getvalue())


def decode_refunded(body: bytes) -> Refunded:
    """``REFUND`` reply body: three ``u64``."""
    reader = BodyReader(body)
    refunded = Refunded(reader.u64(), reader.u64(), reader.u64())
    reader.finish()
    return refunded


# TOP_UP / balance ------------------------------------------------------------

def encode_top_up(client_request_id: int, user: User, means_id: int, amount_minor: int,
                  currency: str) -> bytes:
    """``TOP_UP`` request body."""
    return (BodyWriter().u128(client_request_id).user(user).u32(means_id).u64(amount_minor)
            .ascii(currency, 3).getvalue())


def _read_currency(reader: BodyReader) -> str:
    raw = reader.take(3)
    if raw == b"\x00\x00\x00":
        return ""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError(f"currency {raw!r} is not ASCII") from None


def _write_currency(writer: BodyWriter, currency: str) -> None:
    writer.raw(currency.encode("ascii") if currency else b"\x00\x00\x00", 3)


def encode_balance(balance: Balance) -> bytes:
    """``balance`` reply body."""
    writer = BodyWriter().u64(balance.balance_minor).u64(balance.available_minor)
    _write_currency(writer, balance.currency)
    return writer.getvalue()


def decode_balance(body: bytes) -> Balance:
    """``balance`` reply body (``TOP_UP``)."""
    reader = BodyReader(body)
    balance = Balance(reader.u64(), reader.u64(), _read_currency(reader))
    reader.finish()
    return balance


# WALLET / USABLE_METHODS -------------------------------------------------

def _write_wallet_entry(writer: BodyWriter, entry: WalletEntry) -> None:
    _write_means_entry(writer, entry.means)
    balance = entry.balance or Balance(0, 0, "")
    writer.u8(int(entry.balance is not None)).u64(balance.balance_minor)
    writer.u64(balance.available_minor)
    _write_currency(writer, balance.currency)


def _read_wallet_entry(reader: BodyReader) -> WalletEntry:
    means = _read_means_entry(reader)
    has_balance, balance = reader.flag(), Balance(reader.u64(), reader.u64(),
                                                  _read_currency(reader))
    if not has_balance and balance != Balance(0, 0, ""):
        raise DecodeError("balance fields must be zeros when has_balance is 0")
    return WalletEntry(means, balance if has_balance else None)


def encode_user_request(user: User) -> bytes:
    """``WALLET`` request body: a ``user``."""
    return BodyWriter().user(user).getvalue()


encode_wallet = encode_user_request


def encode_wallet_reply(entries: Sequence[WalletEntry]) -> bytes:
    """``WALLET`` reply body."""
    writer = BodyWriter().u8(len(entries))
    for entry in entries:
        _write_wallet_entry(writer, entry)
    return writer.getvalue()


def decode_wallet(body: bytes) -> List[WalletEntry]:
    """``WALLET`` reply body."""
    reader = BodyReader(body)
    entries = [_read_wallet_entry(reader) for _ in range(reader.u8())]
    reader.finish()
    return entries


def encode_usable_methods(user: User, store_id: str, best_by: int = BestBy.MOST_USED, *,
                          validate: bool = True) -> bytes:
    """``USABLE_METHODS`` request body (``best_by`` 0 or 1 unless ``validate``
    is false)."""
    if validate and best_by not in tuple(BestBy):
        raise ValueError(f"best_by must be 0 or 1, got {best_by}")
    return BodyWriter().user(user).str8(store_id).u8(best_by).getvalue()


def encode_usable_methods_reply(reply: UsableMethods) -> bytes:
    """``USABLE_METHODS`` reply body."""
    writer = BodyWriter().str8(reply.store_id).u8(len(reply.methods))
    for entry, usable in reply.methods:
        _write_wallet_entry(writer, entry)
        writer.u8(int(usable))
    writer.u8(int(reply.best_means_id is not None)).u32(reply.best_means_id or 0)
    writer.u8(len(reply.accepted))
    for method in reply.accepted:
        writer.u8(method.means_kind).str8(method.brand)
    return writer.getvalue()


def decode_usable_methods(body: bytes) -> UsableMethods:
    """``USABLE_METHODS`` reply body."""
    reader = BodyReader(body)
    store_id = reader.str8()
    methods = tuple((_read_wallet_entry(reader), reader.flag()) for _ in range(reader.u8()))
    has_best, best = reader.flag(), reader.u32()
    if not has_best and best != 0:
        raise DecodeError("best_means_id must be 0 when has_best is 0")
    accepted = tuple(AcceptedMethod(_maybe_enum(MeansKind, reader.u8()), reader.str8())
                     for _ in range(reader.u8()))
    reader.finish()
    return UsableMethods(store_id, methods, best if has_best else None, accepted)


# --------------------------------------------------------------------------
# The connection
# --------------------------------------------------------------------------


def parse_addr(text: Optional[str]) -> Tuple[str, int]:
    """Parse ``host:port`` (default ``127.0.0.1:7878``)."""
    if not text:
        return DEFAULT_HOST, DEFAULT_PORT
    host, _, port = text.rpartition(":")
    return host.strip("[]") or DEFAULT_HOST, int(port)


Request = Tuple[int, bytes]  # (opcode, body)


class SettlegateClient:
    """A blocking protocol connection.

    Request IDs are allocated from 1 upwards (0 is what ``FRAME_ERROR``
    frames carry). Frames that arrive while waiting for another request are
    kept until asked for; ``PUSH`` frames go to a notice queue.
    """

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self._rbuf = bytearray()
        self._next_request_id = 1
        self._pending: dict = {}
        self._pushes: deque = deque()
        self.closed_by_peer = False

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def connect(cls, addr: Union[str, Tuple[str, int], None] = None,
                timeout: float = 10.0) -> "SettlegateClient":
        """Open a TCP connection to ``addr`` (``host:port`` or a tuple)."""
        if addr is None or isinstance(addr, str):
            addr = parse_addr(addr)
        sock = socket.create_connection(addr, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, timeout)

    def close(self) -> None:
        """Close the socket."""
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "SettlegateClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- raw I/O ------------------------------------------------------------

    def next_request_id(self) -> int:
        """Allocate a fresh request ID."""
        request_id = self._next_request_id
        self._next_request_id += 1
        return request_id

    def send_raw(self, data: bytes) -> None:
        """Write raw bytes (for malformed-input tests)."""
        self.sock.sendall(data)

    def send(self, opcode: int, body: bytes = b"", request_id: Optional[int] = None) -> int:
        """Send one request frame and return its request ID."""
        if request_id is None:
            request_id = self.next_request_id()
        self.sock.sendall(encode_frame(opcode, request_id, body))
        return request_id

    def send_many(self, requests: Iterable[Request]) -> List[int]:
        """Send several request frames in one write; return their request IDs."""
        ids, data = [], bytearray()
        for opcode, body in requests:
            request_id = self.next_request_id()
            ids.append(request_id)
            data += encode_frame(opcode, request_id, body)
        self.sock.sendall(bytes(data))
        return ids

    def _fill(self, size: int, deadline: float) -> None:
        """Read until the buffer holds ``size`` bytes or the deadline passes."""
        while len(self._rbuf) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("timed out waiting for a frame")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65_536)
            if not chunk:
                self.closed_by_peer = True
                raise ConnectionClosed("server closed the connection")
            self._rbuf += chunk

    def _take(self, size: int) -> bytes:
        chunk = bytes(self._rbuf[:size])
        del self._rbuf[:size]
        return chunk

    def recv_frame(self, timeout: Optional[float] = None) -> Frame:
        """Read and validate the next frame from the wire."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._fill(HEADER_LEN, deadline)
        header = parse_header(bytes(self._rbuf[:HEADER_LEN]), require_response=True)
        self._fill(HEADER_LEN + header.body_length, deadline)
        self._take(HEADER_LEN)
        return check_body(header, self._take(header.body_length))

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """Whether the peer closes the connection (EOF or reset) within ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._fill(len(self._rbuf) + 1, deadline)
        except (ConnectionClosed, ConnectionResetError):
            return True
        except socket.timeout:
            return False

    # -- request/response matching -----------------------------------------

    def _dispatch(self, frame: Frame) -> None:
        """File a received frame: pushes to the notice queue, others by request ID."""
        if frame.status == Status.FRAME_ERROR:
            raise StatusError(frame.opcode, decode_status_body(frame.status, frame.body))
        if frame.is_push:
            self._pushes.append(frame)
        else:
            self._pending[frame.request_id] = frame

    def wait_for(self, request_id: int, timeout: Optional[float] = None) -> Frame:
        """Return the response to ``request_id``, keeping other frames for later."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while request_id not in self._pending:
            self._dispatch(self.recv_frame(max(0.0, deadline - time.monotonic())))
        return self._pending.pop(request_id)

    def request(self, opcode: int, body: bytes = b"", *, retry_busy: bool = True,
                max_retries: int = 50) -> Frame:
        """Send one request and return its response frame (any status).

        ``BUSY`` answers are retried after their hint with the same frame, as
        section 3 asks, unless ``retry_busy`` is false.
        """
        return self.pipeline([(opcode, body)], retry_busy=retry_busy,
                             max_retries=max_retries)[0]

    def pipeline(self, requests: Sequence[Request], *, retry_busy: bool = True,
                 max_retries: int = 50, timeout: Optional[float] = None) -> List[Frame]:
        """Send all ``requests`` back to back, then collect every response.

        Responses are matched by request ID and returned in request order.
        """
        ids = self.send_many(requests)
        frames: dict = {}
        outstanding = list(zip(ids, requests))
        for _ in range(max_retries + 1):
            busy, longest_hint = [], 0
            for request_id, req in outstanding:
                frame = self.wait_for(request_id, timeout)
                frames[request_id] = frame
                if retry_busy and frame.status == Status.BUSY:
                    busy.append((request_id, req))
                    hint = decode_status_body(frame.status, frame.body).retry_after_ms
                    longest_hint = max(longest_hint, hint)
            if not busy:
                break
            time.sleep(longest_hint / 1000.0)
            for request_id, (opcode, body) in busy:
                self.send(opcode, body, request_id)
            outstanding = busy
        return [frames[request_id] for request_id in ids]

    def call(self, opcode: int, body: bytes = b"") -> bytes:
        """Send one request; return the ``OK`` body or raise :class:`StatusError`."""
        return ok_body(self.request(opcode, body))

    def next_push(self, timeout: Optional[float] = None) -> Frame:
        """Return the next ``PUSH`` frame, reading from the wire if needed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._pushes:
            self._dispatch(self.recv_frame(max(0.0, deadline - time.monotonic())))
        return self._pushes.popleft()

    def next_notice(self, timeout: Optional[float] = None) -> Notice:
        """Return the next ``NOTICE`` push, decoded."""
        frame = self.next_push(timeout)
        if frame.opcode != Op.NOTICE or frame.status != Status.OK:
            raise ProtocolError(f"unexpected push opcode 0x{frame.opcode:04x} "
                                f"status {frame.status}")
        return decode_notice(frame.body)

    # -- operations ----------------------------------------------------------

    def ping(self, payload: bytes = b"") -> bytes:
        """``PING``: returns the echoed payload."""
        return self.call(Op.PING, encode_ping(payload))

    def server_info(self) -> ServerInfo:
        """``SERVER_INFO``."""
        return decode_server_info(self.call(Op.SERVER_INFO))

    def auth(self, key: str) -> AuthReply:
        """``AUTH`` with an API key."""
        return decode_auth_reply(self.call(Op.AUTH, encode_auth(key)))

    def enroll(self, client_request_id: int, user: User, password: str,
               card_idm: bytes) -> DeviceCredential:
        """``ENROLL`` a user with a first device."""
        body = encode_enroll(client_request_id, user, password, card_idm)
        return decode_device_credential(self.call(Op.ENROLL, body))

    def login(self, user: User, password: str) -> None:
        """``LOGIN``: raises :class:`StatusError` (``REFUSED`` 53/54) on failure."""
        _expect_empty(self.call(Op.LOGIN, encode_login(user, password)))

    def add_means(self, client_request_id: int, user: User, means: Means,
                  make_default: bool = False) -> AddedMeans:
        """``ADD_MEANS``."""
        body = encode_add_means(client_request_id, user, means, make_default)
        return decode_add_means_reply(self.call(Op.ADD_MEANS, body))

    def set_default_means(self, client_request_id: int, user: User, means_id: int) -> None:
        """``SET_DEFAULT_MEANS``."""
        body = encode_set_default_means(client_request_id, user, means_id)
        _expect_empty(self.call(Op.SET_DEFAULT_MEANS, body))

    def list_means(self, user: User, order: int = ListOrder.REGISTRATION) -> List[MeansEntry]:
        """``LIST_MEANS``."""
        return decode_list_means(self.call(Op.LIST_MEANS, encode_list_means(user, order)))

    def provision_device(self, client_request_id: int, user: User, password: str,
                         card_idm: bytes) -> DeviceCredential:
        """``PROVISION_DEVICE``: add a device to an existing user."""
        body = encode_provision_device(client_request_id, user, password, card_idm)
        return decode_device_credential(self.call(Op.PROVISION_DEVICE, body))

    def rotate_device_key(self, client_request_id: int, user: User, password: str,
                          card_idm: bytes) -> DeviceCredential:
        """``ROTATE_DEVICE_KEY``."""
        body = encode_rotate_device_key(client_request_id, user, password, card_idm)
        return decode_device_credential(self.call(Op.ROTATE_DEVICE_KEY, body))

    def revoke_device_key(self, client_request_id: int, user: User, password: str,
                          card_idm: bytes) -> None:
        """``REVOKE_DEVICE_KEY``: every key of the device is refused from now on."""
        body = encode_revoke_device_key(client_request_id, user, password, card_idm)
        _expect_empty(self.call(Op.REVOKE_DEVICE_KEY, body))

    def subscribe_notices(self, user: User, password: str) -> int:
        """``SUBSCRIBE_NOTICES``; returns the subscription's request ID."""
        request_id = self.send(Op.SUBSCRIBE_NOTICES, encode_subscribe_notices(user, password))
        _expect_empty(ok_body(self.wait_for(request_id)))
        return request_id

    def register_terminals(self, client_request_id: int, provider_code: int,
                           terminals: Sequence[TerminalEntry]) -> None:
        """``REGISTER_TERMINALS`` (all or nothing)."""
        body = encode_register_terminals(client_request_id, provider_code, terminals)
        _expect_empty(self.call(Op.REGISTER_TERMINALS, body))

    def remove_terminals(self, client_request_id: int, provider_code: int,
                         terminal_ids: Sequence[str]) -> None:
        """``REMOVE_TERMINALS``."""
        body = encode_remove_terminals(client_request_id, provider_code, terminal_ids)
        _expect_empty(self.call(Op.REMOVE_TERMINALS, body))

    def confirm_terminal(self, provider_code: int, terminal_id: str) -> TerminalStatus:
        """``CONFIRM_TERMINAL``."""
        body = encode_confirm_terminal(provider_code, terminal_id)
        return decode_confirm_terminal(self.call(Op.CONFIRM_TERMINAL, body))

    def authorize(self, client_request_id: int, inherent_id: bytes) -> Outcome:
        """``AUTHORIZE``: returns :class:`Approved` or :class:`Declined`."""
        body = encode_authorize(client_request_id, inherent_id)
        return decode_outcome(self.call(Op.AUTHORIZE, body))

    def authorize_basket(self, client_request_id: int, inherent_id: bytes,
                         items: Sequence["BasketItem"], *, age_confirmation: bool = False,
                         flags: Optional[int] = None, validate: bool = True) -> "BasketReply":
        """``AUTHORIZE_BASKET``: the outcome plus the age verdict (if any)."""
        body = encode_authorize_basket(client_request_id, inherent_id, items,
                                       age_confirmation=age_confirmation, flags=flags,
                                       validate=validate)
        return decode_basket_reply(self.call(Op.AUTHORIZE_BASKET, body))

    def register_age(self, client_request_id: int, age_record: bytes) -> None:
        """``REGISTER_AGE``: raises :class:`StatusError` (``REFUSED``) on refusal."""
        _expect_empty(self.call(Op.REGISTER_AGE, encode_register_age(client_request_id,
                                                                     age_record)))

    def set_age_policy(self, client_request_id: int, provider_code: int, terminal_id: str,
                       policy: Optional["AgePolicy"]) -> None:
        """``SET_AGE_POLICY``; ``policy`` ``None`` clears the terminal's own policy."""
        body = encode_set_age_policy(client_request_id, provider_code, terminal_id, policy)
        _expect_empty(self.call(Op.SET_AGE_POLICY, body))

    # -- payment codes --------------------------------------------------------

    def redeem_code_basket(self, client_request_id: int, code: str, issuer: int, number: int,
                           amount_minor: int, currency: str, sale_at_ms: int,
                           terminal_id: str, items: Sequence["BasketItem"], coupon: str = "",
                           order_ref: str = "", *, age_confirmation: bool = False,
                           flags: Optional[int] = None,
                           validate: bool = True) -> "Redemption":
        """``REDEEM_CODE_BASKET``: the ``redemption``, as for ``REDEEM_CODE``;
        raises :class:`StatusError` (``REFUSED``) on refusal."""
        body = encode_redeem_code_basket(client_request_id, code, issuer, number, amount_minor,
                                         currency, sale_at_ms, terminal_id, items, coupon,
                                         order_ref, age_confirmation=age_confirmation,
                                         flags=flags, validate=validate)
        return decode_redemption(self.call(Op.REDEEM_CODE_BASKET, body))

    # -- stores and the wallet ------------------------------------------------

    def upsert_store(self, client_request_id: int, store: "Store", *,
                     validate: bool = True) -> None:
        """``UPSERT_STORE``: add or replace a store."""
        body = encode_upsert_store(client_request_id, store, validate=validate)
        _expect_empty(self.call(Op.UPSERT_STORE, body))

    def remove_store(self, client_request_id: int, store_id: str) -> None:
        """``REMOVE_STORE``."""
        _expect_empty(self.call(Op.REMOVE_STORE, encode_remove_store(client_request_id,
                                                                     store_id)))

    def store_at(self, latitude_e7: int, longitude_e7: int, radius_m: int) -> "Entered":
        """``STORE_AT``: the nearest store within ``radius_m``."""
        body = encode_store_at(latitude_e7, longitude_e7, radius_m)
        return decode_entered(self.call(Op.STORE_AT, body))

    def store_by_signal(self, signal: int, signal_id: Union[str, bytes]) -> "Entered":
        """``STORE_BY_SIGNAL``: a beacon, Wi-Fi ID or QR poster payload."""
        return decode_entered(self.call(Op.STORE_BY_SIGNAL,
                                         encode_store_by_signal(signal, signal_id)))

    def void(self, client_request_id: int, number: int, terminal_id: str) -> int:
        """``VOID`` of payment code ``number``: the amount released."""
        body = encode_void(client_request_id, number, terminal_id)
        return decode_voided(self.call(Op.VOID, body))

    def refund(self, client_request_id: int, number: int, amount_minor: int,
               terminal_id: str) -> "Refunded":
        """``REFUND`` of ``amount_minor`` of redeemed payment code ``number``'s capture."""
        body = encode_refund(client_request_id, number, amount_minor, terminal_id)
        return decode_refunded(self.call(Op.REFUND, body))

    def refund_payment(self, client_request_id: int, user: User, payment_request_id: int,
                       amount_minor: int, terminal_id: str) -> "Refunded":
        """``REFUND`` of ``amount_minor`` of the settled payment ``user`` made with
        ``AUTHORIZE`` client request ID ``payment_request_id``."""
        body = encode_refund_payment(client_request_id, user, payment_request_id, amount_minor,
                                     terminal_id)
        return decode_refunded(self.call(Op.REFUND, body))

    def report(self, business_day: str, provider_code: int, part: int, offset: int = 0,
               rows_max: int = REPORT_ROWS_MAX) -> "ReportPage":
        """``REPORT``: one page of a provider's reconciliation report of a business day."""
        body = encode_report(business_day, provider_code, part, offset, rows_max)
        return decode_report_page(self.call(Op.REPORT, body))

    def report_part(self, business_day: str, provider_code: int, part: int,
                    rows_max: int = REPORT_ROWS_MAX) -> List[str]:
        """A whole part of the report, page by page (``BUSY`` waited out by :meth:`call`):
        the header line, then the rows. Read again from offset 0 when a page comes from
        another build (another ``generated_ms``) than the first."""
        while True:
            first = self.report(business_day, provider_code, part, 0, rows_max)
            lines = list(first.lines)
            while len(lines) < first.total:
                page = self.report(business_day, provider_code, part, len(lines), rows_max)
                if page.generated_ms != first.generated_ms:
                    break
                if not page.lines:
                    raise ProtocolError("an empty page short of the total")
                lines.extend(page.lines)
            else:
                return [first.header] + lines

    def top_up(self, client_request_id: int, user: User, means_id: int, amount_minor: int,
               currency: str) -> "Balance":
        """``TOP_UP`` a stored-value means."""
        body = encode_top_up(client_request_id, user, means_id, amount_minor, currency)
        return decode_balance(self.call(Op.TOP_UP, body))

    def usable_methods(self, user: User, store_id: str,
                       best_by: int = 0) -> "UsableMethods":
        """``USABLE_METHODS``."""
        body = encode_usable_methods(user, store_id, best_by)
        return decode_usable_methods(self.call(Op.USABLE_METHODS, body))

    def wallet(self, user: User) -> List["WalletEntry"]:
        """``WALLET``."""
        return decode_wallet(self.call(Op.WALLET, encode_wallet(user)))


def ok_body(frame: Frame) -> bytes:
    """The body of an ``OK`` response, else raise :class:`StatusError`."""
    if frame.status != Status.OK:
        raise StatusError(frame.opcode, decode_status_body(frame.status, frame.body))
    return frame.body


def _expect_empty(body: bytes) -> None:
    """Require an empty ``OK`` body."""
    if body:
        raise DecodeError(f"expected an empty body, got {len(body)} bytes")


# --------------------------------------------------------------------------
# A device: holds a credential and signs records with fresh counters
# --------------------------------------------------------------------------


class Device:
    """A user's terminal: signs inherent IDs with its device key.

    Each :meth:`sign` uses the next device counter, so every record is a new
    nonce.
    """

    def __init__(self, user: User, credential: DeviceCredential, first_counter: int = 1):
        self.user = user
        self.credential = credential
        self._counter = first_counter

    def next_counter(self) -> int:
        """Allocate the next device counter."""
        counter = self._counter
        self._counter += 1
        return counter

    def fields(self, *, amount_minor: int, provider_code: int, terminal_id: str,
               currency: str = "JPY", means_kind: int = MeansKind.CREDIT_CARD,
               means_id: int = 0, counter: Optional[int] = None,
               timestamp_ms: Optional[int] = None) -> InherentIdFields:
        """The fields of a new record (fresh counter, current time by default)."""
        return InherentIdFields(
            key_version=self.credential.key_version, amount_minor=amount_minor,
            currency=currency, means_kind=means_kind, means_id=means_id,
            provider_code=provider_code, card_idm=self.credential.card_idm,
            user=self.user, terminal_id=terminal_id,
            counter=self.next_counter() if counter is None else counter,
            timestamp_ms=now_ms() if timestamp_ms is None else timestamp_ms)

    def sign(self, **kwargs) -> bytes:
        """Build and sign a new record; see :meth:`fields` for the arguments."""
        return sign_inherent_id(self.fields(**kwargs), self.credential.device_key)

    def age_fields(self, *, birth_date: Tuple[int, int, int],
                   method: int = VerificationMethod.DOCUMENT_CHIP,
                   verified_at_ms: Optional[int] = None,
                   valid_until_ms: Optional[int] = None,
                   counter: Optional[int] = None,
                   timestamp_ms: Optional[int] = None) -> "AgeRecordFields":
        """The fields of a new age record for this device.

        ``birth_date`` is ``(year, month, day)``. By default the record was
        verified a minute ago and is valid for 30 days. The counter is the
        device's shared counter (the same one as its inherent IDs).
        """
        now = now_ms()
        return AgeRecordFields(
            key_version=self.credential.key_version, card_idm=self.credential.card_idm,
            user=self.user, birth_year=birth_date[0], birth_month=birth_date[1],
            birth_day=birth_date[2], method=method,
            verified_at_ms=now - 60_000 if verified_at_ms is None else verified_at_ms,
            valid_until_ms=(now + 30 * 86_400_000 if valid_until_ms is None
                            else valid_until_ms),
            counter=self.next_counter() if counter is None else counter,
            timestamp_ms=now if timestamp_ms is None else timestamp_ms)

    def sign_age(self, **kwargs) -> bytes:
        """Build and sign a new age record; see :meth:`age_fields`."""
        return sign_age_record(self.age_fields(**kwargs), self.credential.device_key)


def now_ms() -> int:
    """The current time in milliseconds since the UNIX epoch."""
    return time.time_ns() // 1_000_000


# Payment codes and coupons (section 5, "Payment codes and coupons") -------------

CODE_PREFIX = "SG"
CODE_PAYLOAD_LEN = 39
CODE_TEXT_LEN = 65
CODE_KEY_LABEL = b"settlegate payment code key v1"


class CodeKind(enum.IntEnum):
    """Byte 0 of a code's payload."""
    PAYMENT = 0xC1
    COUPON = 0xC5


@dataclasses.dataclass(frozen=True)
class CodePayload:
    """The fields of a code's 39-byte payload (the tag excluded)."""
    kind: int
    issuer: int
    number: int
    value: int
    currency: str
    expires_s: int
    flags: int


def derive_code_key(vault_key: bytes) -> bytes:
    """The code key: HMAC-SHA256 of the label, keyed with the vault key (section 5)."""
    return hmac.new(vault_key, CODE_KEY_LABEL, hashlib.sha256).digest()


def _code_body(payload: CodePayload) -> bytes:
    return (BodyWriter().u8(payload.kind).u16(payload.issuer).u64(payload.number)
            .u64(payload.value).ascii(payload.currency, 3).u32(payload.expires_s)
            .u8(payload.flags).getvalue())


def seal_code(payload: CodePayload, code_key: bytes) -> str:
    """A code's text: ``SG`` + base32 (no padding) of the body and its 12-byte tag."""
    body = _code_body(payload)
    tag = hmac.new(code_key, body, hashlib.sha256).digest()[:12]
    return CODE_PREFIX + base64.b32encode(body + tag).decode("ascii").rstrip("=")


def parse_code(text: str) -> Tuple[CodePayload, bytes]:
    """Split a code's text into its payload fields and its tag (no tag check)."""
    if len(text) != CODE_TEXT_LEN or not text.startswith(CODE_PREFIX):
        raise DecodeError("not a settlegate code (prefix or length)")
    encoded = text[2:]
    try:
        raw = base64.b32decode(encoded + "=" * (-len(encoded) % 8))
    except (ValueError, binascii.Error):
        raise DecodeError("code is not base32") from None
    if len(raw) != CODE_PAYLOAD_LEN:
        raise DecodeError("code payload length")
    reader = BodyReader(raw[:27])
    payload = CodePayload(reader.u8(), reader.u16(), reader.u64(), reader.u64(),
                          reader.take(3).decode("ascii"), reader.u32(), reader.u8())
    return payload, raw[27:]


def verify_code(text: str, code_key: bytes) -> bool:
    """Whether the code's tag verifies under ``code_key`` (constant-time compare)."""
    payload, tag = parse_code(text)
    expected = hmac.new(code_key, _code_body(payload), hashlib.sha256).digest()[:12]
    return hmac.compare_digest(expected, tag)


@dataclasses.dataclass(frozen=True)
class IssuedCode:
    """An ``issued_code``."""
    text: str
    number: int
    amount_minor: int
    currency: str
    expires_ms: int
    deliver_to: bytes
    user: User
    order_ref: str


@dataclasses.dataclass(frozen=True)
class Redemption:
    """A ``redemption`` (the remittance record)."""
    number: int
    captured_minor: int
    released_minor: int
    coupon_discount_minor: int
    currency: str
    terminal_id: str
    provider_code: int
    auth_code: str
    sale_at_ms: int
    redeemed_at_ms: int
    items: Tuple[Tuple[str, int, int], ...]


@dataclasses.dataclass(frozen=True)
class IssuedCoupon:
    """An ``issued_coupon``."""
    text: str
    number: int
    user: User
    kind: int
    value: int
    currency: str
    uses: int
    expires_ms: int


def encode_issue_code(client_request_id: int, inherent_id: bytes, validity_s: int,
                      deliver_to: Optional[bytes] = None, order_ref: str = "") -> bytes:
    """``ISSUE_CODE`` request body."""
    return (BodyWriter().u128(client_request_id).bytes16(inherent_id).u32(validity_s)
            .u8(1 if deliver_to else 0).raw(deliver_to or bytes(8), 8).str8(order_ref)
            .getvalue())


def _redeem_head(client_request_id: int, code: str, issuer: int, number: int,
                 amount_minor: int, currency: str, sale_at_ms: int,
                 terminal_id: str) -> BodyWriter:
    """The fields ``REDEEM_CODE`` and ``REDEEM_CODE_BASKET`` share before the items."""
    return (BodyWriter().u128(client_request_id).str8(code).u16(issuer).u64(number)
            .u64(amount_minor).ascii(currency, 3).i64(sale_at_ms).str8(terminal_id))


def encode_redeem_code(client_request_id: int, code: str, issuer: int, number: int,
                       amount_minor: int, currency: str, sale_at_ms: int, terminal_id: str,
                       items: Sequence[Tuple[str, int, int]] = (), coupon: str = "",
                       order_ref: str = "") -> bytes:
    """``REDEEM_CODE`` request body."""
    writer = _redeem_head(client_request_id, code, issuer, number, amount_minor, currency,
                          sale_at_ms, terminal_id).u16(len(items))
    for item_id, quantity, unit in items:
        writer.str8(item_id).u32(quantity).u64(unit)
    return writer.str8(coupon).str8(order_ref).getvalue()


def encode_redeem_code_basket(client_request_id: int, code: str, issuer: int, number: int,
                              amount_minor: int, currency: str, sale_at_ms: int,
                              terminal_id: str, items: Sequence[BasketItem], coupon: str = "",
                              order_ref: str = "", *, age_confirmation: bool = False,
                              flags: Optional[int] = None, validate: bool = True) -> bytes:
    """``REDEEM_CODE_BASKET`` request body: ``REDEEM_CODE``'s with the items
    replaced by an ``AUTHORIZE_BASKET`` basket (flags, then lines with a
    category). The reply is a ``redemption`` (:func:`decode_redemption`).
    Keyword arguments as for :func:`encode_authorize_basket`."""
    writer = _redeem_head(client_request_id, code, issuer, number, amount_minor, currency,
                          sale_at_ms, terminal_id)
    _write_basket(writer, items, age_confirmation, flags, validate)
    return writer.str8(coupon).str8(order_ref).getvalue()


def encode_issue_coupons(client_request_id: int, provider_code: int, kind: int, value: int,
                         currency: str, uses: int, expires_ms: int,
                         users: Sequence[User]) -> bytes:
    """``ISSUE_COUPONS`` request body."""
    writer = (BodyWriter().u128(client_request_id).u32(provider_code).u8(kind).u64(value)
              .ascii(currency, 3).u32(uses).i64(expires_ms).u16(len(users)))
    for user in users:
        writer.user(user)
    return writer.getvalue()


def encode_delivery_notice(user: User, order_ref: str, amount_minor: int, currency: str,
                           merchant: str) -> bytes:
    """A delivery notice: the ``NOTIFY_DELIVERY`` body after its client request ID, and the
    body of a ``DEVICE_MESSAGE`` push of kind 3 after its kind byte."""
    return (BodyWriter().user(user).str8(order_ref).u64(amount_minor).ascii(currency, 3)
            .str8(merchant).getvalue())


def encode_notify_delivery(client_request_id: int, user: User, order_ref: str,
                           amount_minor: int, currency: str, merchant: str) -> bytes:
    """``NOTIFY_DELIVERY`` request body."""
    return (BodyWriter().u128(client_request_id).getvalue()
            + encode_delivery_notice(user, order_ref, amount_minor, currency, merchant))


def encode_subscribe_device(user: User, password: str, card_idm: bytes) -> bytes:
    """``SUBSCRIBE_DEVICE`` request body."""
    return BodyWriter().user(user).str8(password).raw(card_idm, 8).getvalue()


def _read_issued_code(reader: BodyReader) -> IssuedCode:
    return IssuedCode(reader.str8(), reader.u64(), reader.u64(), reader.take(3).decode("ascii"),
                      reader.i64(), reader.take(8), reader.user(), reader.str8())


def _read_items(reader: BodyReader) -> Tuple[Tuple[str, int, int], ...]:
    return tuple((reader.str8(), reader.u32(), reader.u64()) for _ in range(reader.u16()))


def _read_redemption(reader: BodyReader) -> Redemption:
    return Redemption(reader.u64(), reader.u64(), reader.u64(), reader.u64(),
                      reader.take(3).decode("ascii"), reader.str8(), reader.u32(),
                      reader.take(6).decode("ascii"), reader.i64(), reader.i64(),
                      _read_items(reader))


def _read_issued_coupon(reader: BodyReader) -> IssuedCoupon:
    return IssuedCoupon(reader.str8(), reader.u64(), reader.user(), reader.u8(), reader.u64(),
                        reader.take(3).decode("ascii"), reader.u32(), reader.i64())


def decode_code_reply(body: bytes) -> Union[IssuedCode, "Declined"]:
    """An ``ISSUE_CODE`` reply: an :class:`IssuedCode` or a :class:`Declined`."""
    reader = BodyReader(body)
    result = reader.u8()
    if result == 0:
        value: Union[IssuedCode, Declined] = _read_issued_code(reader)
    elif result == 1:
        value = Declined(Reason(reader.u16()))
    else:
        raise DecodeError(f"result {result}")
    reader.finish()
    return value


def decode_redemption(body: bytes) -> Redemption:
    """A ``REDEEM_CODE`` or ``REDEEM_CODE_BASKET`` reply.

    A basket redemption lists the lines settled (``item_id``, ``quantity``,
    ``unit_amount_minor``: no category), the removed ones left out.
    """
    reader = BodyReader(body)
    value = _read_redemption(reader)
    reader.finish()
    return value


def decode_code_state(body: bytes) -> Tuple[int, Optional[Redemption]]:
    """A ``CODE_STATE`` reply: (state, redemption when redeemed)."""
    reader = BodyReader(body)
    state = reader.u8()
    redemption = _read_redemption(reader) if state == 1 else None
    if state not in (0, 1, 2, 3):
        raise DecodeError(f"code state {state}")
    reader.finish()
    return state, redemption


def decode_coupons_reply(body: bytes) -> List[Union[IssuedCoupon, int]]:
    """An ``ISSUE_COUPONS`` reply: per user an :class:`IssuedCoupon` or a reason code."""
    reader = BodyReader(body)
    results: List[Union[IssuedCoupon, int]] = []
    for _ in range(reader.u16()):
        result = reader.u8()
        if result == 0:
            results.append(_read_issued_coupon(reader))
        elif result == 1:
            results.append(reader.u16())
        else:
            raise DecodeError(f"result {result}")
    reader.finish()
    return results


def decode_device_message(body: bytes) -> Tuple[int, object]:
    """A ``DEVICE_MESSAGE`` push: (kind, issued code | issued coupon | delivery fields)."""
    reader = BodyReader(body)
    kind = reader.u8()
    if kind == 1:
        value: object = _read_issued_code(reader)
    elif kind == 2:
        value = _read_issued_coupon(reader)
    elif kind == 3:
        value = (reader.user(), reader.str8(), reader.u64(), reader.take(3).decode("ascii"),
                 reader.str8())
    else:
        raise DecodeError(f"device message kind {kind}")
    reader.finish()
    return kind, value



# --------------------------------------------------------------------------
# REPORT (section 5, Reconciliation; docs/RECONCILIATION.md)
# --------------------------------------------------------------------------

class ReportPart(enum.IntEnum):
    """``REPORT`` ``part``."""

    SUMMARY = 1
    ITEMS = 2


SUMMARY_HEADER = (
    "provider,merchant,business_day,time_zone,currency,authorized_count,authorized_minor,"
    "captured_count,captured_minor,voided_count,voided_minor,refunded_count,refunded_minor,"
    "reversed_count,reversed_minor,expired_count,expired_minor,owed_count")
"""The summary's CSV header (docs/RECONCILIATION.md, "The summary")."""

ITEMS_HEADER = (
    "kind,provider,merchant,business_day,time_zone,at_utc,dispatch_id,code_number,"
    "operation_id,auth_code,currency,amount_minor,state,provider_ack,answered_utc,detail")
"""The item list's CSV header (docs/RECONCILIATION.md, "The item list")."""


def business_day_valid(text: str) -> bool:
    """Whether ``text`` is a ``YYYY-MM-DD`` date (years 0000-9999, Gregorian)."""
    if len(text) != 10 or text[4] != "-" or text[7] != "-":
        return False
    parts = (text[0:4], text[5:7], text[8:10])
    if not all(len(p) == len(p.encode()) and p.isdigit() for p in parts):
        return False
    year, month, day = (int(p) for p in parts)
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    days = {2: 29 if leap else 28, 4: 30, 6: 30, 9: 30, 11: 30}
    return 1 <= month <= 12 and 1 <= day <= days.get(month, 31)


@dataclass(frozen=True)
class ReportPage:
    """A ``REPORT`` reply: a page of CSV lines (without line ends)."""
    generated_ms: int
    total: int
    header: str
    lines: Tuple[str, ...]


def encode_report(business_day: str, provider_code: int, part: int, offset: int = 0,
                  rows_max: int = REPORT_ROWS_MAX, *, validate: bool = True) -> bytes:
    """``REPORT`` request body: ``str8 business_day``, ``u32 provider_code``, ``u8 part``,
    ``u32 offset``, ``u16 rows_max``. ``validate=False`` lets a test send what the server
    refuses (``BAD_REQUEST``)."""
    if validate:
        if not business_day_valid(business_day):
            raise ValueError(f"business_day {business_day!r} is not YYYY-MM-DD")
        if part not in (ReportPart.SUMMARY, ReportPart.ITEMS):
            raise ValueError(f"part {part}")
        if not 1 <= rows_max <= REPORT_ROWS_MAX:
            raise ValueError(f"rows_max {rows_max} not 1-{REPORT_ROWS_MAX}")
    return (BodyWriter().str8(business_day).u32(provider_code).u8(part).u32(offset)
            .u16(rows_max).getvalue())


def encode_report_page(page: ReportPage) -> bytes:
    """``REPORT`` reply body: ``i64 generated_ms``, ``u32 total``, ``bytes16 header``,
    ``u16 count``, ``count`` x ``bytes16 line`` (UTF-8)."""
    writer = (BodyWriter().i64(page.generated_ms).u32(page.total)
              .bytes16(page.header.encode("utf-8")).u16(len(page.lines)))
    for line in page.lines:
        writer.bytes16(line.encode("utf-8"))
    return writer.getvalue()


def decode_report_page(body: bytes) -> ReportPage:
    """``REPORT`` reply body (see :func:`encode_report_page`)."""
    reader = BodyReader(body)
    generated_ms, total = reader.i64(), reader.u32()
    try:
        header = reader.bytes16().decode("utf-8")
        lines = tuple(reader.bytes16().decode("utf-8") for _ in range(reader.u16()))
    except UnicodeDecodeError as error:
        raise DecodeError(f"a report line is not UTF-8: {error}") from error
    reader.finish()
    return ReportPage(generated_ms, total, header, lines)
