"""Argument types of the host commands: the shared vocabulary's parsers, under their CLI names."""

from __future__ import annotations

from ..vocabulary import address, hex_bytes, integer, size

__all__ = ["address", "hex_bytes", "integer", "size"]
