/*
 * test=virtio: find the devices (one "info virtio:" line each) and list
 * their types, ordered by type number: "ok virtio (4 devices: net blk
 * console rng)". Stable for a given set of devices, whatever the
 * transports and addresses.
 */
#include "printf.h"
#include "report.h"
#include "test.h"
#include "virtio.h"

static void run_virtio(void)
{
	unsigned n = virtio_count();
	char list[200];
	size_t len = 0;

	list[0] = 0;
	for (u32 type = 1; type < 64; type++)
		for (unsigned i = 0; i < n; i++)
			if (virtio_device(i)->type == type && len < sizeof(list))
				len += snprintf(list + len, sizeof(list) - len, " %s",
						virtio_type_name(type));
	report_ok("virtio", "(%u device%s%s%s)", n, n == 1 ? "" : "s", n ? ":" : "", list);
}
SELFTEST(virtio, run_virtio, "list the virtio devices (mmio command line, PCI bus 0)");
