/* The guest side of tests/kata: a stand-in for the Kata agent, which listens on vsock port
 * 1024 (Kata's agent port; the host reaches it through the hybrid vsock's Unix socket with
 * "CONNECT 1024"). It is not Kata's agent (no ttRPC): each connection carries one shell
 * command line; the answer is the command's output, then "\nEXIT <status>\n", then the
 * connection closes. The host uses it to see what the guest sees (a hot-added disk, a new
 * vCPU...) and to online hot-added vCPUs and memory, as Kata's agent does.
 *
 * Prints "KATA-AGENT: listening <port>" on the console once it accepts connections.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define AGENT_PORT 1024

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static void serve(int conn)
{
    char command[4096];
    size_t used = 0;
    while (used < sizeof(command) - 1) {
        ssize_t n = read(conn, command + used, 1);
        if (n <= 0 || command[used] == '\n')
            break;
        used++;
    }
    command[used] = '\0';
    FILE *out = popen(command, "r");
    if (out == NULL) {
        dprintf(conn, "\nEXIT 127\n");
        return;
    }
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), out)) > 0)
        if (write_all(conn, buf, n) < 0)
            break;
    int status = pclose(out);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    dprintf(conn, "\nEXIT %d\n", code);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* as Kata's agent (Rust ignores SIGPIPE): a peer gone is an error, not death */
    int listener = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (listener < 0) {
        printf("KATA-AGENT: fail socket %d\n", errno);
        return 1;
    }
    struct sockaddr_vm addr;
    memset(&addr, 0, sizeof(addr));
    addr.svm_family = AF_VSOCK;
    addr.svm_port = AGENT_PORT;
    addr.svm_cid = VMADDR_CID_ANY;
    if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(listener, 8) < 0) {
        printf("KATA-AGENT: fail bind %d\n", errno);
        return 1;
    }
    printf("KATA-AGENT: listening %d\n", AGENT_PORT);
    fflush(stdout);
    for (;;) {
        int conn = accept(listener, NULL, NULL);
        if (conn < 0) {
            if (errno == EINTR)
                continue;
            printf("KATA-AGENT: fail accept %d\n", errno);
            fflush(stdout);
            sleep(1);
            continue;
        }
        serve(conn);
        close(conn);
    }
}
