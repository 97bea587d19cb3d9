"""upbit-broker: one shared, rate-limit-safe Upbit connection for every local process.

Kept import-light on purpose: clients import :mod:`broker.config` to find the broker,
and must not pull in auth or network code by doing so.
"""
