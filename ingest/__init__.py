"""The front door: aiohttp app that authenticates, validates and enqueues."""
