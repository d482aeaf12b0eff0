"""mktme-emu host side: a TME-MK (MKTME) memory-controller emulator for QEMU NVDIMMs."""

import os as _os

# numpy's OpenBLAS starts a thread per core at import, and each spins for
# about 0.1 s of CPU before it sleeps.  We use no BLAS routine (only
# element-wise numpy), so those threads only took cores from the XTS
# workers (`mktme-emu xts` on 512 MiB: 0.26 -> 0.21 s on two cores).
# Set before any module of this package imports numpy; a user's own setting wins.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
