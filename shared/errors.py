"""Errors every part of eventgate may raise, with the message a person acts on."""


class EventgateError(Exception):
    """Base of eventgate's own errors."""


class ConfigError(EventgateError):
    """A setting is missing, misspelt or invalid; the message names it."""


class RedisUnavailableError(EventgateError):
    """Redis could not be reached or did not answer in time."""
