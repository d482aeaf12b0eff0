"""The initramfs cache does not grow without end."""

from __future__ import annotations

import os
from pathlib import Path

from mktme_emu.vm import initramfs


def test_prune_removes_only_images_unused_for_long(tmp_path: Path) -> None:
    now = 1_000_000_000.0
    old, recent, keep = (tmp_path / f"initramfs-6.1-{name}.img" for name in ("old", "recent", "keep"))
    other = tmp_path / "vmlinux-pvh-old"
    for path, age_days in ((old, 30), (recent, 1), (keep, 30), (other, 30)):
        path.write_bytes(b"x")
        os.utime(path, (now - age_days * 86400,) * 2)
    removed = initramfs.prune_initramfs(tmp_path, keep=keep, unused_days=14, now=now)
    assert removed == [old]
    assert not old.exists() and recent.exists() and keep.exists() and other.exists()
