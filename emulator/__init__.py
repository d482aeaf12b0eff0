"""mktme-emu host side: a TME-MK (MKTME) memory-controller emulator for QEMU NVDIMMs."""

__version__ = "0.1.0"
