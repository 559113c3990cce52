"""vmmkit-devices: device types for vmmkit, registered through the ``vmmkit`` entry point.

Layout: ``device_types`` (the registered types: light declarations, see there), ``legacy/``
(PC and ARM platform devices), ``debug/`` (debug ports), ``acpi/`` (ACPI registers),
``console/`` (host backends shared by console devices), ``virtio/`` (virtio devices).
"""

__version__ = "0.1.0"
