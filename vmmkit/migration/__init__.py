"""Live migration, as Cloud Hypervisor does it (``docs/live_migration.md``): a VMM started
without a VM waits on ``vm.receive-migration receiver_url=unix:<path>|tcp:<host>:<port>``;
``vm.send-migration destination_url=...`` on the source sends the configuration, guest RAM
while the guest runs (pre-copy with the backend's dirty log), then, paused, the rest of RAM and
the state of every piece (the snapshot contract, :mod:`vmmkit.state`), and the destination
resumes the VM. ``local=true`` hands the memfds of ``--memory shared=on`` RAM over instead.

- :mod:`vmmkit.migration.protocol`: the framed, versioned wire protocol;
- :mod:`vmmkit.migration.transport`: URLs and sockets;
- :mod:`vmmkit.migration.dirty`: which RAM to send again;
- :mod:`vmmkit.migration.source` / :mod:`vmmkit.migration.destination`: the two ends.
"""
