"""The memory controller: media, view, per-page KeyIDs, and crash-safe persistence.

"The view is the cache": the view file is what the CPU (QEMU) sees, the
media file is the DIMM's cells.  :class:`MemoryController` moves pages
between them through the KeyID table, exactly as SPEC section 3 says.
"""

from .config import PAGE_SIZE, ControllerConfig, TweakMode, default_view_path
from .controller import MemoryController, PageInfo, RelocateMode

__all__ = [
    "PAGE_SIZE",
    "ControllerConfig",
    "MemoryController",
    "PageInfo",
    "RelocateMode",
    "TweakMode",
    "default_view_path",
]
