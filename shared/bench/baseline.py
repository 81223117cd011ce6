"""The front door's baselines: the same aiohttp server setup with a handler that does the
least any gateway does. `python -m shared.bench.baseline --mode bare|decode --port N`.

- bare: read the body, answer 202;
- decode: also decode it into the native API's typed msgspec structs.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import msgspec
from aiohttp import web

from shared.formats.native import decode_body

_ENCODER = msgspec.json.Encoder()
# As ingest.server runs the front door (not imported: shared never imports ingest).
RUNNER_OPTIONS: dict[str, object] = {"auto_decompress": False, "access_log": None}


async def bare(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(
        body=_ENCODER.encode({"accepted": len(body) > 0}),
        status=202,
        content_type="application/json",
    )


async def decode(request: web.Request) -> web.Response:
    events = decode_body(await request.read())
    return web.Response(
        body=_ENCODER.encode({"accepted": len(events)}), status=202, content_type="application/json"
    )


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def serve(mode: str, port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/events", bare if mode == "bare" else decode)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, **RUNNER_OPTIONS)  # type: ignore[arg-type]
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("bare", "decode"), required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.mode, args.port))


if __name__ == "__main__":
    main()
