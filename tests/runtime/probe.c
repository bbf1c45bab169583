/* Probes run inside kiln containers: each tries one thing a container must not
 * be able to do (or reports an id), and prints ALLOWED or BLOCKED <errno name>. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int report(long rc) {
    if (rc < 0) {
        printf("BLOCKED %s\n", strerrorname_np(errno));
        return 1;
    }
    printf("ALLOWED\n");
    return 0;
}

static int child_fn(void *arg) { (void)arg; return 0; }

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *what = argv[1];
    if (!strcmp(what, "keyctl"))  /* KEYCTL_JOIN_SESSION_KEYRING */
        return report(syscall(SYS_keyctl, 1, "probe", 0, 0, 0));
    if (!strcmp(what, "add_key"))
        return report(syscall(SYS_add_key, "user", "probe", "x", 1, -3));
    if (!strcmp(what, "bpf"))
        return report(syscall(SYS_bpf, 0, NULL, 0));
    if (!strcmp(what, "clone_newuser")) {
        static char stack[65536];
        long pid = clone(child_fn, stack + sizeof stack, CLONE_NEWUSER | SIGCHLD, NULL);
        if (pid > 0) waitpid(pid, NULL, 0);
        return report(pid);
    }
    if (!strcmp(what, "unshare_user"))
        return report(unshare(CLONE_NEWUSER));
    if (!strcmp(what, "vsock"))
        return report(socket(40 /* AF_VSOCK */, SOCK_STREAM, 0));
    if (!strcmp(what, "alg"))
        return report(socket(38 /* AF_ALG */, SOCK_SEQPACKET, 0));
    if (!strcmp(what, "inet"))
        return report(socket(AF_INET, SOCK_STREAM, 0));
    if (!strcmp(what, "ptrace") && argc > 2)
        return report(ptrace(PTRACE_ATTACH, atoi(argv[2]), 0, 0));
    if (!strcmp(what, "kill") && argc > 2)
        return report(kill(atoi(argv[2]), SIGKILL));
    if (!strcmp(what, "personality"))
        return report(personality(strtoul(argv[2], 0, 0)));
    if (!strcmp(what, "open_rw") && argc > 2)
        return report(open(argv[2], O_RDWR));
    if (!strcmp(what, "write") && argc > 3) {
        int fd = open(argv[2], O_WRONLY);
        if (fd < 0) return report(fd);
        return report(write(fd, argv[3], strlen(argv[3])));
    }
    if (!strcmp(what, "euid")) {
        printf("%d\n", (int)geteuid());
        return 0;
    }
    if (!strcmp(what, "alloc") && argc > 2) {  /* touch N MiB, one page at a time */
        long mib = atol(argv[2]);
        for (long i = 0; i < mib; i++) {
            char *p = malloc(1 << 20);
            if (!p) return report(-1);
            memset(p, 1, 1 << 20);
        }
        printf("allocated %ld MiB\n", mib);
        return 0;
    }
    return 2;
}
