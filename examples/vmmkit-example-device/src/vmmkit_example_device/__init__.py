"""An example vmmkit device plugin: an LED panel on an I/O port."""

__version__ = "0.1.0"
