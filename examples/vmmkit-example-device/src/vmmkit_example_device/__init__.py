"""An example vmmkit device plugin: an LED panel on an I/O port."""
