"""`python -m ingest` (what `eventgate serve` runs): the front door."""

import asyncio

from ingest.server import serve
from shared.logging import configure_logging
from shared.redis_server import redis_url_for
from shared.settings import settings_or_exit


def main() -> None:
    settings = settings_or_exit()
    configure_logging(settings)
    with redis_url_for(settings) as url:
        asyncio.run(serve(settings, url))


if __name__ == "__main__":
    main()
