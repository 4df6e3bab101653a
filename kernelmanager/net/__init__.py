"""Networking by policy for kernels whose template has a NIC (``network: true``).

Default: no NIC at all. A networked VM's QEMU runs inside a network namespace of its
own (a *slot*, ``slots.py``): a tap device the guest's virtio-net sits on, a veth pair
to the host, NAT out through the host. Every guest has the same address
(``policy.GUEST_ADDRESS``), so snapshots and forks need no re-addressing. Egress is
enforced in the slot with nftables (``nft.py``), never by the guest: default drop,
only the policy's destinations, the tap accepts only the guest's own addresses, and
the host, its loopback and services, other VMs and 169.254.0.0/16 are never
reachable. Host names go through a resolver in the slot (``dns.py``) that answers
only allowed names and opens the firewall for exactly the addresses it returned.

``policy.py`` is the pure model (rules, presets, what users may ask for).
"""
