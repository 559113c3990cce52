"""vmmkit-devices: device types for vmmkit, registered through the ``vmmkit`` entry point.

Layout: ``legacy/`` (PC platform devices), ``debug/`` (debug ports), ``acpi/`` (ACPI
registers), ``console/`` (host backends shared by console devices); virtio devices will live
in ``virtio/``.
"""

__version__ = "0.1.0"
