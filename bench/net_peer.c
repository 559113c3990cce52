/*
 * net_peer: the host side of the test guest's test=netbench (tests/guests/virtio/netbench.c), for
 * bench/net.py. Runs inside the network namespace of the tap, on an AF_PACKET socket bound to it:
 *
 *   "vmmkit-ping <n>"            -> answers "vmmkit-pong <n>" to the sender
 *   "vmmkit-sink"                -> counted (frames, bytes)
 *   "vmmkit-flood <count> <size>" -> sends <count> frames of <size> bytes, payload "vmmkit-data"
 *
 * Frames of ethertype 0x88b5 only; our own (outgoing) ones are ignored. Prints "ready" once the
 * socket is bound; when its stdin closes, prints "sink <frames> <bytes> flood <sent> <refused>"
 * and exits. C, so the peer adds microseconds, not a Python interpreter's, to each round trip.
 *
 *   cc -O2 -o net_peer net_peer.c && ip netns exec NS ./net_peer tap0
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define ETH_P_VMMKIT 0x88b5

static const unsigned char our_mac[6] = {0x02, 0, 0, 0, 0, 0x01};

static void frame_to(unsigned char *f, const unsigned char *dst)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, our_mac, 6);
    f[12] = ETH_P_VMMKIT >> 8;
    f[13] = ETH_P_VMMKIT & 0xff;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s <interface>\n", argv[0]);
        return 2;
    }
    int sock = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (sock < 0) {
        perror("socket");
        return 1;
    }
    struct sockaddr_ll at = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                             .sll_ifindex = (int)if_nametoindex(argv[1])};
    if (at.sll_ifindex == 0 || bind(sock, (struct sockaddr *)&at, sizeof at) < 0) {
        perror(argv[1]);
        return 1;
    }
    int big = 4 << 20;
    setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    printf("ready\n");
    fflush(stdout);

    unsigned long long sink_frames = 0, sink_bytes = 0, flood_sent = 0, flood_refused = 0;
    static unsigned char in[65536], out[2048];
    struct pollfd fds[2] = {{.fd = sock, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0 && errno != EINTR)
            break;
        if (fds[1].revents) {
            char buf[64];
            if (read(0, buf, sizeof buf) <= 0)
                break;
        }
        if (!(fds[0].revents & POLLIN))
            continue;
        struct sockaddr_ll from;
        socklen_t fromlen = sizeof from;
        ssize_t n = recvfrom(sock, in, sizeof in, 0, (struct sockaddr *)&from, &fromlen);
        if (n < 15 || from.sll_pkttype == PACKET_OUTGOING)
            continue;
        if ((in[12] << 8 | in[13]) != ETH_P_VMMKIT)
            continue;
        const char *text = (const char *)in + 14;
        size_t len = (size_t)n - 14;
        if (len >= 12 && !memcmp(text, "vmmkit-ping ", 12)) {
            memset(out, 0, 60);
            frame_to(out, in + 6);
            memcpy(out + 14, "vmmkit-pong ", 12);
            size_t digits = 0;
            while (12 + digits < len && digits < 20 && text[12 + digits] >= '0' && text[12 + digits] <= '9')
                digits++;
            memcpy(out + 26, text + 12, digits);
            if (send(sock, out, 60, 0) < 0)
                perror("send pong");
        } else if (len >= 11 && !memcmp(text, "vmmkit-sink", 11)) {
            sink_frames++;
            sink_bytes += (unsigned long long)n;
        } else if (len >= 13 && !memcmp(text, "vmmkit-flood ", 13)) {
            char request[48] = {0};
            memcpy(request, text + 13, len - 13 < sizeof request - 1 ? len - 13 : sizeof request - 1);
            unsigned long long count = strtoull(request, NULL, 10);
            char *space = strchr(request, ' ');
            unsigned long size = space ? strtoul(space + 1, NULL, 10) : 0;
            if (size < 60 || size > 1514)
                continue;
            memset(out, 0, size);
            frame_to(out, in + 6);
            memcpy(out + 14, "vmmkit-data", 11);
            for (unsigned long long i = 0; i < count; i++) {
                if (send(sock, out, size, 0) < 0)
                    flood_refused++;
                else
                    flood_sent++;
            }
        }
    }
    printf("sink %llu %llu flood %llu %llu\n", sink_frames, sink_bytes, flood_sent, flood_refused);
    return 0;
}
