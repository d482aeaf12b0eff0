"""The memory controller: media, view, per-page KeyIDs, and crash-safe persistence.

"The view is the cache": the view file is what the CPU (QEMU) sees, the
media file is the DIMM's cells.  :class:`MemoryController` moves pages
between them through the KeyID table, exactly as SPEC section 3 says.
:func:`open_controller` opens a device (lock, journal replay, view fill).
"""

from .config import PAGE_SIZE, ControllerConfig, TweakMode, default_view_path
from .controller import MemoryController
from .recovery import open_controller
from .results import FlushResult, PageInfo, RelocateMode, Stats

__all__ = [
    "PAGE_SIZE",
    "ControllerConfig",
    "FlushResult",
    "MemoryController",
    "PageInfo",
    "RelocateMode",
    "Stats",
    "TweakMode",
    "default_view_path",
    "open_controller",
]
