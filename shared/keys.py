"""Every Redis key eventgate owns (rq's own keys are rq's: `rq:*`)."""

from __future__ import annotations

PREFIX = "eg"

ACCOUNTS = f"{PREFIX}:accounts"  # hash: account name -> Account (JSON)
API_KEYS = f"{PREFIX}:keys"  # hash: key id -> ApiKey record (JSON), secret stored hashed


def account_keys(account: str) -> str:
    """Set of the key ids an account owns."""
    return f"{PREFIX}:acct-keys:{{{account}}}"  # {account}: cluster hash tag


def counters(account: str) -> str:
    """Hash of an account's event counters (accepted, persisted, duplicate, ...)."""
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
