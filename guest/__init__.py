"""The in-guest helpers: talk to the backend over the virtio-serial port in the guest role.

Layers (imports point down only; from the host package only
``mktme_emu.protocol``, ``mktme_emu.vocabulary``, ``mktme_emu.usage`` and
``mktme_emu.errors``, all pure Python):

- :mod:`~mktme_guest.channel`: find and open the control port, one locked
  request/response at a time (``connect()``);
- :mod:`~mktme_guest.physaddr`: physical addresses from pagemap, FIEMAP and sysfs;
- :mod:`~mktme_guest.dax`: the Python API for guest tests (``encrypt_mprotect``,
  ``flush_range``, ``mmap_dax``, ``map_file``, ``map_device_range``, ``map_namespace``);
- :mod:`~mktme_guest.system`: ndctl, mkfs, mount, the block cache;
- :mod:`~mktme_guest.phases` (with ``phaselib`` and ``phase_*``): the guest
  steps of the SPEC section 6 scenarios;
- :mod:`~mktme_guest.cli`: ``mktme-guest``.
"""
