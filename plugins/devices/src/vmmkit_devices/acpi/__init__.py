"""ACPI hardware-reduced platform registers (sleep/reset today; the GED joins later)."""
