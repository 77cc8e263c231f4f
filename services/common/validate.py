"""Checks at the servicer entry: each names the field, the value and the allowed range (DESIGN §6)."""

from __future__ import annotations

from services.common.errors import InvalidArgument


def in_range(field: str, value: float, lo: float, hi: float) -> float:
    if not lo <= value <= hi:
        raise InvalidArgument(f"{field}={value} is out of range [{lo}, {hi}]")
    return value


def multiple_of(field: str, value: int, factor: int) -> int:
    if value % factor:
        raise InvalidArgument(f"{field}={value} is not a multiple of {factor}")
    return value


def required(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


def count(field: str, n: int, lo: int, hi: int) -> int:
    if not lo <= n <= hi:
        raise InvalidArgument(f"{field}: {n} items, allowed {lo} to {hi}")
    return n


def text(field: str, value: str, max_chars: int) -> str:
    if len(value) > max_chars:
        raise InvalidArgument(f"{field} is {len(value)} characters long, at most {max_chars}")
    return value
