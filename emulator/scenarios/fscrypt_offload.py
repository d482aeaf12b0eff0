"""5. Can the MKTME engine be fscrypt's inline-encryption engine on pmem?

The linux-mm thread this project comes from ends with the remark that
"fscrypt has the same physical block inputs for the encryption algorithm as
MKTME", so the engine "could be crafted as a drop in accelerator for fscrypt
for pmem block devices".  This scenario checks that byte for byte, in two
boots of the same guest phase (``fscrypt-offload``):

- on an NVDIMM in ``dun`` tweak mode (one 4096-byte unit per page, page k of
  a mapping at T uses tweak T + k): the kernel's software fscrypt writes
  IV_INO_LBLK_64 files; the host derives the per-mode key from the master
  key and the filesystem UUID as the kernel does and finds exactly that XTS
  ciphertext at the files' blocks; the same plaintext written through DAX
  under a KeyID holding the derived key, with page tweaks equal to the
  files' DUNs, leaves the same bytes on the media; moved raw to another
  address it still decrypts (the DUN travels with the data);
- on an NVDIMM in ``spa`` tweak mode, the same offload and the same raw move:
  other bytes, and garbage after the move.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

from .checks import plaintext_on_media
from .fscrypt import (
    BLOCK,
    fscrypt_media_outcome,
    gather,
    iv_ino_lblk_64_key,
    key_identifier,
)
from .report import Row
from .session import Dimm, SessionOptions, guest_pattern

NAME = "fscrypt-offload"
KEYID = 9
PASS_PER_MAPPING = "key + first DUN"
NEVER = "move data under spa tweaks"


@dataclass(frozen=True)
class Secrets:
    """The run's test master key and filesystem UUID (chosen by the host, given to mkfs)."""

    master_key: bytes
    fs_uuid: uuid.UUID

    @classmethod
    def fresh(cls) -> Secrets:
        return cls(os.urandom(64), uuid.uuid4())

    @property
    def derived_key(self) -> bytes:
        return iv_ino_lblk_64_key(self.master_key, self.fs_uuid)


def boot_phase(options: SessionOptions, tweak: str, secrets: Secrets) -> tuple[Dimm, dict[str, Any]]:
    """One boot on a fresh NVDIMM in ``tweak`` mode (4096-byte units): the phase's result."""
    dimm = Dimm(options, f"{NAME}-{tweak}", tweak=tweak, unit=BLOCK)
    key = secrets.derived_key
    dimm.user_key = key[:32].hex() + ":" + key[32:].hex()
    master = dimm.secret_file("master-key", secrets.master_key.hex())
    (result,) = dimm.boot([("fscrypt-offload", "--master-key-file", master,
                            "--uuid", str(secrets.fs_uuid), "--user-file", dimm.user_key_file(),
                            "--keyid", str(KEYID))], ns_mode="fsdax")
    return dimm, result


def _all(values: list[str], want: str) -> str:
    """``want`` when every value is it, else the first one that is not."""
    return next((v for v in values if v != want), want)


def software_rows(result: dict[str, Any], media: bytes, secrets: Secrets) -> list[Row]:
    """The kernel's software fscrypt against the host's derivation and independent XTS."""
    files = result["files"]
    plains = [guest_pattern(f["seed"], f["length"]) for f in files]
    exact = [fscrypt_media_outcome(media, secrets.derived_key, f["ino"], f["extents"], p)
             for f, p in zip(files, plains, strict=True)]
    identifier = "agree" if result["key_identifier"] == key_identifier(secrets.master_key).hex() else "differ"
    return [
        Row(NAME, f"kernel: ext4 encrypt,stable_inodes; v2 IV_INO_LBLK_64; {len(files)} files read back",
            "intact", _all([f["readback"] for f in files], "intact")),
        Row(NAME, "filesystem UUID in the superblock = the one given to mkfs", "agree",
            "agree" if result["uuid"] == str(secrets.fs_uuid) else "differ", "host"),
        Row(NAME, "key identifier: kernel = host HKDF-SHA512", "agree", identifier, "host"),
        Row(NAME, "files' blocks = XTS(derived key, DUN (ino<<32)|lblk)", "exact",
            _all(exact, "exact"), "host"),
        Row(NAME, "file plaintext on the media", "absent", plaintext_on_media(media, plains), "host"),
    ]


def offload_rows(tweak: str, result: dict[str, Any], media: bytes, fscrypt_media: bytes) -> list[Row]:
    """The same plaintext through DAX under the derived key: the media compared with fscrypt's."""
    files = result["files"]
    same = "identical" if tweak == "dun" else "differs"
    moved = "intact" if tweak == "dun" else "garbage"

    def compare(key: str) -> list[str]:
        return ["identical" if gather(media, f[key]) == gather(fscrypt_media, f["extents"]) else "differs"
                for f in files]

    rows = [Row(NAME, f"{tweak}: plaintext through DAX under the KeyID, read back", "intact",
                _all([f["offload_readback"] for f in files], "intact")),
            Row(NAME, f"{tweak}: media = fscrypt's ciphertext, byte for byte", same,
                _all(compare("offload_extents"), same), "host"),
            Row(NAME, f"{tweak}: raw move to another address, read back", moved,
                _all([f["moved_readback"] for f in files], moved))]
    if tweak == "dun":
        rows.append(Row(NAME, "dun: moved media = fscrypt's ciphertext", "identical",
                        _all(compare("moved_extents"), "identical"), "host"))
    return rows


def conclusion_rows(rows: list[Row]) -> list[Row]:
    """What the measurements say a filesystem must pass per mapping, and must never do."""
    by_case = {r.case: r for r in rows}
    offload_holds = all(by_case[c].ok for c in (
        "files' blocks = XTS(derived key, DUN (ino<<32)|lblk)",
        "dun: media = fscrypt's ciphertext, byte for byte", "dun: moved media = fscrypt's ciphertext"))
    spa_breaks = (by_case["dun: raw move to another address, read back"].observed == "intact"
                  and by_case["spa: raw move to another address, read back"].observed == "garbage")
    return [Row(NAME, "a filesystem passes per mapping", PASS_PER_MAPPING,
                PASS_PER_MAPPING if offload_holds else "more than key + first DUN", "host"),
            Row(NAME, "a filesystem must never", NEVER,
                NEVER if spa_breaks else "nothing shown", "host")]


def fscrypt_offload(options: SessionOptions, secrets: Secrets | None = None) -> list[Row]:
    """Two boots, dun then spa; the table."""
    secrets = secrets or Secrets.fresh()
    dun_dimm, dun_result = boot_phase(options, "dun", secrets)
    dun_media = dun_dimm.media()
    rows = software_rows(dun_result, dun_media, secrets)
    rows += offload_rows("dun", dun_result, dun_media, dun_media)
    spa_dimm, spa_result = boot_phase(options, "spa", secrets)
    # The spa boot's own fscrypt files hold the same ciphertext (same key, UUID, inodes):
    # compare its offload with them, on its own media.
    spa_media = spa_dimm.media()
    rows += offload_rows("spa", spa_result, spa_media, spa_media)
    return rows + conclusion_rows(rows)
