"""VFIO PCI passthrough (``--device path=/sys/bus/pci/devices/...``): a host PCI function bound
to vfio-pci becomes a PCI function of the guest.

Layers, as the project's native modules have them: :mod:`.uapi` (the kernel's structures and
ioctl numbers), :mod:`.kernel` (the system calls, behind :class:`~.kernel.VfioKernel`),
:mod:`.container` (checked container/group/device bindings), :mod:`.config_space` and
:mod:`.device` (the function the guest sees), :mod:`.transport` (the per-VM VFIO state and the
``vfio-pci`` transport). :mod:`.simulator` is a simulated ``/dev/vfio`` for contract tests only.
Registration imports only :mod:`.device_type`.
"""
