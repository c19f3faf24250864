/* Reference for bench/run.sh: the floor of any vfork-per-connection super-server (not pyinetd).
 *
 * usage: ref_vfork PORT [LOOPS [EXTRA_FDS]]
 *
 * LOOPS processes (default 1) share one listening socket on 127.0.0.1:PORT; each blocks in
 * accept4, vforks, and the child puts the client on 0 and 1 and execs /bin/cat with
 * REMOTE_ADDR and REMOTE_PORT set; the parent closes the client and goes back to accept. A
 * SIGCHLD handler reaps with waitpid(-1, WNOHANG) until nothing is left. No limits, no logging,
 * no config, no error handling beyond staying alive: the parent costs almost nothing per
 * connection and the child starts the cheapest way Linux has. What this row reaches is the
 * most a super-server of this design can reach on this machine; pyinetd's exec rows are read
 * against it. EXTRA_FDS opens that many idle sockets first (as a super-server with that many
 * services holds listening sockets): each one is copied into and closed in every child.
 * Benchmark reference only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static void reap(int sig) {
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

static void serve(int srv) {
    char *argv[] = {"/bin/cat", NULL};
    size_t n = 0;
    while (environ[n]) n++;
    char **env = calloc(n + 3, sizeof(char *));
    if (!env) _exit(1);
    memcpy(env, environ, n * sizeof(char *));
    char addr_var[64], port_var[32];
    env[n] = addr_var;
    env[n + 1] = port_var;
    for (;;) {
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        int fd = accept4(srv, (struct sockaddr *)&peer, &len, SOCK_CLOEXEC);
        if (fd < 0) continue; /* EINTR from SIGCHLD, or a transient error: keep serving */
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
        snprintf(addr_var, sizeof addr_var, "REMOTE_ADDR=%s", ip);
        snprintf(port_var, sizeof port_var, "REMOTE_PORT=%u", ntohs(peer.sin_port));
        pid_t pid = vfork();
        if (pid == 0) {
            if (dup2(fd, 0) < 0 || dup2(fd, 1) < 0) _exit(126);
            execve(argv[0], argv, env);
            _exit(127);
        }
        close(fd);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: ref_vfork PORT [LOOPS [EXTRA_FDS]]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    int loops = argc > 2 ? atoi(argv[2]) : 1;
    int extra = argc > 3 ? atoi(argv[3]) : 0;
    for (int i = 0; i < extra; i++)
        if (socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0) < 0) return perror("socket"), 1;
    struct sigaction sa = {.sa_handler = reap, .sa_flags = SA_RESTART | SA_NOCLDSTOP};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGCHLD, &sa, NULL);
    int srv = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(srv, (struct sockaddr *)&a, sizeof a) < 0) return perror("bind"), 1;
    if (listen(srv, 128) < 0) return perror("listen"), 1;
    pid_t first = getpid();
    for (int i = 1; i < loops; i++) {
        if (fork() == 0) {
            /* The other loops go when the first (the process the bench kit stops) goes. */
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            if (getppid() != first) _exit(0);
            break;
        }
    }
    serve(srv);
}
