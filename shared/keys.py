"""Every Redis key eventgate owns (rq's own keys are rq's: `rq:*`)."""

from __future__ import annotations

PREFIX = "eg"

ACCOUNTS = f"{PREFIX}:accounts"  # hash: account name -> Account (JSON)
API_KEYS = f"{PREFIX}:keys"  # hash: key id -> ApiKey record (JSON), secret stored hashed
# hash: "requests:<dialect>:<status>" and "rejected:<dialect>" -> count, every front door's
# (each adds its own about once a second); /v1/stats reads it.
FRONT_DOOR_COUNTS = f"{PREFIX}:front-door"
# hash: the sink write latency histogram of every worker: count, sum (seconds), and
# "le:<bound>" -> writes that took at most <bound> s and more than the bound below (not cumulative).
SINK_WRITE = f"{PREFIX}:sink-write"


def account_keys(account: str) -> str:
    """Set of the key ids an account owns."""
    return f"{PREFIX}:acct-keys:{{{account}}}"  # {account}: cluster hash tag


def counters(account: str) -> str:
    """Hash of an account's event counters: accepted (front door), persisted, duplicate
    (workers), and, where kept, deferred and dead_lettered (events deferred or dead-lettered
    now: decremented when they run again) and rate_limited (requests); see shared/stats.py."""
    return f"{PREFIX}:count:{{{account}}}"


def definitions(account: str) -> str:
    """Hash of an account's event definitions: name -> Definition (JSON)."""
    return f"{PREFIX}:defs:{{{account}}}"


def definitions_version(account: str) -> str:
    """Counter bumped on every definitions change, so caches reload only when it moves."""
    return f"{PREFIX}:defs-ver:{{{account}}}"


def persons(account: str) -> str:
    """Hash of an account's person index: "<IDENTIFIER TYPE>:<value>" -> person id."""
    return f"{PREFIX}:persons:{{{account}}}"


def request_bucket(account: str, dialect: str) -> str:
    """An account's request rate limit on one API: its GCRA time (us, Redis's clock)."""
    return f"{PREFIX}:rl:{{{account}}}:api:{dialect}"


def key_bucket(account: str, key_id: str) -> str:
    """A key's own request rate limit (keys that carry one)."""
    return f"{PREFIX}:rl:{{{account}}}:key:{key_id}"


def process_bucket(account: str) -> str:
    """An account's processing rate limit in the workers (events/s)."""
    return f"{PREFIX}:rl:{{{account}}}:process"


# Dead letters (shared/dead_letters.py): a sorted set of entry ids by when they were
# dead-lettered, and a hash per entry.
DEAD_LETTERS = f"{PREFIX}:dlq"


def dead_letter(entry_id: str) -> str:
    """Hash of one dead-letter entry: sink, account, reason, attempts, times, the events."""
    return f"{PREFIX}:dlq:{entry_id}"


def sink_done(sink_id: str, envelope: str) -> str:
    """Set while a job is retried: its envelope's events are in this sink (workers/progress.py)."""
    return f"{PREFIX}:sink-done:{sink_id}:{envelope}"


def forwarded(account: str, sink_id: str, event_id: str) -> str:
    """An event's state in a sink without a unique key: "p:<batch key>" (sent in that batch,
    not yet acknowledged), "n" or "d" (acknowledged); see workers/forwarding.py."""
    return f"{PREFIX}:fwd:{{{account}}}:{sink_id}:{event_id}"


def forward_batch(sink_id: str, batch_key: str) -> str:
    """The events of a batch sent to a sink without a unique key, kept until acknowledged."""
    return f"{PREFIX}:fwd-batch:{sink_id}:{batch_key}"
