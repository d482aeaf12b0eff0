"""The in-guest helpers: talk to the backend over the virtio-serial port in the guest role."""
