"""`python -m workers` (what `eventgate worker` runs): one worker process."""

import sys

from shared.logging import configure_logging
from shared.redis_server import redis_url_for
from shared.settings import settings_or_exit
from workers.main import run_worker


def main() -> None:
    settings = settings_or_exit()
    configure_logging(settings)
    with redis_url_for(settings) as url:
        run_worker(settings, url, burst="--burst" in sys.argv[1:])


if __name__ == "__main__":
    main()
