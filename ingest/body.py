"""Reading request bodies within limits: size before reading, gzip in bounded memory, a
deadline for slow senders, and the JSON shape (ingest.shape) before any dialect decodes it."""

from __future__ import annotations

import asyncio
import zlib
from typing import TYPE_CHECKING

from aiohttp import web

from ingest.problems import (
    BodyTooLargeError,
    ClientGoneError,
    MalformedBodyError,
    RequestTimeoutError,
    UnsupportedEncodingError,
)
from ingest.shape import ShapeLimits, check_shape

if TYPE_CHECKING:
    from shared.settings import Settings

_CHUNK = 64 * 1024


class BodyLimits:
    """The caps one route reads its bodies under."""

    __slots__ = ("max_bytes", "max_decompressed", "max_ratio", "shape", "timeout_s")

    def __init__(
        self,
        max_bytes: int,
        max_decompressed: int,
        max_ratio: int,
        *,
        timeout_s: float | None = None,
        shape: ShapeLimits | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_decompressed = max_decompressed
        self.max_ratio = max_ratio
        self.timeout_s = timeout_s  # None: no deadline
        self.shape = shape  # None: the shape is not checked

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        return cls(
            settings.max_body_bytes,
            settings.max_decompressed_bytes,
            settings.max_gzip_ratio,
            timeout_s=settings.body_timeout_s,
            shape=ShapeLimits(settings.max_depth, settings.max_string_bytes),
        )


async def read_body(request: web.Request, limits: BodyLimits) -> bytes:
    """The request body, decompressed. Stops reading at the first byte over a limit.

    Raises:
        BodyTooLargeError: over `max_bytes` (declared or sent), or inflating past its caps.
        UnsupportedEncodingError: a Content-Encoding other than gzip or identity.
        MalformedBodyError: gzip data that does not inflate, or a body of the wrong shape.
        RequestTimeoutError: the body did not arrive within `timeout_s` (a slow client).
        ClientGoneError: the client hung up mid-body (nobody to answer; not a crash).
    """
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise UnsupportedEncodingError(f"Content-Encoding {encoding!r}; send gzip or none")
    declared = request.content_length
    if declared is not None and declared > limits.max_bytes:
        raise BodyTooLargeError(_too_large(limits.max_bytes))
    try:
        # One deadline for the whole body: a client trickling a byte at a time cannot hold
        # a request (and its memory) open for longer than this.
        async with asyncio.timeout(limits.timeout_s):
            raw = await _read_capped(request, limits.max_bytes)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the body did not arrive within {limits.timeout_s:g} s; send it faster"
        ) from None
    except web.RequestPayloadError as exc:  # e.g. a chunk size that is not hex
        raise MalformedBodyError(f"the body's transfer encoding is broken: {exc}") from None
    except ConnectionResetError:
        raise ClientGoneError("the client closed the connection mid-body") from None
    if encoding != "identity":
        raw = _gunzip(raw, min(limits.max_decompressed, max(len(raw), 1) * limits.max_ratio))
    if limits.shape is not None:
        check_shape(raw, limits.shape)
    return raw


async def _read_capped(request: web.Request, cap: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    # Chunked uploads declare no length: count as they arrive and stop at the cap.
    while chunk := await request.content.read(_CHUNK):
        size += len(chunk)
        if size > cap:
            raise BodyTooLargeError(_too_large(cap))
        chunks.append(chunk)
    return b"".join(chunks)


def _gunzip(data: bytes, cap: int) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        # max_length bounds memory: a bomb is refused after inflating cap + 1 bytes at most.
        out = inflater.decompress(data, cap + 1)
    except zlib.error as exc:
        raise MalformedBodyError(f"body is not valid gzip: {exc}") from None
    if len(out) > cap:
        raise BodyTooLargeError(f"gzip body inflates past {cap} bytes; send smaller batches")
    if not inflater.eof:
        raise MalformedBodyError("gzip body is truncated")
    if inflater.unused_data:
        # A second gzip member would be silently dropped: refuse rather than lose events.
        raise MalformedBodyError("gzip body has data after its end; send one gzip member")
    return out


def _too_large(cap: int) -> str:
    return f"body exceeds {cap} bytes; split it into smaller batches"
