#ifndef X86_64_BOOT_H
#define X86_64_BOOT_H

#include "bootinfo.h"

/* Fill *bi (zeroed) from the structure the VMM passed at entry. */
void boot_parse(struct bootinfo *bi);

#endif
