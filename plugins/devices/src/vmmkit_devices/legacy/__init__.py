"""PC platform devices: 16550A UART, CMOS RTC, i8042."""
