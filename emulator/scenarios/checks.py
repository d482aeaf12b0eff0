"""Host-side checks on the media file: the ground truth the guest cannot fake."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..crypto import xts_encrypt

Extent = Mapping[str, int]  # {"pa": ..., "offset": ..., "length": ...} as phases report them


def expected_ciphertext(key: bytes, plaintext: bytes, tweak_base: int, unit: int) -> bytes:
    """What the media must hold for ``plaintext`` written at ``tweak_base``."""
    return xts_encrypt(key, plaintext, tweak_base, unit)


def media_outcome(media: bytes, key: bytes, extents: Iterable[Extent], plaintext: bytes,
                  tweak_mode: str, unit: int) -> str:
    """``exact`` when every extent holds the XTS ciphertext of its slice of ``plaintext``.

    Extents are in the order the data was written; under ``spa`` the tweak
    is the physical address, under ``dpa`` the offset in the DIMM.
    """
    position = 0
    for extent in extents:
        offset, length = extent["offset"], extent["length"]
        chunk = plaintext[position:position + length]
        tweak = extent["pa"] if tweak_mode == "spa" else offset
        if media[offset:offset + length] != expected_ciphertext(key, chunk, tweak, unit):
            return "differs"
        position += length
    return "exact" if position == len(plaintext) else "differs"


def plaintext_on_media(media: bytes, samples: Iterable[bytes]) -> str:
    """``absent`` unless the start of some plaintext sample is found anywhere on the media."""
    return "found" if any(media.find(sample[:64]) >= 0 for sample in samples) else "absent"


def relocation_model(case: str, tweak_mode: str, tme: str) -> str:
    """SPEC section 3: a move keeps data only when it keeps (key, tweak) for every unit."""
    if case == "keyed":
        return "intact"  # decrypted at src, encrypted at dst
    if tweak_mode != "logical":
        return "garbage"  # the tweak is the address: a new address garbles
    if case == "raw":
        return "intact"  # logical tweaks travel with the mapping, not the address
    # A guest copy through KeyID 0 is a raw copy only when KeyID 0 does not encrypt.
    return "intact" if tme == "bypass" else "garbage"
