"""The queue format: a versioned msgpack envelope of validated request bodies.

The front door validates and enqueues bodies as received (re-encoding on the request path
measured 0.63-0.67 of a decode-only handler; forwarding the bytes 0.69-1.01). The worker
normalises them into canonical events. A new format gets a new tag; workers refuse tags
they do not know instead of guessing.
"""

from __future__ import annotations

import msgspec

# The function rq resolves for every batch job. The job's data is the envelope itself.
JOB_FUNC = "workers.jobs.process_batch"


class Part(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One request's accepted events, with what the front door learnt about them."""

    account: str
    dialect: str
    request_id: str
    received_ns: int  # front door clock, ns since the epoch
    count: int  # events this part holds once `skip` is applied
    body: bytes  # the request body as received, decompressed
    ids: dict[int, str] = {}  # event index -> id minted at the front door
    skip: list[int] = []  # indexes the front door rejected (native strict=false)
    context: dict[str, str] = {}  # dialect extras from path and query


class Batch(msgspec.Struct, frozen=True, array_like=True, tag="eg.v1"):
    """One rq job: the parts of every request flushed together (group commit)."""

    parts: list[Part]


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Batch)


class EnvelopeError(ValueError):
    """Job data is not an envelope this version understands; retrying cannot help."""


def encode_batch(batch: Batch) -> bytes:
    return _ENCODER.encode(batch)


def decode_batch(data: bytes) -> Batch:
    """Raises:
    EnvelopeError: unknown version or corrupt data.
    """
    try:
        return _DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EnvelopeError(f"not an eventgate batch envelope: {exc}") from None


# An envelope is a msgpack array of two (tag, parts): its first byte. JSON never starts so.
_ENVELOPE_HEAD = b"\x92"


class EnvelopeSerializer:
    """rq serializer: a job's `data` field is the envelope itself, never a pickle.

    rq stores `(func, instance, args, kwargs)`; every eventgate job is
    `process_batch(envelope)`, so the envelope alone rebuilds that tuple. rq also
    serializes results and meta with it: those are plain JSON.
    """

    @staticmethod
    def dumps(obj: object) -> bytes:
        match obj:
            case (str() as func, _, (bytes() as envelope,), _) if func == JOB_FUNC:
                return envelope
            case _:
                return msgspec.json.encode(obj, enc_hook=str)

    @staticmethod
    def loads(data: bytes) -> object:
        if data[:1] != _ENVELOPE_HEAD:
            try:
                return msgspec.json.decode(data)
            except msgspec.DecodeError:
                pass  # corrupt job data: let process_batch find it poison and park it
        return JOB_FUNC, None, (data,), {}
