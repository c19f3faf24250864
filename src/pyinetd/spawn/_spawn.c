/* pyinetd._spawn: start a service process, doing nothing else in the child.
 *
 * Two ways, both sharing pyinetd's memory until the child execs (no page table copy):
 *
 * spawn(): vfork. The same design as CPython's _posixsubprocess.fork_exec (pyinetd's
 *   fallback when this module is not built), minus what pyinetd does not need per
 *   connection: fork_exec's child asks for the disposition of every one of the ~64 signals
 *   and closes every fd above 2 by hand before it execs, while the parent sleeps (vfork).
 *   Here the caller says which signals have a handler or are ignored (a handful, known once),
 *   so the child only resets those signals, moves the connection onto 0, 1 and 2, drops
 *   every other fd in one close_range (they are all close-on-exec anyway, PEP 446; see
 *   settle() for why now), starts a session of its own (setsid), clears its signal mask and execs. Exec errors come back at once: the parent resumes only after
 *   the child exec'd or exited, and the child leaves its errno in the parent's memory.
 *
 * start(): the same child, without the wait. vfork makes the parent sleep until the child's
 *   exec is well under way (~60 us here), and on two cores that leaves one idle while
 *   connections queue. clone(CLONE_VM) without CLONE_VFORK lets the parent return at once.
 *   What vfork guaranteed must then be kept by hand:
 *   - the child runs on a stack of its own and reads only a slot of memory that holds a
 *     copy of argv, the environment and the fds; the slot is not reused until the kernel
 *     has zeroed the slot's tid word, which it does (CLONE_CHILD_CLEARTID) when the child
 *     leaves the shared memory, at exec or exit;
 *   - the child makes raw system calls only (inline svc/syscall): glibc's wrappers set
 *     errno on failure, and errno is thread-local storage of pyinetd's own thread;
 *   - a failed exec is reported later: the child writes (pid, errno) to a pipe and exits
 *     127; pyinetd reads it when it reaps that pid (Spawner.exec_error());
 *   - a child that has not run its setsid yet is still in pyinetd's process group: pyinetd
 *     signals a child's pid as well as its group (server._kill_group), so that a kill never
 *     misses it;
 *   - a child holds copies of pyinetd's fds until its close_range: after closing listening
 *     sockets (reload, stop), pyinetd calls settle(), which waits on the slots' tid words.
 *   Every signal is blocked from before clone until the child has reset its handlers to
 *   the default, so no handler of pyinetd's ever runs in the child.
 *   Where no slot is free (more than NSLOTS children that have not exec'd yet), start()
 *   falls back to the vfork path for that child.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <linux/filter.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_RESET 128
/* flags for spawn()/start() */
#define SPAWN_NO_NEW_PRIVS 1
/* argv[0] of the list is the path to execute and the program's argv follows it: the program
 * runs from its resolved path (what trust.py checked) and sees argv[0] as written (a venv's
 * python finds its pyvenv.cfg from argv[0]; a multi-call binary picks its applet by it). */
#define SPAWN_PATH_FIRST 2
#ifndef PR_SET_NO_NEW_PRIVS
#define PR_SET_NO_NEW_PRIVS 38 /* <linux/prctl.h>, Linux 3.5 */
#endif
#ifndef PR_SET_DUMPABLE
#define PR_SET_DUMPABLE 4
#endif
#ifndef SYS_close_range
#define SYS_close_range 436 /* the same number on every architecture (Linux 5.9) */
#endif

#if defined(__linux__) && (defined(__x86_64__) || defined(__aarch64__))
#define HAVE_ASYNC 1
#else
#define HAVE_ASYNC 0
#endif

/* ------------------------------------------------------------------ raw system calls */
/* Return the kernel's value: >= 0, or -errno. Never touch errno (see above). */
#if defined(__x86_64__)
static inline long
raw_syscall(long n, long a, long b, long c, long d)
{
    long ret;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return ret;
}
static inline long
raw_syscall5(long n, long a, long b, long c, long d, long e)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return ret;
}
#elif defined(__aarch64__)
static inline long
raw_syscall(long n, long a, long b, long c, long d)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3) : "memory");
    return x0;
}
static inline long
raw_syscall5(long n, long a, long b, long c, long d, long e)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    __asm__ volatile("svc 0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4)
                     : "memory");
    return x0;
}
#else
static inline long
raw_syscall(long n, long a, long b, long c, long d)
{
    long r = syscall(n, a, b, c, d); /* vfork only here: errno may be clobbered safely */
    return r < 0 ? -errno : r;
}
static inline long
raw_syscall5(long n, long a, long b, long c, long d, long e)
{
    long r = syscall(n, a, b, c, d, e);
    return r < 0 ? -errno : r;
}
#endif

/* The kernel's struct sigaction (x86_64 and arm64 alike): handler, flags, restorer, mask. */
struct kernel_sigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    unsigned long mask;
};

/* ------------------------------------------------------------------ sandbox
 * A service's sandbox is prepared once, in the parent (sandbox.py): namespaces held as fds,
 * a Landlock ruleset fd, a compiled seccomp program. The child only applies it, with raw
 * system calls, before its exec: setns (while still root), [the user drop, where a path
 * has one], PR_SET_NO_NEW_PRIVS, landlock_restrict_self, and the seccomp filter last, so
 * the filter never has to allow the setup calls. */
#ifndef SYS_landlock_restrict_self
#define SYS_landlock_restrict_self 446 /* the same number on every architecture (5.13) */
#endif
#ifndef SYS_seccomp
#define SYS_seccomp __NR_seccomp
#endif
#define SB_PR_SET_NO_NEW_PRIVS 38
#define SB_SECCOMP_SET_MODE_FILTER 1
#define SB_CLONE_NEWNS 0x00020000
#define SB_CLONE_NEWNET 0x40000000
#define SB_MAX_FILTER 512 /* instructions; the default filter has about 80 */

struct sandbox {
    int active;     /* 0: no sandbox (nothing below applies) */
    int netns_fd;   /* -1: stay in pyinetd's network namespace */
    int mntns_fd;   /* -1: stay in pyinetd's mount namespace */
    int ruleset_fd; /* -1: no Landlock ruleset */
    unsigned short nfilter;     /* 0: no seccomp filter */
    struct sock_filter *filter; /* the parent's copy (vfork) or the slot's (clone) */
    int cgroup_fd;  /* -1: stay in pyinetd's cgroup; else network: loopback's cgroup folder */
    int procs_fd;   /* its cgroup.procs, open for writing */
    int joined;     /* 1: born in it (clone3 CLONE_INTO_CGROUP), no migration to do */
};

/* In the child, still root: join the prepared namespaces. 0 or -errno. */
static long
sandbox_enter(const struct sandbox *sb)
{
    long r;
    if (!sb->active)
        return 0;
    /* network: loopback: the service's cgroup, whose BPF programs judge every socket made in
     * it. Where the child was not born in it, it moves itself ("0": the writer; cgroup v2). */
    if (sb->procs_fd >= 0 && !sb->joined && (r = raw_syscall(SYS_write, sb->procs_fd, (long)"0", 1, 0)) < 0)
        return r;
    if (sb->netns_fd >= 0 && (r = raw_syscall(SYS_setns, sb->netns_fd, SB_CLONE_NEWNET, 0, 0)) < 0)
        return r;
    /* Allowed here: a clone or vfork child shares no fs_struct (no CLONE_FS), which setns
     * into a mount namespace requires (EINVAL otherwise). */
    if (sb->mntns_fd >= 0 && (r = raw_syscall(SYS_setns, sb->mntns_fd, SB_CLONE_NEWNS, 0, 0)) < 0)
        return r;
    return 0;
}

/* In the child, after any user drop: no_new_privs, Landlock, seccomp. 0 or -errno. */
static long
sandbox_restrict(const struct sandbox *sb)
{
    long r;
    if (!sb->active)
        return 0;
    /* A setuid binary can no longer raise privileges; also what lets an unprivileged
     * process install Landlock and seccomp (EPERM otherwise). */
    if ((r = raw_syscall5(SYS_prctl, SB_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) < 0)
        return r;
    if (sb->ruleset_fd >= 0 && (r = raw_syscall(SYS_landlock_restrict_self, sb->ruleset_fd, 0, 0, 0)) < 0)
        return r;
    if (sb->nfilter > 0) {
        struct sock_fprog prog = {.len = sb->nfilter, .filter = sb->filter};
        if ((r = raw_syscall(SYS_seccomp, SB_SECCOMP_SET_MODE_FILTER, 0, (long)&prog, 0)) < 0)
            return r;
    }
    return 0;
}

/* sandbox=None or (netns_fd, mntns_fd, ruleset_fd, filter bytes[, cgroup_fd, procs_fd]): the
 * filter points into the bytes object, which the caller keeps alive (vfork); start() copies it
 * into the slot. */
static int
parse_sandbox(PyObject *kw, struct sandbox *sb, PyObject **filter_bytes)
{
    memset(sb, 0, sizeof *sb);
    sb->cgroup_fd = sb->procs_fd = -1; /* not fd 0: without a sandbox there is no cgroup */
    *filter_bytes = NULL;
    PyObject *o = kw ? PyDict_GetItemString(kw, "sandbox") : NULL;
    if (kw != NULL && PyDict_GET_SIZE(kw) > (o != NULL)) {
        PyErr_SetString(PyExc_TypeError, "the only keyword argument is sandbox");
        return -1;
    }
    if (o == NULL || o == Py_None)
        return 0;
    PyObject *f;
    if (!PyArg_ParseTuple(o, "iiiS|ii;sandbox must be (netns_fd, mntns_fd, ruleset_fd, filter"
                          "[, cgroup_fd, procs_fd])",
                          &sb->netns_fd, &sb->mntns_fd, &sb->ruleset_fd, &f, &sb->cgroup_fd,
                          &sb->procs_fd))
        return -1;
    if ((sb->cgroup_fd >= 0) != (sb->procs_fd >= 0)) {
        PyErr_SetString(PyExc_ValueError, "sandbox: cgroup_fd and procs_fd go together");
        return -1;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(f);
    if (n % (Py_ssize_t)sizeof(struct sock_filter) != 0 ||
        n / (Py_ssize_t)sizeof(struct sock_filter) > SB_MAX_FILTER) {
        PyErr_SetString(PyExc_ValueError, "sandbox filter: not a whole, small sock_filter array");
        return -1;
    }
    sb->active = 1;
    sb->nfilter = (unsigned short)(n / (Py_ssize_t)sizeof(struct sock_filter));
    sb->filter = (struct sock_filter *)PyBytes_AS_STRING(f);
    *filter_bytes = f;
    return 0;
}

/* The RLIMIT_NOFILE every child starts with (set_nofile()): pyinetd raises its own soft limit
 * to the hard one, and a program must not inherit that (select() breaks above fd 1024). Set
 * once at start, before the first child; only read in the child. */
static struct {
    int set;
    unsigned long long cur, max;
} child_nofile;

/* What the child needs, all in memory nobody changes until the child has exec'd. */
struct child_args {
    char *path; /* what execve runs: argv[0] unless SPAWN_PATH_FIRST */
    char **argv;
    char **envp;
    int fds[3];
    int nreset;
    int reset[MAX_RESET];
    int flags;           /* SPAWN_NO_NEW_PRIVS */
    int report_fd;       /* async: where (pid, errno) goes on failure */
    volatile int *error; /* vfork: where errno goes on failure */
    struct sandbox sb;   /* applied before close_range (it needs its fds) */
};

/* In the child: reset signals, fds 0-2, session, no_new_privs, mask, exec. Never returns. */
static void _Py_NO_RETURN
child_exec(struct child_args *a)
{
    /* Static and zero: handler 0 is SIG_DFL, and no library call (memset) runs here. */
    static const struct kernel_sigaction dfl;
    unsigned long empty = 0;
    long r = 0;

    /* Every signal with a handler or ignored in the parent back to its default. The mask
     * (all blocked since before the clone) keeps any of them from reaching a handler. */
    for (int i = 0; i < a->nreset; i++)
        (void)raw_syscall(SYS_rt_sigaction, a->reset[i], (long)&dfl, 0, sizeof(unsigned long));

    /* The fd limit pyinetd was started with, not the one it raised for itself (prlimit64:
     * setrlimit is not on every architecture). Lowering a soft limit needs no privilege. */
    if (child_nofile.set) {
        unsigned long long lim[2] = {child_nofile.cur, child_nofile.max};
        r = raw_syscall(SYS_prlimit64, 0, RLIMIT_NOFILE, (long)lim, 0);
        if (r < 0)
            goto fail;
    }

    /* A source fd that is itself 0, 1 or 2 (but not its target) would be overwritten by an
     * earlier dup: move such fds above 2 first. */
    int fds[3] = {a->fds[0], a->fds[1], a->fds[2]};
    for (int t = 0; t < 3; t++) {
        if (fds[t] < 3 && fds[t] != t) {
            r = raw_syscall(SYS_fcntl, fds[t], F_DUPFD_CLOEXEC, 3, 0);
            if (r < 0)
                goto fail;
            for (int u = t + 1; u < 3; u++)
                if (fds[u] == fds[t])
                    fds[u] = (int)r;
            fds[t] = (int)r;
        }
    }
    for (int t = 0; t < 3; t++) {
        if (fds[t] == t) /* already there: only clear close-on-exec */
            r = raw_syscall(SYS_fcntl, t, F_SETFD, 0, 0);
        else
            r = raw_syscall(SYS_dup3, fds[t], t, 0, 0);
        if (r < 0)
            goto fail;
    }
    /* The sandbox before close_range, which would close its fds. Nothing after it (close_range,
     * setpgid, rt_sigprocmask, execve) is in the seccomp deny list. */
    if ((r = sandbox_enter(&a->sb)) < 0 || (r = sandbox_restrict(&a->sb)) < 0)
        goto fail;
    /* Every other fd is close-on-exec, but the kernel closes those only late in the exec:
     * drop them now, so that a listening socket pyinetd closes meanwhile (a reload, a stop)
     * is really closed once this child is past its exec (see settle()). Kernels before 5.9
     * say ENOSYS: exec closes them anyway. */
    if (a->report_fd > 2) {
        (void)raw_syscall(SYS_close_range, 3, a->report_fd - 1, 0, 0);
        (void)raw_syscall(SYS_close_range, a->report_fd + 1, ~0U, 0, 0);
    }
    else {
        (void)raw_syscall(SYS_close_range, 3, ~0U, 0, 0);
    }
    /* A session of its own (so also a process group of its own, which it leads): without a
     * session a service shares pyinetd's controlling terminal, opens /dev/tty and types into
     * root's shell with TIOCSTI, or joins pyinetd's process group with setpgid and escapes the
     * timeout's killpg. Ctrl-C on pyinetd's terminal does not reach it, and a
     * timeout signals a service together with what it started. */
    r = raw_syscall(SYS_setsid, 0, 0, 0, 0);
    if (r < 0)
        goto fail;
    /* The service, and all it execs, can never gain privileges through a setuid or
     * file-capability binary (prctl(2) PR_SET_NO_NEW_PRIVS). A sandbox set it already, before
     * Landlock and seccomp (it cannot be unset): a second prctl would only be one more call
     * through the seccomp filter at every spawn. */
    if ((a->flags & SPAWN_NO_NEW_PRIVS) && !a->sb.active) {
        /* All five arguments: prctl says EINVAL unless arguments 3 to 5 are zero. */
        r = raw_syscall5(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        if (r < 0)
            goto fail;
    }
    r = raw_syscall(SYS_rt_sigprocmask, SIG_SETMASK, (long)&empty, 0, sizeof empty);
    if (r < 0)
        goto fail;
    r = raw_syscall(SYS_execve, (long)a->path, (long)a->argv, (long)a->envp, 0);
fail:
    if (a->error != NULL) {
        *a->error = (int)-r;
    }
    else {
        int rec[2] = {(int)raw_syscall(SYS_getpid, 0, 0, 0, 0), (int)-r};
        (void)raw_syscall(SYS_write, a->report_fd, (long)rec, sizeof rec, 0);
    }
    for (;;)
        (void)raw_syscall(SYS_exit_group, 127, 0, 0, 0);
}

/* ------------------------------------------------------------------ arguments */
typedef struct {
    PyObject *argv, *env, *extra;
    int fds[3];
    int flags;
    int nreset;
    int reset[MAX_RESET];
    struct sandbox sb; /* from the sandbox= keyword */
} call_t;

static int
parse_call(PyObject *args, call_t *c, int *extra_fd, const char *fmt)
{
    PyObject *reset_o;
    c->flags = 0;
    if (!PyArg_ParseTuple(args, fmt, &PyList_Type, &c->argv, &PyList_Type, &c->env, &PyList_Type,
                          &c->extra, &c->fds[0], &c->fds[1], &c->fds[2], extra_fd,
                          &PyTuple_Type, &reset_o, &c->flags))
        return -1;
    if (c->flags & ~(SPAWN_NO_NEW_PRIVS | SPAWN_PATH_FIRST)) {
        PyErr_SetString(PyExc_ValueError, "unknown flags");
        return -1;
    }
    if (PyList_GET_SIZE(c->argv) < ((c->flags & SPAWN_PATH_FIRST) ? 2 : 1)) {
        PyErr_SetString(PyExc_ValueError, "argv must not be empty");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(reset_o);
    if (n > MAX_RESET) {
        PyErr_SetString(PyExc_ValueError, "too many signals to reset");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long sig = PyLong_AsLong(PyTuple_GET_ITEM(reset_o, i));
        if (sig == -1 && PyErr_Occurred())
            return -1;
        c->reset[i] = (int)sig;
    }
    c->nreset = (int)n;
    PyObject *lists[3] = {c->argv, c->env, c->extra};
    for (int l = 0; l < 3; l++)
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lists[l]); i++)
            if (!PyBytes_Check(PyList_GET_ITEM(lists[l], i))) {
                PyErr_SetString(PyExc_TypeError, "argv and environment items must be bytes");
                return -1;
            }
    return 0;
}

static void
fill_args(struct child_args *a, const call_t *c)
{
    memcpy(a->fds, c->fds, sizeof a->fds);
    a->flags = c->flags;
    a->nreset = c->nreset;
    memcpy(a->reset, c->reset, sizeof(int) * (size_t)c->nreset);
    a->sb = c->sb;
    a->path = a->argv[0];
    if (c->flags & SPAWN_PATH_FIRST)
        a->argv++;
}

/* ------------------------------------------------------------------ vfork */
static PyObject *
vfork_exec(const call_t *c)
{
    Py_ssize_t nargv = PyList_GET_SIZE(c->argv), nenv = PyList_GET_SIZE(c->env);
    Py_ssize_t nextra = PyList_GET_SIZE(c->extra);
    /* Pointers into the bytes objects, which live through the call; made before vfork:
     * the child must not allocate. */
    char **mem = PyMem_Malloc((size_t)(nargv + 1 + nenv + nextra + 1) * sizeof(char *));
    if (mem == NULL)
        return PyErr_NoMemory();
    struct child_args a;
    volatile int child_error = 0;
    a.argv = mem;
    a.envp = mem + nargv + 1;
    for (Py_ssize_t i = 0; i < nargv; i++)
        a.argv[i] = PyBytes_AS_STRING(PyList_GET_ITEM(c->argv, i));
    a.argv[nargv] = NULL;
    for (Py_ssize_t i = 0; i < nenv; i++)
        a.envp[i] = PyBytes_AS_STRING(PyList_GET_ITEM(c->env, i));
    for (Py_ssize_t i = 0; i < nextra; i++)
        a.envp[nenv + i] = PyBytes_AS_STRING(PyList_GET_ITEM(c->extra, i));
    a.envp[nenv + nextra] = NULL;
    fill_args(&a, c);
    a.report_fd = -1;
    a.error = &child_error;

    /* Every signal blocked across vfork: a Python-level handler run in the child would
     * write to pyinetd's wake-up fd. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = vfork();
    if (pid == 0)
        child_exec(&a);
    int saved = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    PyMem_Free(mem);
    if (pid < 0) {
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (child_error == 0)
        return PyLong_FromLong((long)pid);
    /* The child failed before or in exec and has exited: reap it here. */
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    errno = child_error;
    return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, PyList_GET_ITEM(c->argv, 0));
}

PyDoc_STRVAR(spawn_doc,
"spawn(argv, env, extra_env, stdin, stdout, stderr, unused, reset, flags=0, *,\n"
"      sandbox=None) -> pid\n\n"
"vfork and exec argv[0] (a path) with the given fds on 0, 1 and 2, the environment\n"
"env + extra_env (lists of KEY=value bytes), a new session, an empty signal mask\n"
"and the signals in reset at their default; flags 1: PR_SET_NO_NEW_PRIVS. Raises\n"
"OSError, with the child reaped, if the exec failed. sandbox: (netns_fd, mntns_fd,\n"
"ruleset_fd, seccomp filter bytes[, cgroup_fd, cgroup_procs_fd]), -1 and b'' for none,\n"
"applied in the child before its exec (see sandbox.py); the child moves itself into the\n"
"cgroup (start() has it born there, where clone3 can).");

static PyObject *
spawn(PyObject *module, PyObject *args, PyObject *kw)
{
    call_t c;
    int unused;
    PyObject *filter;
    if (parse_call(args, &c, &unused, "O!O!O!iiiiO!|i:spawn") < 0)
        return NULL;
    if (parse_sandbox(kw, &c.sb, &filter) < 0)
        return NULL;
    return vfork_exec(&c);
}

/* ------------------------------------------------------------------ clone, no wait */
#if HAVE_ASYNC
#define NSLOTS 16
#define STACK_SIZE (64 * 1024)
#define ARENA_SIZE (256 * 1024)

struct slot {
    volatile pid_t busy; /* nonzero from clone until the kernel clears it (exec or exit) */
    char *stack;         /* STACK_SIZE, above a guard page */
    char *arena;         /* copies of argv and the environment, and their pointer arrays */
    struct child_args args;
    struct sock_filter filter[SB_MAX_FILTER]; /* a copy of the sandbox's seccomp filter */
};

static struct slot slots[NSLOTS];
static int next_slot;
static int nslots = NSLOTS; /* set_slots() lowers it, for tests */

static int
child_main(void *arg)
{
    child_exec(arg);
}

/* network: loopback. The child is born in the service's cgroup with clone3(CLONE_INTO_CGROUP)
 * (Linux 5.7): no migration, which costs a child that writes its cgroup.procs itself tens of
 * microseconds (bench/sandbox_micro.py) and takes the cgroup locks every fork waits on.
 * glibc has no clone3() with a child function, so the few instructions it would run are here,
 * as in its clone3.S: the child starts on the slot's stack, calls child_main(args) and exits.
 * x86_64 only: elsewhere (and on kernels without clone3 or CLONE_INTO_CGROUP) the child moves
 * itself (sandbox_enter). */
#if defined(__x86_64__)
#define HAVE_CLONE3_ASM 1
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#define SB_CLONE_INTO_CGROUP 0x200000000ULL
struct clone3_args { /* struct clone_args, CLONE_ARGS_SIZE_VER2 */
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
        set_tid_size, cgroup;
};
static int clone3_works = 1; /* 0 once the kernel said it lacks clone3 or CLONE_INTO_CGROUP */

static long
clone3_child_main(struct clone3_args *ca, struct child_args *arg)
{
    register long r12 __asm__("r12") = (long)child_main; /* kept across syscall */
    register long r13 __asm__("r13") = (long)arg;
    long ret;
    __asm__ volatile("syscall\n\t"
                     "test %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     /* the child, on its new (16-byte aligned, empty) stack */
                     "xor %%ebp, %%ebp\n\t"
                     "mov %%r13, %%rdi\n\t"
                     "call *%%r12\n\t"
                     "mov %%eax, %%edi\n\t"
                     "mov $60, %%eax\n\t" /* exit (child_main never returns) */
                     "syscall\n\t"
                     "hlt\n"
                     "1:"
                     : "=a"(ret)
                     : "0"((long)SYS_clone3), "D"(ca), "S"(sizeof *ca), "r"(r12), "r"(r13)
                     : "rcx", "r11", "memory", "cc");
    return ret;
}
#endif

/* A free slot with its memory mapped, or NULL (all busy, or no memory). */
static struct slot *
free_slot(void)
{
    for (int k = 0; k < nslots; k++) {
        struct slot *s = &slots[(next_slot + k) % nslots];
        if (__atomic_load_n(&s->busy, __ATOMIC_ACQUIRE) != 0)
            continue;
        if (s->stack == NULL) {
            long page = sysconf(_SC_PAGESIZE);
            char *m = mmap(NULL, page + STACK_SIZE + ARENA_SIZE, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED)
                return NULL;
            if (mprotect(m, page, PROT_NONE) < 0) { /* the stack grows down onto this */
                munmap(m, page + STACK_SIZE + ARENA_SIZE);
                return NULL;
            }
            s->stack = m + page;
            s->arena = m + page + STACK_SIZE;
        }
        next_slot = (int)(s - slots + 1) % nslots;
        return s;
    }
    return NULL;
}

/* Copy a list of bytes into the arena as C strings; ptrs gets one pointer per item. */
static int
copy_strings(PyObject *list, char ***ptrs, char **pos, char *end)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
        PyObject *b = PyList_GET_ITEM(list, i);
        Py_ssize_t n = PyBytes_GET_SIZE(b) + 1;
        if (n > end - *pos)
            return -1;
        memcpy(*pos, PyBytes_AS_STRING(b), (size_t)n);
        *(*ptrs)++ = *pos;
        *pos += n;
    }
    return 0;
}

static int
fill_slot(struct slot *s, const call_t *c)
{
    Py_ssize_t nargv = PyList_GET_SIZE(c->argv), nenv = PyList_GET_SIZE(c->env);
    Py_ssize_t nextra = PyList_GET_SIZE(c->extra);
    size_t nptr = (size_t)(nargv + 1 + nenv + nextra + 1);
    if (nptr * sizeof(char *) >= ARENA_SIZE)
        return -1;
    char **p = (char **)s->arena;
    char *pos = s->arena + nptr * sizeof(char *), *end = s->arena + ARENA_SIZE;
    s->args.argv = p;
    if (copy_strings(c->argv, &p, &pos, end) < 0)
        return -1;
    *p++ = NULL;
    s->args.envp = p;
    if (copy_strings(c->env, &p, &pos, end) < 0 || copy_strings(c->extra, &p, &pos, end) < 0)
        return -1;
    *p = NULL;
    fill_args(&s->args, c);
    s->args.error = NULL;
    return 0;
}

/* The filter into the slot: the child may run after start() returned and the service's
 * sandbox was replaced (a reload). The fds stay the parent's: Prepared.close() settles
 * first. */
static int
sandbox_to_slot(struct slot *s)
{
    if (s->args.sb.nfilter == 0)
        return 0;
    memcpy(s->filter, s->args.sb.filter, (size_t)s->args.sb.nfilter * sizeof(struct sock_filter));
    s->args.sb.filter = s->filter;
    return 0;
}

PyDoc_STRVAR(start_doc,
"start(argv, env, extra_env, stdin, stdout, stderr, report_fd, reset, flags=0, *,\n"
"      sandbox=None) -> pid\n\n"
"As spawn(), without waiting for the exec: a failed exec is written to report_fd as two\n"
"native ints (pid, errno) and the child exits 127. Where no slot is free, as spawn().");

static PyObject *
start(PyObject *module, PyObject *args, PyObject *kw)
{
    call_t c;
    int report_fd;
    PyObject *filter;
    if (parse_call(args, &c, &report_fd, "O!O!O!iiiiO!|i:start") < 0)
        return NULL;
    if (parse_sandbox(kw, &c.sb, &filter) < 0)
        return NULL;
    struct slot *s = free_slot();
    if (s == NULL || fill_slot(s, &c) < 0 || sandbox_to_slot(s) < 0)
        return vfork_exec(&c);
    s->args.report_fd = report_fd;

    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    s->busy = -1;
    s->args.sb.joined = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    pid_t pid = -1;
#ifdef HAVE_CLONE3_ASM
    if (s->args.sb.active && s->args.sb.cgroup_fd >= 0 && clone3_works) {
        struct clone3_args ca = {
            .flags = CLONE_VM | CLONE_CHILD_CLEARTID | SB_CLONE_INTO_CGROUP,
            .child_tid = (uint64_t)(uintptr_t)&s->busy,
            .exit_signal = SIGCHLD,
            .stack = (uint64_t)(uintptr_t)s->stack,
            .stack_size = STACK_SIZE,
            .cgroup = (uint64_t)s->args.sb.cgroup_fd,
        };
        s->args.sb.joined = 1;
        long r = clone3_child_main(&ca, &s->args);
        if (r < 0) {
            s->args.sb.joined = 0; /* clone() below: the child moves itself */
            if (r == -ENOSYS || r == -E2BIG || r == -EINVAL)
                clone3_works = 0;
        }
        pid = (pid_t)r;
    }
#endif
    if (pid < 0)
        pid = clone(child_main, s->stack + STACK_SIZE, CLONE_VM | CLONE_CHILD_CLEARTID | SIGCHLD,
                    &s->args, NULL, NULL, (pid_t *)&s->busy);
    if (pid < 0)
        s->busy = 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) /* e.g. a sandbox that refuses CLONE_VM: vfork says what is wrong, if any */
        return vfork_exec(&c);
    /* No setpgid(pid, pid) here, as shells do: it would make the child a group leader, and a
     * group leader's setsid() fails (EPERM). Until its setsid the child is in pyinetd's group
     * with every signal blocked; a kill before then reaches it through its pid, which
     * pyinetd's _kill_group() always signals besides the group. */
    return PyLong_FromLong((long)pid);
}

PyDoc_STRVAR(settle_doc,
"settle(timeout) -> bool\n\n"
"Wait (at most timeout seconds) until every child start()ed has exec'd or exited, and so\n"
"holds no fd of pyinetd's but its own 0, 1 and 2. False if some child was still before its\n"
"exec at the deadline.");

static PyObject *
settle(PyObject *module, PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    struct timespec now, end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += (time_t)timeout;
    end.tv_nsec += (long)((timeout - (double)(time_t)timeout) * 1e9);
    if (end.tv_nsec >= 1000000000L) {
        end.tv_sec++;
        end.tv_nsec -= 1000000000L;
    }
    for (int k = 0; k < NSLOTS; k++) {
        pid_t busy;
        while ((busy = __atomic_load_n(&slots[k].busy, __ATOMIC_ACQUIRE)) != 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            struct timespec left = {end.tv_sec - now.tv_sec, end.tv_nsec - now.tv_nsec};
            if (left.tv_nsec < 0) {
                left.tv_sec--;
                left.tv_nsec += 1000000000L;
            }
            if (left.tv_sec < 0)
                Py_RETURN_FALSE;
            /* The kernel wakes this futex when it clears the word (CLONE_CHILD_CLEARTID);
             * EAGAIN (already cleared) and EINTR just loop. */
            (void)syscall(SYS_futex, &slots[k].busy, FUTEX_WAIT, busy, &left, NULL, 0);
        }
    }
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(set_slots_doc,
"set_slots(n) -> None\n\n"
"Use at most n slots (0 to 16): start() takes the vfork path when none is free. For tests.");

static PyObject *
set_slots(PyObject *module, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || n > NSLOTS) {
        PyErr_Format(PyExc_ValueError, "slots must be 0 to %d", NSLOTS);
        return NULL;
    }
    nslots = (int)n;
    next_slot = 0;
    Py_RETURN_NONE;
}
#endif

PyDoc_STRVAR(prctl_doc,
"prctl(option, arg, arg3=0) -> None\n\n"
"prctl(option, arg, arg3, 0, 0) in this process, for the flags a forked child sets before it\n"
"execs or reads a client's byte: PR_SET_NO_NEW_PRIVS (38), PR_SET_DUMPABLE (4),\n"
"PR_SET_KEEPCAPS (8), PR_CAP_AMBIENT (47) with PR_CAP_AMBIENT_RAISE (2) and a capability.\n"
"Raises OSError.");

static PyObject *
prctl_(PyObject *module, PyObject *args)
{
    int option;
    unsigned long arg, arg3 = 0;
    if (!PyArg_ParseTuple(args, "ik|k:prctl", &option, &arg, &arg3))
        return NULL;
    long r = raw_syscall5(SYS_prctl, option, (long)arg, (long)arg3, 0, 0);
    if (r < 0) {
        errno = (int)-r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(capset_doc,
"capset(effective, permitted, inheritable) -> None\n\n"
"capset(2) of this process's three capability sets, each a 64-bit mask (bit n: capability\n"
"n; _LINUX_CAPABILITY_VERSION_3). A warm service's zygote is started with one capability\n"
"its user's other processes lack, and drops it with this (zygote.py: why). Raises OSError.");

static PyObject *
capset_(PyObject *module, PyObject *args)
{
    unsigned long long eff, perm, inh;
    if (!PyArg_ParseTuple(args, "KKK:capset", &eff, &perm, &inh))
        return NULL;
    struct {
        uint32_t version;
        int pid;
    } header = {0x20080522, 0}; /* _LINUX_CAPABILITY_VERSION_3, this process */
    struct {
        uint32_t effective, permitted, inheritable;
    } data[2] = {
        {(uint32_t)eff, (uint32_t)perm, (uint32_t)inh},
        {(uint32_t)(eff >> 32), (uint32_t)(perm >> 32), (uint32_t)(inh >> 32)},
    };
    long r = raw_syscall5(SYS_capset, (long)&header, (long)data, 0, 0, 0);
    if (r < 0) {
        errno = (int)-r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(set_nofile_doc,
"set_nofile(soft, hard) -> None\n\n"
"The RLIMIT_NOFILE every child started by spawn() or start() gets before its exec (the limit\n"
"pyinetd was started with, before it raised its own). Call once, before the first child.");

static PyObject *
set_nofile(PyObject *module, PyObject *args)
{
    unsigned long long cur, max;
    if (!PyArg_ParseTuple(args, "KK:set_nofile", &cur, &max))
        return NULL;
    child_nofile.cur = cur;
    child_nofile.max = max;
    child_nofile.set = 1;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ warm services: serve */
/* serve()'s fork: os.fork(), except that the child is the caller's sibling: CLONE_PARENT makes
 * it a child of the caller's parent. A warm service's zygote (zygote_main.py) is pyinetd's
 * child and forks each connection's process with it, so that process is pyinetd's own child:
 * reaped by pyinetd's loop, counted by its limits, killed with its group by a timeout, exactly
 * as an exec'd one.
 *
 * What glibc's fork() does and the plain system call does not, done here the same way:
 * - the child's copy of its thread descriptor holds the child's thread id (glibc's fork passes
 *   CLONE_CHILD_SETTID with the address of THREAD_SELF->tid); without it pthread_kill(),
 *   pthread_setschedparam() and the owner field of error-checking mutexes would name the
 *   zygote. The field's offset is glibc's own description of it for debuggers
 *   (_thread_db_pthread_tid, exported since glibc 2.34), checked against gettid() before use;
 * - Python's side: PyOS_BeforeFork, PyOS_AfterFork_Parent and PyOS_AfterFork_Child, as
 *   os.fork() calls them (the import lock, the threading module, os.register_at_fork
 *   callbacks: random's reseeding among them).
 * What it does not do: run pthread_atfork() handlers of C libraries (glibc offers no way in),
 * or register the child's robust-mutex list; the caller is single-threaded, so no lock is
 * held by another thread at the clone.
 * CLONE_PARENT is refused (EINVAL) to a pid namespace's init, and the child's exit signal is
 * the caller's own (the kernel ignores the one given): pyinetd starts zygotes with SIGCHLD. */
#include <dlfcn.h>
#include <sys/socket.h>
#include <pthread.h>
#include <stdint.h>

static pid_t *
thread_tid_field(void)
{
    static int looked;
    static long offset = -1;
    if (!looked) {
        looked = 1;
        const uint32_t *desc = dlsym(RTLD_DEFAULT, "_thread_db_pthread_tid");
        /* {size in bits, count, offset} (glibc nptl_db/structs.def, DB_STRUCT_FIELD) */
        if (desc != NULL && desc[0] == 8 * sizeof(pid_t) && desc[1] == 1 && desc[2] < 4096)
            offset = (long)desc[2];
    }
    if (offset < 0)
        return NULL;
    pid_t *field = (pid_t *)((char *)pthread_self() + offset);
    return *field == (pid_t)syscall(SYS_gettid) ? field : NULL;
}

PyDoc_STRVAR(serve_doc,
"serve(ctl_fd, environ_data, /) -> bool\n\n"
"A warm service's zygote's loop (zygote_main.py). Per message b'R' + the connection's\n"
"variables (KEY=value, NUL between them) with three fds (SCM_RIGHTS) on ctl_fd: fork a child\n"
"of this process's parent (clone(2) CLONE_PARENT), which first sends b'P<n>' on ctl_fd (n: the\n"
"request's number, counting b'R' messages from 1; the reader learns its pid from\n"
"SCM_CREDENTIALS), then puts the fds on 0, 1 and 2, closes them, ctl_fd too, calls setsid(),\n"
"adds the variables to its environment (environ, and environ_data: the dict behind os.environ,\n"
"bytes to bytes, or None) and returns True. The zygote closes the fds and reads on; a request\n"
"it cannot serve is answered b'E<n> <errno>'. Returns False in the zygote at b'Q' or at the\n"
"channel's end. Raises OSError.");

/* In C rather than a Python loop around fork(): after each fork every page of the zygote is
 * shared with the child again, so each page the zygote writes before the next fork is copied
 * (a fault and 4 KiB). A Python loop (recvmsg, the ancillary data, marshal, closing) wrote 62
 * pages per fork; this one writes its stack, the buffer's first page and what PyOS_*Fork touch. */
static char serve_buf[1 << 20];

static void
serve_reply(int ctl, const char *fmt, unsigned long n, int err)
{
    char msg[64];
    int len = snprintf(msg, sizeof msg, fmt, n, err);
    if (len > 0)
        (void)send(ctl, msg, (size_t)len, MSG_NOSIGNAL);
}

/* In the child: the connection's variables (n bytes of "KEY=value\0KEY=value", in serve_buf,
 * which no one else uses in the child) into environ, in one new array whose entries point into
 * the buffer (glibc's setenv() copies 2 mallocs and a search tree per variable; a later one
 * by the script copies this array as any foreign one), and into os.environ's dict. */
static int
child_environ(char *vars, size_t n, PyObject *data)
{
    extern char **environ;
    size_t old = 0, add = 0;
    for (char **e = environ; e != NULL && *e != NULL; e++)
        old++;
    for (size_t i = 0; i < n; i++)
        add += vars[i] == '\0';
    char **env = malloc((old + add + 2) * sizeof *env);
    if (env == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t k = 0;
    for (size_t i = 0; i < old; i++)
        env[k++] = environ[i];
    for (char *v = vars; v < vars + n; v += strlen(v) + 1) {
        char *eq = strchr(v, '=');
        if (eq == NULL || eq == v)
            continue;
        size_t klen = (size_t)(eq - v) + 1; /* with the '=' */
        for (size_t i = 0; i < k; i++) {    /* the same name given again: it replaces */
            if (strncmp(env[i], v, klen) == 0) {
                env[i] = env[--k];
                break;
            }
        }
        env[k++] = v;
        if (data != NULL && data != Py_None) {
            PyObject *key = PyBytes_FromStringAndSize(v, (Py_ssize_t)(klen - 1));
            PyObject *value = PyBytes_FromString(eq + 1);
            int r = (key == NULL || value == NULL) ? -1 : PyDict_SetItem(data, key, value);
            Py_XDECREF(key);
            Py_XDECREF(value);
            if (r < 0)
                return -1;
        }
    }
    env[k] = NULL;
    environ = env;
    return 0;
}

static PyObject *
serve(PyObject *module, PyObject *args)
{
    int ctl;
    PyObject *data;
    if (!PyArg_ParseTuple(args, "iO:serve", &ctl, &data))
        return NULL;
    if (data != Py_None && !PyDict_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "serve: environ_data must be a dict or None");
        return NULL;
    }
    pid_t *ctid = thread_tid_field();
    long flags = CLONE_PARENT | SIGCHLD;
    if (ctid != NULL)
        flags |= CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID;
    unsigned long seq = 0;
    for (;;) {
        union {
            struct cmsghdr align;
            char buf[CMSG_SPACE(4 * sizeof(int))];
        } control;
        struct iovec iov = {serve_buf, sizeof serve_buf - 1}; /* room for a last NUL */
        struct msghdr mh;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = control.buf;
        mh.msg_controllen = sizeof control.buf;
        ssize_t n = recvmsg(ctl, &mh, MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return NULL;
                continue;
            }
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        int fds[4], nfds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < k; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                if (nfds < 4)
                    fds[nfds++] = fd;
                else
                    close(fd);
            }
        }
        if (n == 0 || serve_buf[0] != 'R') {
            for (int i = 0; i < nfds; i++)
                close(fds[i]);
            if (n == 0 || serve_buf[0] == 'Q')
                Py_RETURN_FALSE;
            continue; /* not a request: not numbered, not answered */
        }
        seq++;
        if (nfds != 3 || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
            for (int i = 0; i < nfds; i++)
                close(fds[i]);
            serve_reply(ctl, "E%lu %d", seq, EBADMSG);
            continue;
        }
        if (PySys_Audit("os.fork", NULL) < 0)
            return NULL;
        PyOS_BeforeFork();
        /* No new stack: the child goes on from here on a copy of this one, as after fork(). */
#if defined(__x86_64__)
        long r = raw_syscall5(SYS_clone, flags, 0, 0, (long)ctid, 0);
#elif defined(__aarch64__)
        long r = raw_syscall5(SYS_clone, flags, 0, 0, 0, (long)ctid); /* tls before child_tid */
#else
        long r = raw_syscall5(SYS_clone, flags, 0, 0, 0, (long)ctid);
#endif
        if (r == 0) {
            /* pyinetd waits for this to know the pid: said before any other work */
            serve_reply(ctl, "P%lu", seq, 0);
            PyOS_AfterFork_Child();
            /* The received fds are above 3 (0-2 and ctl are open), so no dup2 lands on one
             * still to be read; dup2 leaves the new fds without O_CLOEXEC. */
            dup2(fds[2], 2);
            dup2(fds[0], 0);
            dup2(fds[1], 1);
            for (int i = 0; i < 3; i++)
                close(fds[i]);
            close(ctl);
            /* The zygote is not dumpable, so that no process of its user can ptrace it, take
             * its fds (pidfd_getfd) or write its memory (/proc/PID/mem), all of which the
             * kernel judges on the target's flag; the child inherited the flag. With the
             * channel closed it holds nothing of the zygote's but a copy of its memory, and is
             * made dumpable again, as an exec'd process is: core dumps, same-user debuggers. */
            (void)raw_syscall5(SYS_prctl, PR_SET_DUMPABLE, 1, 0, 0, 0);
            setsid(); /* a session of its own, as every service process (spawn.py) */
            serve_buf[n] = '\0';
            if (n > 1 && child_environ(serve_buf + 1, (size_t)n - 1, data) < 0)
                return NULL;
            Py_RETURN_TRUE;
        }
        PyOS_AfterFork_Parent();
        for (int i = 0; i < 3; i++)
            close(fds[i]);
        if (r < 0)
            serve_reply(ctl, "E%lu %d", seq, (int)-r);
    }
}

static PyMethodDef methods[] = {
    {"spawn", (PyCFunction)(void (*)(void))spawn, METH_VARARGS | METH_KEYWORDS, spawn_doc},
    {"prctl", prctl_, METH_VARARGS, prctl_doc},
    {"set_nofile", set_nofile, METH_VARARGS, set_nofile_doc},
    {"capset", capset_, METH_VARARGS, capset_doc},
    {"serve", serve, METH_VARARGS, serve_doc},
#if HAVE_ASYNC
    {"start", (PyCFunction)(void (*)(void))start, METH_VARARGS | METH_KEYWORDS, start_doc},
    {"set_slots", set_slots, METH_O, set_slots_doc},
    {"settle", settle, METH_O, settle_doc},
#endif
    {NULL, NULL, 0, NULL},
};

/* Single-phase: the slots are process-wide, one set for the one interpreter pyinetd runs. */
static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pyinetd._spawn",
    .m_doc = "Start service processes with nothing else in the child (see spawn.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__spawn(void)
{
    return PyModule_Create(&module);
}
