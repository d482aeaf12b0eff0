"""Building and driving test VMs: guest kernel, initramfs, QEMU profiles, QMP launcher."""
