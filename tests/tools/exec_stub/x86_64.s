# kiln's exec stubs for x86_64, run by the container's PID 1 from a sealed memfd so that
# /proc/self/exe is never a host binary when the image's program is exec'd (issue 10.2).
#
# exec: execve(argv[0], &argv[1], envp) with fd 3 (the start-error pipe) made close-on-exec;
#       on failure write 0xff and errno to fd 3 and exit 127 (ENOENT) or 126. With no fd 3
#       (started again by a '#!/proc/self/exe' script) it exits 126 at once.
# init: --init's PID 1. Blocks every signal, forks the exec stub's work, closes fd 3, then
#       forwards each signal it is sent to the child, reaps every zombie, and exits with the
#       child's status (128+N for signal N) once the child is gone.
        .intel_syntax noprefix
        .text
        .globl exec_start
exec_start:
        mov     r12, [rsp]              # argc
        lea     r13, [rsp + 8]          # argv
        lea     r14, [r13 + r12*8 + 8]  # envp
do_exec:
        mov     eax, 72                 # fcntl(3, F_SETFD, FD_CLOEXEC)
        mov     edi, 3
        mov     esi, 2
        mov     edx, 1
        syscall
        test    rax, rax
        jnz     refuse
        cmp     r12, 2                  # a path and an argv[0] at least
        jl      refuse
        mov     eax, 59                 # execve(argv[0], &argv[1], envp)
        mov     rdi, [r13]
        lea     rsi, [r13 + 8]
        mov     rdx, r14
        syscall
        neg     eax
        mov     r15d, eax               # errno
        sub     rsp, 16
        mov     byte ptr [rsp], 0xff
        mov     byte ptr [rsp + 1], al
        mov     eax, 1                  # write(3, "\xff" errno, 2)
        mov     edi, 3
        mov     rsi, rsp
        mov     edx, 2
        syscall
        mov     edi, 126
        mov     eax, 127
        cmp     r15d, 2                 # ENOENT
        cmove   edi, eax
        jmp     leave
refuse:
        mov     edi, 126
leave:
        mov     eax, 231                # exit_group
        syscall

        .globl init_start
init_start:
        mov     r12, [rsp]
        lea     r13, [rsp + 8]
        lea     r14, [r13 + r12*8 + 8]
        sub     rsp, 160                # [rsp] all signals, [rsp+8] old mask,
                                        # [rsp+16] wait status, [rsp+32] siginfo
        mov     eax, 72                 # fcntl(3, F_GETFD): no fd 3, no init
        mov     edi, 3
        mov     esi, 1
        syscall
        test    rax, rax
        js      refuse
        mov     qword ptr [rsp], -1
        mov     eax, 14                 # rt_sigprocmask(SIG_BLOCK, all, &old, 8)
        xor     edi, edi
        mov     rsi, rsp
        lea     rdx, [rsp + 8]
        mov     r10d, 8
        syscall
        mov     eax, 57                 # fork
        syscall
        test    rax, rax
        js      refuse
        jz      child
        mov     r15, rax                # the child's pid
        mov     eax, 3                  # close(3): kiln sees EOF once the child has exec'd
        mov     edi, 3
        syscall
wait_signal:
        mov     eax, 128                # rt_sigtimedwait(all, &info, NULL, 8)
        mov     rdi, rsp
        lea     rsi, [rsp + 32]
        xor     edx, edx
        mov     r10d, 8
        syscall
        test    eax, eax
        js      wait_signal
        cmp     eax, 17                 # SIGCHLD
        je      reap
        mov     esi, eax                # kill(child, sig)
        mov     rdi, r15
        mov     eax, 62
        syscall
        jmp     wait_signal
reap:
        mov     eax, 61                 # wait4(-1, &status, WNOHANG, NULL)
        mov     rdi, -1
        lea     rsi, [rsp + 16]
        mov     edx, 1
        xor     r10d, r10d
        syscall
        test    rax, rax
        jle     wait_signal
        cmp     rax, r15
        jne     reap
        mov     eax, [rsp + 16]
        mov     edi, eax
        and     edi, 0x7f               # the signal that killed it, if any
        jz      exited
        add     edi, 128
        jmp     leave
exited:
        shr     eax, 8
        movzx   edi, al
        jmp     leave
child:
        mov     eax, 14                 # rt_sigprocmask(SIG_SETMASK, &old, NULL, 8)
        mov     edi, 2
        lea     rsi, [rsp + 8]
        xor     edx, edx
        mov     r10d, 8
        syscall
        jmp     do_exec
