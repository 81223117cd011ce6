"""Reading request bodies within limits: size before reading, gzip in bounded memory."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from ingest.problems import BodyTooLargeError, MalformedBodyError, UnsupportedEncodingError

if TYPE_CHECKING:
    from aiohttp import web

_CHUNK = 64 * 1024


class BodyLimits:
    """The caps one route reads its bodies under."""

    __slots__ = ("max_bytes", "max_decompressed", "max_ratio")

    def __init__(self, max_bytes: int, max_decompressed: int, max_ratio: int) -> None:
        self.max_bytes = max_bytes
        self.max_decompressed = max_decompressed
        self.max_ratio = max_ratio


async def read_body(request: web.Request, limits: BodyLimits) -> bytes:
    """The request body, decompressed. Stops reading at the first byte over a limit.

    Raises:
        BodyTooLargeError: over `max_bytes` (declared or sent), or inflating past its caps.
        UnsupportedEncodingError: a Content-Encoding other than gzip or identity.
        MalformedBodyError: gzip data that does not inflate.
    """
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise UnsupportedEncodingError(f"Content-Encoding {encoding!r}; send gzip or none")
    declared = request.content_length
    if declared is not None and declared > limits.max_bytes:
        raise BodyTooLargeError(_too_large(limits.max_bytes))
    raw = await _read_capped(request, limits.max_bytes)
    if encoding == "identity":
        return raw
    return _gunzip(raw, min(limits.max_decompressed, max(len(raw), 1) * limits.max_ratio))


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
    return out


def _too_large(cap: int) -> str:
    return f"body exceeds {cap} bytes; split it into smaller batches"
