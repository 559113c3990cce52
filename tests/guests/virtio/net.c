/*
 * test=net: the first virtio-net device. Reads the MAC (VIRTIO_NET_F_MAC),
 * then for n = 1, 2, 3 broadcasts an Ethernet frame of type 0x88b5 whose
 * payload is "vmmkit-ping <n>" and waits for a frame of type 0x88b5,
 * addressed to our MAC, with payload "vmmkit-pong <n>" (the rest of the
 * frame may be zero padding). A ping is sent again every second, at most
 * 5 times. The host side (tests/integration/netns.py) answers.
 */
#include "arch.h"
#include "arch_io.h"
#include "printf.h"
#include "report.h"
#include "string.h"
#include "test.h"
#include "timeout.h"
#include "virtio.h"

#define VIRTIO_NET_F_MAC	(1ull << 5)

#define NET_HDR_LEN	12		/* struct virtio_net_hdr, VERSION_1 */
#define BUF_SIZE	2048		/* >= NET_HDR_LEN + 1514: no MRG_RXBUF */
#define RX_BUFS		8
#define ETH_P_VMMKIT	0x88b5		/* IEEE local experimental ethertype 1 */
#define ETH_MIN		60		/* frame without FCS, padded */
#define PINGS		3
#define TRIES		5

static u8 *rx_buf[RX_BUFS], *tx_buf;
static u8 owner[VIRTQ_MAX_SIZE];	/* descriptor head -> rx buffer */
static unsigned other_frames;

static bool post_rx(struct virtq *q, unsigned i)
{
	struct vbuf b = { rx_buf[i], BUF_SIZE, true };
	int head = virtq_add(q, &b, 1);

	if (head < 0)
		return false;
	owner[head] = i;
	return true;
}

/* Is this received buffer the pong for ping n? */
static bool is_pong(const u8 *buf, u32 len, const u8 mac[6], unsigned n)
{
	const u8 *f = buf + NET_HDR_LEN;
	char want[24];
	int wlen = snprintf(want, sizeof(want), "vmmkit-pong %u", n);

	if (len < NET_HDR_LEN + 14 || len > BUF_SIZE)
		return false;
	len -= NET_HDR_LEN;
	if ((f[12] << 8 | f[13]) != ETH_P_VMMKIT) {
		other_frames++;
		return false;
	}
	if (memcmp(f, mac, 6) || len < 14u + wlen || memcmp(f + 14, want, wlen))
		return false;
	return len == 14u + wlen || f[14 + wlen] == 0;
}

static void run_net(void)
{
	struct virtio_dev *d = virtio_find(VIRTIO_ID_NET, 0);
	struct virtq *rxq, *txq;
	unsigned replies = 0, nrx;
	u8 mac[6] = { 0x52, 0x54, 0x00, 0x00, 0x00, 0x01 };
	const char *err;

	if (!d) {
		report_fail("net", "no virtio-net device");
		return;
	}
	for (unsigned i = 0; i < RX_BUFS; i++)
		if (!rx_buf[i])
			rx_buf[i] = dma_alloc(BUF_SIZE, 64);
	if (!tx_buf)
		tx_buf = dma_alloc(BUF_SIZE, 64);
	if (!rx_buf[RX_BUFS - 1] || !tx_buf) {
		report_fail("net", "out of DMA memory");
		return;
	}
	err = virtio_start(d, VIRTIO_NET_F_MAC, 2);
	if (err) {
		report_fail("net", "%s: %s", d->where, err);
		return;
	}
	rxq = &d->vq[0];
	txq = &d->vq[1];
	if (d->features & VIRTIO_NET_F_MAC)
		virtio_config_bytes(d, 0, mac, 6);
	info("virtio", "net: %s mac %02x:%02x:%02x:%02x:%02x:%02x%s", d->where, mac[0],
	     mac[1], mac[2], mac[3], mac[4], mac[5],
	     d->features & VIRTIO_NET_F_MAC ? "" : " (no VIRTIO_NET_F_MAC: our own)");

	nrx = rxq->size < RX_BUFS ? rxq->size : RX_BUFS;
	for (unsigned i = 0; i < nrx; i++)
		post_rx(rxq, i);
	virtq_kick(rxq);

	for (unsigned n = 1; n <= PINGS; n++) {
		bool got = false;
		u8 *f = tx_buf + NET_HDR_LEN;
		struct vbuf b = { tx_buf, NET_HDR_LEN + ETH_MIN, false };

		memset(tx_buf, 0, NET_HDR_LEN + ETH_MIN);
		memset(f, 0xff, 6);
		memcpy(f + 6, mac, 6);
		f[12] = ETH_P_VMMKIT >> 8;
		f[13] = ETH_P_VMMKIT & 0xff;
		snprintf((char *)f + 14, ETH_MIN - 14, "vmmkit-ping %u", n);

		for (unsigned try = 0; try < TRIES && !got; try++) {
			struct timeout t;

			err = virtq_transfer(txq, &b, 1, NULL, 5);
			if (err) {
				report_fail("net", "transmit: %s", err);
				goto out;
			}
			timeout_start(&t, 1);
			while (!got && !timeout_expired(&t)) {
				u32 len;
				int head = virtq_get_used(rxq, &len);

				if (head < 0) {
					arch_cpu_relax();
					continue;
				}
				got = is_pong(rx_buf[owner[head]], len, mac, n);
				post_rx(rxq, owner[head]);
				virtq_kick(rxq);
			}
		}
		if (got)
			replies++;
		else
			info("virtio", "net: no reply to ping %u", n);
	}
	if (other_frames)
		info("virtio", "net: %u other frames ignored", other_frames);
	if (replies == PINGS)
		report_ok("net", "(%u/%u replies)", replies, PINGS);
	else
		report_fail("net", "%u/%u replies", replies, PINGS);
out:
	virtio_reset(d);
}
SELFTEST(net, run_net, "virtio-net: MAC, 3 x ping/pong frames of type 0x88b5");
