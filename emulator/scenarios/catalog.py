"""The scenarios: which boots, which phases, which checks (the fifth in fscrypt_offload)."""

from __future__ import annotations

from collections.abc import Callable

from .checks import media_outcome, plaintext_on_media, relocation_model
from .fscrypt_offload import fscrypt_offload
from .report import Row
from .session import Dimm, SessionOptions, guest_pattern

Result = dict[str, object]


def _ok(result: Result) -> str:
    return "ok" if result.get("ok") else "unexpected"


def namespace_key(options: SessionOptions) -> list[Row]:
    """1. One key for the whole namespace; power cycle; no mount without it, all back with it."""
    name = "namespace-key"
    dimm = Dimm(options, name)
    key = ["--user-file", dimm.user_key_file()]
    (setup,) = dimm.boot([("namespace-setup", *key)], ns_mode="fsdax")
    seed, size, files = int(setup["seed"]), int(setup["file_size"]), len(setup["sha256"])  # type: ignore[call-overload, arg-type]
    samples = [guest_pattern(seed + i, size) for i in range(files)]
    rows = [Row(name, "mkfs, mount, write files under the key", "ok", _ok(setup)),
            Row(name, "file plaintext on the media", "absent",
                plaintext_on_media(dimm.media(), samples), "host")]
    without, again = dimm.boot([("namespace-check-without-key", *key),
                                ("namespace-check-with-key", *key)], ns_mode="fsdax")
    intact = sum(v == "intact" for v in again["files"].values())  # type: ignore[attr-defined]
    rows += [Row(name, "after power cycle, mount without the key", "failed", str(without["mount"])),
             Row(name, "key programmed again: mount", "ok", str(again["mount"])),
             Row(name, "key programmed again: files intact", f"{files}/{files}",
                 f"{intact}/{files}")]
    return rows


def dax_mmap(options: SessionOptions) -> list[Row]:
    """2. A KeyID chosen at mmap time on ext4-dax, xfs-dax and devdax; media checked on the host."""
    name = "dax-mmap"
    dimm = Dimm(options, name)
    rows: list[Row] = []
    for label, phase, ns in (("ext4 -o dax", ("dax-file", "--fs", "ext4"), "fsdax"),
                             ("xfs -o dax", ("dax-file", "--fs", "xfs"), "fsdax"),
                             ("devdax", ("devdax",), "devdax")):
        (result,) = dimm.boot([(*phase, "--user-file", dimm.user_key_file())], ns_mode=ns)
        plaintext = guest_pattern(int(result["seed"]), int(result["length"]))  # type: ignore[call-overload]
        media = dimm.media()
        rows += [
            Row(name, f"{label}: read back through the KeyID", "intact", str(result["readback"])),
            Row(name, f"{label}: pagemap and FIEMAP/sysfs addresses", "agree",
                "agree" if result["addresses_agree"] else "disagree"),
            Row(name, f"{label}: media is the XTS ciphertext", "exact",
                media_outcome(media, dimm.key_bytes, result["extents"], plaintext,  # type: ignore[arg-type]
                              str(result["tweak_mode"]), int(result["unit"])), "host"),  # type: ignore[call-overload]
            Row(name, f"{label}: plaintext on the media", "absent",
                plaintext_on_media(media, [plaintext]), "host"),
        ]
    return rows


def relocation(options: SessionOptions) -> list[Row]:
    """3. Raw mover, copy through KeyID 0, keyed mover; spa and logical tweaks."""
    name = "relocation"
    rows: list[Row] = []
    for tweak in ("spa", "logical"):
        dimm = Dimm(options, f"{name}-{tweak}", tweak=tweak)
        (result,) = dimm.boot([("relocation", "--user-file", dimm.user_key_file())], ns_mode="devdax")
        for case in result["cases"]:  # type: ignore[attr-defined]
            expected = relocation_model(case["case"], tweak, dimm.tme)
            rows.append(Row(name, f"{tweak}: {case['case']}", expected, case["outcome"]))
    return rows


def lost_keys(options: SessionOptions) -> list[Row]:
    """4. Wrong KeyIDs read garbage; after a power cycle random keys are gone, user keys come back."""
    name = "lost-keys"
    dimm = Dimm(options, name)
    key = ["--user-file", dimm.user_key_file()]
    (before,) = dimm.boot([("lost-keys-before", *key)], ns_mode="devdax")
    (after,) = dimm.boot([("lost-keys-after", *key)], ns_mode="devdax")
    rows = [Row(name, str(c["case"]), str(c["expected"]), str(c["outcome"]))
            for result in (before, after) for c in result["cases"]]  # type: ignore[attr-defined]
    regions = after["regions"]
    user = {"offset": regions["user"], "length": regions["length"]}  # type: ignore[index]
    user["pa"] = (dimm.base or 0) + user["offset"]
    plaintext = guest_pattern(int(after["seed"]), user["length"])  # type: ignore[call-overload]
    rows.append(Row(name, "user-key ciphertext kept on the media across the power cycle", "exact",
                    media_outcome(dimm.media(), dimm.key_bytes, [user], plaintext, "spa", 64), "host"))
    return rows


SCENARIOS: dict[str, Callable[[SessionOptions], list[Row]]] = {
    "namespace-key": namespace_key,
    "dax-mmap": dax_mmap,
    "relocation": relocation,
    "lost-keys": lost_keys,
    "fscrypt-offload": fscrypt_offload,  # 5. the linux-mm thread's closing question
}


def run_scenarios(names: list[str], options: SessionOptions) -> list[Row]:
    """Run the named scenarios in order; their rows, in order."""
    rows: list[Row] = []
    for name in names:
        rows += SCENARIOS[name](options)
    return rows
