/*
 * test=netbench: throughput and round-trip latency of the first virtio-net
 * device against a host peer (bench/net.py), in three phases. All frames
 * have ethertype 0x88b5 and go to the broadcast address; the peer answers
 * from its own MAC to ours.
 *
 *  ping	netbench.pings (default 200) round trips: "vmmkit-ping <n>" out,
 *		wait for "vmmkit-pong <n>" (one retry after a second);
 *  tx		netbench.count (default 4000) frames of netbench.size bytes
 *		(default 1514, at most 1514) with payload "vmmkit-sink", as fast
 *		as the ring takes them; the peer counts what arrives;
 *  rx		"vmmkit-flood <count> <size>" out; the peer sends that many
 *		frames of that size; counted until all arrived or nothing came
 *		for a second.
 *
 * Each phase ends with one line
 *
 *	selftest: info netbench: ping <us> us (<n> round trips)
 *	selftest: info netbench: tx <MiB/s> MiB/s <kframes/s> kframes/s (<count> x <size> B)
 *	selftest: info netbench: rx <MiB/s> MiB/s <kframes/s> kframes/s (<got>/<count> x <size> B)
 *
 * then "ok netbench". MiB/s counts frame bytes (no virtio header); rx is
 * timed from the first to the last frame received.
 *
 * Guest ring-0 code may be emulated at ~1 us per instruction (pvm-host.md),
 * so the per-frame work is small: every ring slot owns one descriptor and one
 * buffer (header + frame), written once; a frame is an available-ring entry,
 * the index and a notification (skipped while the device sets
 * VIRTQ_USED_F_NO_NOTIFY); completions are found by polling the used index,
 * with interrupts off (VIRTQ_AVAIL_F_NO_INTERRUPT).
 * Time is the cycle counter, its rate measured against the CMOS RTC.
 */
#include "arch.h"
#include "arch_io.h"
#include "bootinfo.h"
#include "cmdline.h"
#include "printf.h"
#include "report.h"
#include "string.h"
#include "test.h"
#include "virtio.h"

#define VIRTIO_NET_F_MAC	(1ull << 5)
#define HDR		12
#define BUF		2048
#define ETH_P_VMMKIT	0x88b5
#define MAX_FRAME	1514
#define MIN_FRAME	60
#define VIRTQ_USED_F_NO_NOTIFY 1

static u8 *rx_buf[VIRTQ_MAX_SIZE], *tx_buf[VIRTQ_MAX_SIZE];
static u8 mac[6];
static u64 hz;
static char msg[96];

static u64 param(const char *key, u64 dflt)
{
	size_t len;
	const char *v = cmdline_value(boot_info->cmdline, key, 0, &len);
	u64 n;

	if (v && cmdline_parse_u64(&v, v + len, &n, true))
		return n;
	return dflt;
}

/* Cycles per second: cycles between two changes of the clock's seconds. */
static u64 cycles_per_second(void)
{
	int s0 = arch_clock_seconds(), s;
	u64 t0, t1, start = arch_cycles();

	if (s0 < 0)
		return 0;
	while ((s = arch_clock_seconds()) == s0)
		if (arch_cycles() - start > 1ull << 36)
			return 0;
	t0 = arch_cycles();
	while (arch_clock_seconds() == s)
		if (arch_cycles() - t0 > 1ull << 36)
			return 0;
	t1 = arch_cycles();
	return t1 - t0;
}

static void decimal(char *buf, size_t size, u64 tenths)
{
	snprintf(buf, size, "%llu.%llu", (unsigned long long)(tenths / 10),
		 (unsigned long long)(tenths % 10));
}

static void notify(struct virtio_dev *d, struct virtq *q)
{
	dma_mb();
	if (!(READ_ONCE(q->used->flags) & VIRTQ_USED_F_NO_NOTIFY))
		d->transport->notify(d, q);
}

/* A frame in TX slot s: header, broadcast, our MAC, our type, the text, zero padding. */
static u32 build(unsigned s, const char *text, u32 size)
{
	u8 *f = tx_buf[s] + HDR;

	memset(tx_buf[s], 0, HDR + 14 + 24);
	memset(f, 0xff, 6);
	memcpy(f + 6, mac, 6);
	f[12] = ETH_P_VMMKIT >> 8;
	f[13] = ETH_P_VMMKIT & 0xff;
	snprintf((char *)f + 14, 24, "%s", text);
	return size;
}

static void tx_slot(struct virtq *q, unsigned s, u32 size)
{
	q->desc[s] = (struct virtq_desc){ dma_addr(tx_buf[s]), HDR + size, 0, 0 };
}

/* Make TX slot s available. */
static void tx_post(struct virtq *q, unsigned s)
{
	q->avail->ring[q->avail_idx % q->size] = s;
	dma_wmb();
	WRITE_ONCE(q->avail->idx, ++q->avail_idx);
}

/* Give RX slot s back to the device. */
static void rx_post(struct virtq *q, unsigned s)
{
	q->avail->ring[q->avail_idx % q->size] = s;
	dma_wmb();
	WRITE_ONCE(q->avail->idx, ++q->avail_idx);
}

/* The payload of a received frame of ours addressed to us, or NULL. */
static const char *ours(unsigned s, u32 len)
{
	const u8 *f = rx_buf[s] + HDR;

	if (len < HDR + 14 + 1 || len > BUF)
		return NULL;
	if ((f[12] << 8 | f[13]) != ETH_P_VMMKIT || memcmp(f, mac, 6))
		return NULL;
	return (const char *)f + 14;
}

/* Wait for pong n, recycling RX buffers; true if it came within `cycles`. */
static bool wait_pong(struct virtio_dev *d, struct virtq *rx, unsigned n, u64 cycles)
{
	char want[24];
	int wlen = snprintf(want, sizeof(want), "vmmkit-pong %u", n);
	u64 start = arch_cycles();
	bool got = false;

	while (!got) {
		if (READ_ONCE(rx->used->idx) == rx->last_used) {
			if (arch_cycles() - start > cycles)
				return false;
			continue;
		}
		dma_rmb();
		while (READ_ONCE(rx->used->idx) != rx->last_used) {
			struct virtq_used_elem e = rx->used->ring[rx->last_used % rx->size];
			const char *p;

			rx->last_used++;
			if (e.id >= rx->size)
				continue;
			p = ours(e.id, e.len);
			if (p && !memcmp(p, want, wlen) && (p[wlen] == 0))
				got = true;
			rx_post(rx, e.id);
		}
		notify(d, rx);
	}
	return true;
}

/* Reclaim used TX slots; how many. */
static unsigned tx_reap(struct virtq *tx)
{
	unsigned n = 0;

	while (READ_ONCE(tx->used->idx) != tx->last_used) {
		tx->last_used++;
		n++;
	}
	return n;
}

static const char *phase_ping(struct virtio_dev *d, struct virtq *rx, struct virtq *tx, u64 pings)
{
	u64 total = 0;
	char text[24], us[24];

	for (unsigned n = 1; n <= pings; n++) {
		bool got = false;

		snprintf(text, sizeof(text), "vmmkit-ping %u", n);
		for (unsigned try = 0; try < 2 && !got; try++) {
			u64 t0 = arch_cycles();

			tx_slot(tx, 0, build(0, text, MIN_FRAME));
			tx_post(tx, 0);
			notify(d, tx);
			got = wait_pong(d, rx, n, hz);
			total += arch_cycles() - t0;
			while (!tx_reap(tx))
				if (arch_cycles() - t0 > 2 * hz)
					return "the ping was never transmitted";
		}
		if (!got) {
			snprintf(msg, sizeof(msg), "no pong %u", n);
			return msg;
		}
	}
	decimal(us, sizeof(us), total / pings * 10000000 / hz);
	info("netbench", "ping %s us (%llu round trips)", us, (unsigned long long)pings);
	return NULL;
}

static const char *phase_tx(struct virtio_dev *d, struct virtq *tx, u64 count, u32 size)
{
	u64 sent = 0, done = 0, t0, t1, wait;
	unsigned slots = tx->size;
	char mibs[24], kfps[24];

	for (unsigned s = 0; s < slots; s++)
		tx_slot(tx, s, build(s, "vmmkit-sink", size));
	dma_wmb();
	t0 = arch_cycles();
	while (done < count) {
		bool added = false;

		while (sent - done < slots && sent < count) {
			tx_post(tx, sent % slots);
			sent++;
			added = true;
		}
		if (added)
			notify(d, tx);
		wait = arch_cycles();
		while (READ_ONCE(tx->used->idx) == tx->last_used)
			if (arch_cycles() - wait > 10 * hz)
				return "a transmitted frame was never used";
		dma_rmb();
		done += tx_reap(tx);
	}
	t1 = arch_cycles();
	decimal(mibs, sizeof(mibs), count * size * 10 / 1024 * hz / (t1 - t0) / 1024);
	decimal(kfps, sizeof(kfps), count * hz / 100 / (t1 - t0));
	info("netbench", "tx %s MiB/s %s kframes/s (%llu x %u B)", mibs, kfps, (unsigned long long)count,
	     size);
	return NULL;
}

static const char *phase_rx(struct virtio_dev *d, struct virtq *rx, struct virtq *tx, u64 count,
			    u32 size)
{
	u64 got = 0, bytes = 0, first = 0, last = 0, idle;
	char text[40], mibs[24], kfps[24];

	snprintf(text, sizeof(text), "vmmkit-flood %llu %u", (unsigned long long)count, size);
	tx_slot(tx, 0, build(0, text, MIN_FRAME));
	tx_post(tx, 0);
	notify(d, tx);
	idle = arch_cycles();
	while (got < count && arch_cycles() - idle < hz) {
		if (READ_ONCE(rx->used->idx) == rx->last_used)
			continue;
		dma_rmb();
		while (READ_ONCE(rx->used->idx) != rx->last_used) {
			struct virtq_used_elem e = rx->used->ring[rx->last_used % rx->size];
			const char *p;

			rx->last_used++;
			if (e.id >= rx->size)
				continue;
			p = ours(e.id, e.len);
			if (p && !memcmp(p, "vmmkit-data", 11)) {
				last = arch_cycles();
				if (!got)
					first = last;
				got++;
				bytes += e.len - HDR;
			}
			rx_post(rx, e.id);
		}
		notify(d, rx);
		idle = arch_cycles();
	}
	tx_reap(tx);
	if (got < 2) {
		snprintf(msg, sizeof(msg), "%llu of %llu flood frames arrived", (unsigned long long)got,
			 (unsigned long long)count);
		return msg;
	}
	/* got - 1 intervals between the first and the last frame */
	decimal(mibs, sizeof(mibs), (bytes - bytes / got) * 10 / 1024 * hz / (last - first) / 1024);
	decimal(kfps, sizeof(kfps), (got - 1) * hz / 100 / (last - first));
	info("netbench", "rx %s MiB/s %s kframes/s (%llu/%llu x %u B)", mibs, kfps,
	     (unsigned long long)got, (unsigned long long)count, size);
	return NULL;
}

static void run_netbench(void)
{
	struct virtio_dev *d = virtio_find(VIRTIO_ID_NET, 0);
	u64 count = param("netbench.count", 4000), size = param("netbench.size", MAX_FRAME);
	u64 pings = param("netbench.pings", 200);
	struct virtq *rx, *tx;
	const char *err;

	if (!d) {
		report_fail("netbench", "no virtio-net device");
		return;
	}
	if (size < MIN_FRAME || size > MAX_FRAME || !count || !pings) {
		report_fail("netbench", "netbench.size %llu: want %u to %u bytes; count, pings > 0",
			    (unsigned long long)size, MIN_FRAME, MAX_FRAME);
		return;
	}
	/* Buffers: RAM past the image (the DMA pool is too small for 32 of them). */
	u64 ram = ALIGN_UP((u64)(uintptr_t)_end, 1ull << 21) + (1ull << 21);

	if (!memmap_is_ram(boot_info, ram, ram + 2 * VIRTQ_MAX_SIZE * BUF) || ram + (1ull << 21) > 1ull << 32) {
		report_fail("netbench", "no RAM for the buffers past the image");
		return;
	}
	for (unsigned i = 0; i < VIRTQ_MAX_SIZE; i++) {
		rx_buf[i] = (u8 *)(uintptr_t)(ram + 2 * i * BUF);
		tx_buf[i] = (u8 *)(uintptr_t)(ram + (2 * i + 1) * BUF);
	}
	hz = cycles_per_second();
	if (!hz) {
		report_skip("netbench", "no clock to measure the cycle counter against");
		return;
	}
	err = virtio_start(d, VIRTIO_NET_F_MAC, 2);
	if (err) {
		report_fail("netbench", "%s: %s", d->where, err);
		return;
	}
	if (!(d->features & VIRTIO_NET_F_MAC)) {
		report_fail("netbench", "%s: no VIRTIO_NET_F_MAC", d->where);
		goto out;
	}
	virtio_config_bytes(d, 0, mac, 6);
	rx = &d->vq[0];
	tx = &d->vq[1];
	info("netbench", "%s, cycle counter %llu kHz, queues %u/%u", d->where,
	     (unsigned long long)hz / 1000, rx->size, tx->size);
	/* Polled: no interrupts (each would be an injection and a handler in emulated ring 0). */
	WRITE_ONCE(rx->avail->flags, VIRTQ_AVAIL_F_NO_INTERRUPT);
	WRITE_ONCE(tx->avail->flags, VIRTQ_AVAIL_F_NO_INTERRUPT);
	for (unsigned s = 0; s < rx->size; s++) {
		rx->desc[s] = (struct virtq_desc){ dma_addr(rx_buf[s]), BUF, VIRTQ_DESC_F_WRITE, 0 };
		rx_post(rx, s);
	}
	notify(d, rx);

	err = phase_ping(d, rx, tx, pings);
	if (!err)
		err = phase_tx(d, tx, count, (u32)size);
	if (!err)
		err = phase_rx(d, rx, tx, count, (u32)size);
	if (err)
		report_fail("netbench", "%s", err);
	else
		report_ok("netbench", "(%llu frames each way)", (unsigned long long)count);
out:
	virtio_reset(d);
}
SELFTEST(netbench, run_netbench, "virtio-net: round trips and throughput both ways, for bench/net.py");
