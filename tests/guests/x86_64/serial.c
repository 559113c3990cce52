/* Polled 16550 UART on COM1 (I/O port 0x3f8), 115200 8N1. */
#include "arch.h"
#include "io.h"
#include "serial.h"

#define COM1		0x3f8
#define UART_THR	0	/* transmit holding register */
#define UART_DLL	0	/* divisor latch, DLAB = 1 */
#define UART_IER	1
#define UART_DLM	1
#define UART_FCR	2	/* write */
#define UART_IIR	2	/* read */
#define UART_LCR	3
#define UART_MCR	4
#define UART_LSR	5
#define LSR_THRE	0x20

/* Bytes we may write before polling LSR again (FIFO depth, or 1). */
static unsigned burst = 1, room;

void serial_init(void)
{
	outb(COM1 + UART_IER, 0x00);	/* no interrupts */
	outb(COM1 + UART_LCR, 0x80);	/* DLAB */
	outb(COM1 + UART_DLL, 0x01);	/* 115200 baud */
	outb(COM1 + UART_DLM, 0x00);
	outb(COM1 + UART_LCR, 0x03);	/* 8N1 */
	outb(COM1 + UART_FCR, 0x07);	/* enable and clear FIFOs */
	outb(COM1 + UART_MCR, 0x03);	/* DTR | RTS */
	burst = (inb(COM1 + UART_IIR) & 0xc0) == 0xc0 ? 16 : 1;
	room = 0;
}

void arch_putc(char c)
{
	if (!room) {
		unsigned i;

		/* Bounded: a stuck UART costs one timeout, then is not polled. */
		for (i = 0; i < 10000; i++) {
			if (inb(COM1 + UART_LSR) & LSR_THRE)
				break;
			arch_cpu_relax();
		}
		if (i == 10000)
			burst = ~0u;
		room = burst;
	}
	outb(COM1 + UART_THR, c);
	room--;
}
