/* bench/seccomp_attach.c - what attaching a seccomp filter costs a child (issue 17).
 *
 * The kernel converts a filter to eBPF, JITs it and runs it once per system call number of
 * each ABI (its action cache) inside seccomp(SECCOMP_SET_MODE_FILTER): every sandboxed spawn
 * pays that. This times the call itself in N forked children, one after the other, for each
 * filter file given (a struct sock_filter array, as sandbox.seccomp_filter() returns; an
 * empty file: no filter), interleaved in rounds, and prints the medians:
 *
 *   gcc -O2 -o /tmp/seccomp_attach bench/seccomp_attach.c
 *   .venv/bin/python -c 'import sys; from pyinetd import sandbox
 *   sys.stdout.buffer.write(sandbox.seccomp_filter())' > /tmp/filter.bin
 *   : > /tmp/none.bin
 *   sudo /tmp/seccomp_attach 2000 /tmp/none.bin /tmp/filter.bin    # [-x: exec /bin/true]
 *
 * attach: the seccomp() call, in the child; spawn: fork to reaped, in the parent. */
#define _GNU_SOURCE
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_INSNS 4096
#define ROUNDS 8

static double
now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static int
cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int
main(int argc, char **argv)
{
    int doexec = argc > 1 && strcmp(argv[1], "-x") == 0;
    if (argc < 3 + doexec) {
        fprintf(stderr, "usage: %s [-x] N FILTER_FILE...\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1 + doexec]) / ROUNDS, nf = argc - 2 - doexec;
    char **names = argv + 2 + doexec;
    static struct sock_filter prog[16][MAX_INSNS];
    int len[16];
    double *attach[16], *spawn[16];
    if (nf > 16 || n < 1)
        return 2;
    for (int f = 0; f < nf; f++) {
        FILE *fp = fopen(names[f], "rb");
        if (fp == NULL) {
            perror(names[f]);
            return 2;
        }
        len[f] = (int)fread(prog[f], sizeof(struct sock_filter), MAX_INSNS, fp);
        fclose(fp);
        attach[f] = calloc((size_t)n * ROUNDS, sizeof(double));
        spawn[f] = calloc((size_t)n * ROUNDS, sizeof(double));
    }
    int pipefd[2];
    if (pipe(pipefd) < 0)
        return 1;
    for (int r = 0; r < ROUNDS; r++) {
        for (int f = 0; f < nf; f++) {
            for (int i = 0; i < n; i++) {
                double t0 = now_us();
                pid_t pid = fork();
                if (pid == 0) {
                    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                    struct sock_fprog fprog = {.len = (unsigned short)len[f], .filter = prog[f]};
                    double a = now_us();
                    if (len[f] > 0 && syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fprog) < 0)
                        _exit(1);
                    a = now_us() - a;
                    if (write(pipefd[1], &a, sizeof a) != sizeof a)
                        _exit(1);
                    if (doexec) {
                        char *av[] = {"/bin/true", NULL}, *ev[] = {NULL};
                        execve(av[0], av, ev);
                    }
                    _exit(0);
                }
                int status;
                waitpid(pid, &status, 0);
                spawn[f][r * n + i] = now_us() - t0;
                if (status != 0 || read(pipefd[0], &attach[f][r * n + i], sizeof(double)) < 0) {
                    fprintf(stderr, "%s: child failed (status %d)\n", names[f], status);
                    return 1;
                }
            }
        }
    }
    for (int f = 0; f < nf; f++) {
        qsort(attach[f], (size_t)n * ROUNDS, sizeof(double), cmp);
        qsort(spawn[f], (size_t)n * ROUNDS, sizeof(double), cmp);
        printf("%-32s %4d insns  attach %7.2f us  spawn %7.1f us\n", names[f], len[f],
               attach[f][n * ROUNDS / 2], spawn[f][n * ROUNDS / 2]);
    }
    return 0;
}
