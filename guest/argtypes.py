"""Option types of the guest commands and phases: the shared vocabulary's parsers.

The host's ``mktme-emu`` parses sizes and addresses with the very same
functions (``mktme_emu.vocabulary``), so ``64K`` means the same on both sides.
"""

from __future__ import annotations

from mktme_emu.vocabulary import address, integer, size

__all__ = ["address", "integer", "size"]
