"""The host side of vm-kernel-gateway: VM lifecycle, snapshots, the host end of the
host-guest channel, and the jupyter_client kernel provisioner."""
