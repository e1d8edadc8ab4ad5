/* The launcher of adapters/launcher.py, in C: the same arguments, the same status lines,
 * the same exit; what it saves is the start of a Python interpreter (≈ 20 ms a step,
 * BENCHMARKS.md, "Resources per step"). Built once per machine by launcher.py; where no C
 * compiler is found, the Python launcher is used.
 *
 * argv: status_fd memory_bytes cpu_seconds file_bytes processes procs sandboxed program...
 * The child joins the groups whose cgroup.procs files are the lines of `procs`, sets the
 * rlimits and execs the program; this process reaps it with wait4 (and, sandboxed, the
 * sandbox's PID 1 it adopts as a subreaper) and writes
 * "usage:<cpu s>:<largest resident bytes>:<write_bytes of /proc/self/io, or -1>".
 * A failure before the program runs is "<limits|exec>:<errno>:<message>" and exit 127.
 * When planrun's process dies first (SIGKILL: it could not stop the step), the status pipe
 * loses its reader; this process then kills the program's groups and its own process
 * group, itself included, so that no program outlives its run (a recovered run runs the
 * step again).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void fail(int status, const char *stage, int err) {
    dprintf(status, "%s:%d:%s\n", stage, err, strerror(err));
    _exit(127);
}

/* value as the soft limit, value + extra as the hard one, never above the hard limit now. */
static int set_limit(int which, long long value, long long extra) {
    struct rlimit now, next;
    if (value <= 0) return 0;
    if (getrlimit(which, &now) != 0) return -1;
    rlim_t top = (rlim_t)(value + extra);
    if (now.rlim_max != RLIM_INFINITY && top > now.rlim_max) top = now.rlim_max;
    next.rlim_cur = (rlim_t)value < top ? (rlim_t)value : top;
    next.rlim_max = top;
    return setrlimit(which, &next);
}

static void join_groups(int status, char *procs) {
    char pid[32];
    int length = snprintf(pid, sizeof pid, "%d", (int)getpid());
    for (char *path = strtok(procs, "\n"); path != NULL; path = strtok(NULL, "\n")) {
        int group = open(path, O_WRONLY | O_CLOEXEC);
        if (group < 0 || write(group, pid, (size_t)length) != length) fail(status, "limits", errno);
        close(group);
    }
}

/* execvp as Python's os.execvp: PATH searched, but a file that is not a program is an
 * error (ENOEXEC), not handed to /bin/sh as glibc's execvp does. */
static void exec_searching(char **program) {
    if (strchr(program[0], '/') != NULL) {
        execv(program[0], program);
        return;
    }
    const char *path = getenv("PATH");
    char *dirs = strdup(path != NULL ? path : "/bin:/usr/bin"), full[4096];
    int saved = 0, last = ENOENT;
    for (char *dir = strtok(dirs, ":"); dir != NULL; dir = strtok(NULL, ":")) {
        snprintf(full, sizeof full, "%s/%s", dir, program[0]);
        execv(full, program);
        last = errno;
        if (saved == 0 && last != ENOENT && last != ENOTDIR) saved = last;
    }
    errno = saved != 0 ? saved : last;
}

/* SIGKILL every process listed in a cgroup.procs file; how many there were. */
static int kill_listed(const char *path) {
    FILE *listed = fopen(path, "r");
    int pid, count = 0;
    if (listed == NULL) return 0;
    while (fscanf(listed, "%d", &pid) == 1) {
        kill(pid, SIGKILL);
        count++;
    }
    fclose(listed);
    return count;
}

/* planrun is gone: kill everything the step started. Its control groups first (a program
 * may have left the process group; cgroup v1 has no cgroup.kill, so until they are empty,
 * or for 1 s), then the process group, this process with it; bubblewrap dies with its
 * parent (--die-with-parent). */
static void orphaned(const char *procs) {
    char paths[8192];
    struct timespec pause = {0, 10000000};
    for (int round = 0; round < 100; round++) {
        int left = 0;
        snprintf(paths, sizeof paths, "%s", procs);
        for (char *path = strtok(paths, "\n"); path != NULL; path = strtok(NULL, "\n"))
            left += kill_listed(path);
        if (left == 0) break;
        nanosleep(&pause, NULL);
    }
    kill(0, SIGKILL);
    _exit(137);
}

/* Wait until the child has exited (it is left to be reaped), or until the status pipe's
 * reader is gone (poll reports an error on our write end): then `orphaned`. Without pidfds
 * (Linux < 5.3) only the child is waited for. */
static void wait_watching(pid_t child, int status, const char *procs) {
    int pidfd = (int)syscall(SYS_pidfd_open, child, 0);
    if (pidfd < 0) return;
    struct pollfd watched[2] = {{pidfd, POLLIN, 0}, {status, 0, 0}};
    for (;;) {
        if (poll(watched, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (watched[1].revents & (POLLERR | POLLHUP)) orphaned(procs);
        if (watched[0].revents) break;
    }
    close(pidfd);
}

static double seconds(struct timeval t) { return (double)t.tv_sec + t.tv_usec / 1e6; }

static double monotonic(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + now.tv_nsec / 1e9;
}

static long long written_bytes(void) {
    char line[256];
    long long value = -1;
    FILE *io = fopen("/proc/self/io", "r");
    if (io == NULL) return -1;
    while (fgets(line, sizeof line, io) != NULL)
        if (sscanf(line, "write_bytes: %lld", &value) == 1) break;
    fclose(io);
    return value;
}

int main(int argc, char **argv) {
    if (argc < 9) {
        fprintf(stderr, "usage: launcher status memory cpu fsize nproc procs sandboxed program...\n");
        return 127;
    }
    int status = atoi(argv[1]);
    long long memory = atoll(argv[2]), cpu = atoll(argv[3]), fsize = atoll(argv[4]);
    long long nproc = atoll(argv[5]);
    char *procs = argv[6];
    int sandboxed = strcmp(argv[7], "1") == 0;
    char **program = argv + 8;
    if (sandboxed) prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);  /* bubblewrap's PID 1 is ours */
    pid_t child = fork();
    if (child < 0) fail(status, "limits", errno);
    if (child == 0) {
        join_groups(status, procs);
        if (set_limit(RLIMIT_AS, memory, 0) || set_limit(RLIMIT_CPU, cpu, 1) ||
            set_limit(RLIMIT_FSIZE, fsize, 0) || set_limit(RLIMIT_NPROC, nproc, 0))
            fail(status, "limits", errno);
        fcntl(status, F_SETFD, FD_CLOEXEC);
        if (sandboxed) {
            char *empty[] = {NULL};
            execve(program[0], program, empty);
        } else {
            exec_searching(program);
        }
        fail(status, "exec", errno);
    }
    signal(SIGTERM, SIG_IGN);  /* a stop signals the whole group: outlive it, to report */
    signal(SIGINT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    wait_watching(child, status, procs);
    int code = 0;
    struct rusage used;
    while (wait4(child, &code, 0, &used) < 0 && errno == EINTR) {}
    double cpu_s = seconds(used.ru_utime) + seconds(used.ru_stime);
    long maxrss = used.ru_maxrss;
    double deadline = monotonic() + 0.5;
    while (sandboxed) {
        int other;
        struct rusage more;
        pid_t pid = wait4(-1, &other, WNOHANG, &more);
        if (pid < 0) break;  /* ECHILD: nothing left */
        if (pid == 0) {
            if (monotonic() >= deadline) break;
            struct timespec pause = {0, 2000000};
            nanosleep(&pause, NULL);
            continue;
        }
        cpu_s += seconds(more.ru_utime) + seconds(more.ru_stime);
        if (more.ru_maxrss > maxrss) maxrss = more.ru_maxrss;
    }
    dprintf(status, "usage:%.6f:%lld:%lld\n", cpu_s, (long long)maxrss * 1024, written_bytes());
    if (WIFSIGNALED(code)) {  /* end as the program ended: the same signal */
        struct rlimit none = {0, 0};
        setrlimit(RLIMIT_CORE, &none);
        signal(WTERMSIG(code), SIG_DFL);
        kill(getpid(), WTERMSIG(code));
        return 1;
    }
    return WIFEXITED(code) ? WEXITSTATUS(code) : 1;
}
