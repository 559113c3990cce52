"""ACPI support shared by every architecture that describes its platform with ACPI: the AML
builder (:mod:`vmmkit.acpi.aml`) that devices use to describe themselves in the DSDT."""
