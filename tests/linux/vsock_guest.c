/* The guest side of tests/linux/test_linux_vsock.py: a static program /init runs once Linux's
 * virtio vsock transport is bound. It talks to the host through AF_VSOCK only (the host side is
 * vmmkit's hybrid vsock: Unix sockets), and reports one "VMMKIT-VSOCK: <step> ..." line per step
 * on the console:
 *
 *   listening <port> cid <cid>     a stream listener on <port>; the host now CONNECTs
 *   echoed <streams> <bytes>       <streams> host connections were accepted at once and every
 *                                  byte echoed back (poll(), all streams concurrently) until each
 *                                  host side shut its writing half
 *   outbound <reply...>            connected to the host (CID 2) port <out>, sent <bytes> of a
 *                                  known pattern, shut writing, read the host's one-line reply
 *   refused <port> <errno>         connecting to host port <refused> (nobody listens) failed
 *   fail <step> <errno>            a system call failed
 *
 * Arguments: listen=<port> streams=<n> out=<port> bytes=<n> refused=<port>
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define MAX_STREAMS 16
#define BUF_SIZE (64 * 1024)

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    printf("VMMKIT-VSOCK: %s\n", line);
    fflush(stdout);
}

static int fail(const char *step)
{
    say("fail %s %s", step, strerror(errno));
    return 1;
}

static unsigned arg(int argc, char **argv, const char *key, unsigned fallback)
{
    size_t n = strlen(key);
    for (int i = 1; i < argc; i++)
        if (strncmp(argv[i], key, n) == 0 && argv[i][n] == '=')
            return (unsigned)strtoul(argv[i] + n + 1, NULL, 10);
    return fallback;
}

static int vsock_connect(unsigned cid, unsigned port)
{
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

struct stream {
    int fd;
    int eof;
    size_t have, sent;
    unsigned char buf[BUF_SIZE];
};

static struct stream streams[MAX_STREAMS];

/* Echo every accepted stream until each host side has shut writing and got all its bytes. */
static int echo(int listener, unsigned count, unsigned long long *total)
{
    for (unsigned i = 0; i < count; i++) {
        streams[i].fd = accept(listener, NULL, NULL);
        if (streams[i].fd < 0)
            return fail("accept");
        fcntl(streams[i].fd, F_SETFL, O_NONBLOCK);
    }
    unsigned open = count;
    while (open) {
        struct pollfd fds[MAX_STREAMS];
        for (unsigned i = 0; i < count; i++) {
            struct stream *s = &streams[i];
            fds[i].fd = s->fd;
            fds[i].events = 0;
            fds[i].revents = 0;
            if (s->fd < 0)
                continue;
            if (s->sent < s->have)
                fds[i].events |= POLLOUT;
            else if (!s->eof)
                fds[i].events |= POLLIN;
        }
        if (poll(fds, count, 120000) <= 0)
            return fail("poll");
        for (unsigned i = 0; i < count; i++) {
            struct stream *s = &streams[i];
            if (s->fd < 0 || !fds[i].revents)
                continue;
            if (s->sent < s->have) {
                ssize_t n = write(s->fd, s->buf + s->sent, s->have - s->sent);
                if (n < 0 && errno != EAGAIN)
                    return fail("write");
                if (n > 0)
                    s->sent += (size_t)n;
            } else if (!s->eof) {
                ssize_t n = read(s->fd, s->buf, BUF_SIZE);
                if (n < 0 && errno != EAGAIN)
                    return fail("read");
                if (n == 0)
                    s->eof = 1;
                if (n > 0) {
                    s->have = (size_t)n;
                    s->sent = 0;
                    *total += (unsigned long long)n;
                }
            }
            if (s->eof && s->sent >= s->have) {
                close(s->fd);
                s->fd = -1;
                open--;
            }
        }
    }
    return 0;
}

static unsigned char pattern(unsigned long long i)
{
    return (unsigned char)((i * 7 + 13) % 251);
}

static int outbound(unsigned port, unsigned long long bytes)
{
    int fd = vsock_connect(VMADDR_CID_HOST, port);
    if (fd < 0)
        return fail("connect");
    static unsigned char buf[BUF_SIZE];
    unsigned long long done = 0;
    while (done < bytes) {
        size_t n = bytes - done < BUF_SIZE ? (size_t)(bytes - done) : BUF_SIZE;
        for (size_t k = 0; k < n; k++)
            buf[k] = pattern(done + k);
        size_t off = 0;
        while (off < n) {
            ssize_t w = write(fd, buf + off, n - off);
            if (w < 0)
                return fail("write-out");
            off += (size_t)w;
        }
        done += n;
    }
    if (shutdown(fd, SHUT_WR) < 0)
        return fail("shutdown");
    char reply[128];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(fd, reply + have, sizeof(reply) - 1 - have);
        if (n < 0)
            return fail("read-reply");
        if (n == 0 || have + (size_t)n >= sizeof(reply) - 1) {
            have += n > 0 ? (size_t)n : 0;
            break;
        }
        have += (size_t)n;
    }
    reply[have] = 0;
    char *nl = strchr(reply, '\n');
    if (nl)
        *nl = 0;
    close(fd);
    say("outbound %s", reply);
    return 0;
}

int main(int argc, char **argv)
{
    unsigned port = arg(argc, argv, "listen", 5000);
    unsigned count = arg(argc, argv, "streams", 3);
    unsigned out = arg(argc, argv, "out", 6000);
    unsigned long long bytes = arg(argc, argv, "bytes", 1 << 20);
    unsigned refused = arg(argc, argv, "refused", 7000);
    if (count > MAX_STREAMS)
        count = MAX_STREAMS;

    unsigned cid = 0;
    int dev = open("/dev/vsock", O_RDONLY);
    if (dev >= 0) {
        ioctl(dev, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid);
        close(dev);
    }
    int listener = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (listener < 0)
        return fail("socket");
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return fail("bind");
    if (listen(listener, MAX_STREAMS) < 0)
        return fail("listen");
    say("listening %u cid %u", port, cid);

    unsigned long long total = 0;
    if (echo(listener, count, &total))
        return 1;
    say("echoed %u %llu", count, total);

    if (outbound(out, bytes))
        return 1;

    int fd = vsock_connect(VMADDR_CID_HOST, refused);
    if (fd >= 0)
        say("refused %u connected", refused);
    else
        say("refused %u %s", refused, errno == ECONNRESET ? "ECONNRESET" : strerror(errno));
    return 0;
}
