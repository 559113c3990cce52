/* wdt: the watchdog test's guest program (tests/linux/test_linux_watchdog.py), linked static.
 *
 *   wdt status        print "bootstatus <flags>" (WDIOC_GETBOOTSTATUS: WDIOF_CARDRESET = 32
 *                     after a watchdog reset), then close with the magic 'V' so the timer stops
 *   wdt arm <s> <n>   set a <s>-second timeout, pet <n> times every <s>/4 s, print "stopped",
 *                     then exit without the magic close: the timer keeps running, unpetted
 *
 * Every line starts with "VMMKIT-WDT: " on stdout (the serial console).
 */
#include <fcntl.h>
#include <linux/watchdog.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int open_watchdog(void)
{
    int fd = open("/dev/watchdog", O_WRONLY);
    if (fd < 0) {
        printf("VMMKIT-WDT: error open /dev/watchdog\n");
        fflush(stdout);
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 2 && strcmp(argv[1], "status") == 0) {
        int fd = open_watchdog(), flags = -1;
        struct watchdog_info info;
        memset(&info, 0, sizeof(info));
        ioctl(fd, WDIOC_GETSUPPORT, &info);
        if (ioctl(fd, WDIOC_GETBOOTSTATUS, &flags) < 0)
            flags = -1;
        printf("VMMKIT-WDT: bootstatus %d identity %.32s\n", flags, (const char *)info.identity);
        if (write(fd, "V", 1) != 1 || close(fd) < 0)
            printf("VMMKIT-WDT: error magic close\n");
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "arm") == 0) {
        int seconds = atoi(argv[2]), pets = atoi(argv[3]), fd = open_watchdog();
        if (ioctl(fd, WDIOC_SETTIMEOUT, &seconds) < 0) {
            printf("VMMKIT-WDT: error settimeout\n");
            return 1;
        }
        printf("VMMKIT-WDT: armed %d\n", seconds);
        for (int i = 0; i < pets; i++) {
            usleep(seconds * 250000);
            ioctl(fd, WDIOC_KEEPALIVE, 0);
        }
        printf("VMMKIT-WDT: stopped\n");
        return 0; /* no magic close: "watchdog did not stop!", and the timer runs on */
    }
    fprintf(stderr, "usage: wdt status | wdt arm <seconds> <pets>\n");
    return 2;
}
