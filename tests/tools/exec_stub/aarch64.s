// kiln's exec stubs for aarch64: the same two programs as x86_64.s (which says what they do).
        .text
        .globl exec_start
exec_start:
        ldr     x19, [sp]               // argc
        add     x20, sp, #8             // argv
        add     x21, x20, x19, lsl #3
        add     x21, x21, #8            // envp
do_exec:
        mov     x0, #3                  // fcntl(3, F_SETFD, FD_CLOEXEC)
        mov     x1, #2
        mov     x2, #1
        mov     x8, #25
        svc     #0
        cbnz    x0, refuse
        cmp     x19, #2                 // a path and an argv[0] at least
        b.lt    refuse
        ldr     x0, [x20]               // execve(argv[0], &argv[1], envp)
        add     x1, x20, #8
        mov     x2, x21
        mov     x8, #221
        svc     #0
        neg     x22, x0                 // errno
        sub     sp, sp, #16
        mov     w9, #0xff
        strb    w9, [sp]
        strb    w22, [sp, #1]
        mov     x0, #3                  // write(3, "\xff" errno, 2)
        mov     x1, sp
        mov     x2, #2
        mov     x8, #64
        svc     #0
        mov     x0, #126
        mov     x9, #127
        cmp     x22, #2                 // ENOENT
        csel    x0, x9, x0, eq
        b       leave
refuse:
        mov     x0, #126
leave:
        mov     x8, #94                 // exit_group
        svc     #0

        .globl init_start
init_start:
        ldr     x19, [sp]
        add     x20, sp, #8
        add     x21, x20, x19, lsl #3
        add     x21, x21, #8
        sub     sp, sp, #160            // [sp] all signals, [sp+8] old mask,
                                        // [sp+16] wait status, [sp+32] siginfo
        mov     x0, #3                  // fcntl(3, F_GETFD): no fd 3, no init
        mov     x1, #1
        mov     x8, #25
        svc     #0
        tbnz    x0, #63, refuse
        mov     x9, #-1
        str     x9, [sp]
        mov     x0, #0                  // rt_sigprocmask(SIG_BLOCK, all, &old, 8)
        mov     x1, sp
        add     x2, sp, #8
        mov     x3, #8
        mov     x8, #135
        svc     #0
        mov     x0, #17                 // clone(SIGCHLD, 0, 0, 0, 0): fork
        mov     x1, #0
        mov     x2, #0
        mov     x3, #0
        mov     x4, #0
        mov     x8, #220
        svc     #0
        tbnz    x0, #63, refuse
        cbz     x0, child
        mov     x23, x0                 // the child's pid
        mov     x0, #3                  // close(3): kiln sees EOF once the child has exec'd
        mov     x8, #57
        svc     #0
wait_signal:
        mov     x0, sp                  // rt_sigtimedwait(all, &info, NULL, 8)
        add     x1, sp, #32
        mov     x2, #0
        mov     x3, #8
        mov     x8, #137
        svc     #0
        tbnz    x0, #63, wait_signal
        cmp     x0, #17                 // SIGCHLD
        b.eq    reap
        mov     x1, x0                  // kill(child, sig)
        mov     x0, x23
        mov     x8, #129
        svc     #0
        b       wait_signal
reap:
        mov     x0, #-1                 // wait4(-1, &status, WNOHANG, NULL)
        add     x1, sp, #16
        mov     x2, #1
        mov     x3, #0
        mov     x8, #260
        svc     #0
        cmp     x0, #0
        b.le    wait_signal
        cmp     x0, x23
        b.ne    reap
        ldr     w9, [sp, #16]
        and     w0, w9, #0x7f           // the signal that killed it, if any
        cbz     w0, exited
        add     w0, w0, #128
        b       leave
exited:
        ubfx    w0, w9, #8, #8
        b       leave
child:
        mov     x0, #2                  // rt_sigprocmask(SIG_SETMASK, &old, NULL, 8)
        add     x1, sp, #8
        mov     x2, #0
        mov     x3, #8
        mov     x8, #135
        svc     #0
        add     sp, sp, #160
        b       do_exec
