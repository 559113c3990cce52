#ifndef X86_64_SERIAL_H
#define X86_64_SERIAL_H

void serial_init(void);

#endif
