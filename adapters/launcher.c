/* The launcher of adapters/launcher.py, in C: the same arguments, the same protocol, the
 * same exit; what it saves is the start of a Python interpreter (≈ 20 ms a step,
 * BENCHMARKS.md, "Resources per step"). Built once per machine by launcher.py; where no C
 * compiler is found, the Python launcher is used.
 *
 * argv: status_fd go_fd procs sandboxed
 * The child joins the groups whose cgroup.procs files are the lines of `procs` at once, so
 * that a launcher started ahead of its step has paid for that (the first move into a
 * cgroup v1 group waits for an RCU grace period: 3-20 ms), then reads its program from
 * `go_fd` until EOF: NUL-terminated fields memory_bytes, cpu_seconds, file_bytes,
 * processes, cwd, then a count and that many of argv, of the environment and of
 * bubblewrap's options (given: passed in a memfd as `--args FD` after argv[0]). Nothing
 * read: it exits quietly (a launcher started ahead and not needed). It sets the rlimits,
 * changes to cwd and execs the program (argv[0] searched on the environment's PATH, unless
 * sandboxed). This process reaps it with wait4 (and, sandboxed, the sandbox's PID 1 it
 * adopts as a subreaper) and writes
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
#include <sys/mman.h>
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
static void exec_searching(char **program, char **env) {
    if (strchr(program[0], '/') != NULL) {
        execve(program[0], program, env);
        return;
    }
    const char *path = NULL;
    for (char **entry = env; *entry != NULL; entry++)
        if (strncmp(*entry, "PATH=", 5) == 0) path = *entry + 5;
    char *dirs = strdup(path != NULL ? path : "/bin:/usr/bin"), full[4096];
    int saved = 0, last = ENOENT;
    for (char *dir = strtok(dirs, ":"); dir != NULL; dir = strtok(NULL, ":")) {
        snprintf(full, sizeof full, "%s/%s", dir, program[0]);
        execve(full, program, env);
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

/* Close every descriptor above `last`: posix_spawn, which starts this process, passes on
 * whatever planrun's process holds without close-on-exec (a C library's socket, a
 * descriptor planrun itself inherited); none of it is the program's. */
static void close_others(int last) {
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned)last + 1, ~0U, 0) == 0) return;
#endif
    long most = sysconf(_SC_OPEN_MAX);
    for (long fd = last + 1; fd < (most > 0 ? most : 65536); fd++) close((int)fd);
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

/* The whole of `fd` until EOF, NUL-terminated fields split into `fields` (at most `most`);
 * how many, or -1 on a read error. */
static int read_fields(int fd, char **fields, int most) {
    size_t size = 0, room = 65536;
    char *data = malloc(room);
    for (;;) {
        if (size + 1 >= room) data = realloc(data, room *= 2);
        if (data == NULL) return -1;
        ssize_t got = read(fd, data + size, room - size - 1);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return -1;
        if (got == 0) break;
        size += (size_t)got;
    }
    int count = 0;
    data[size] = '\0';
    for (size_t at = 0; at < size && count < most; at += strlen(data + at) + 1)
        fields[count++] = data + at;
    return count;
}

/* The child: read the program from `go`, set its limits and exec it. */
static void start_program(int status, int go, int sandboxed) {
    static char *fields[1 << 16];
    int count = read_fields(go, fields, (int)(sizeof fields / sizeof *fields) - 4);
    close(go);
    if (count == 0) _exit(0);  /* started ahead, not needed */
    if (count < 6) fail(status, "exec", EINVAL);
    int at = 5, argc_ = atoi(fields[at]);
    if (argc_ < 1 || at + 1 + argc_ >= count) fail(status, "exec", EINVAL);
    char **program = fields + at + 1;
    at += 1 + argc_;
    int envc = atoi(fields[at]);
    if (envc < 0 || at + 1 + envc >= count) fail(status, "exec", EINVAL);
    char **env = fields + at + 1;
    at += 1 + envc;
    int optc = atoi(fields[at]);
    if (optc < 0 || at + 1 + optc > count) fail(status, "exec", EINVAL);
    char **options = fields + at + 1;
    if (set_limit(RLIMIT_AS, atoll(fields[0]), 0) || set_limit(RLIMIT_CPU, atoll(fields[1]), 1) ||
        set_limit(RLIMIT_FSIZE, atoll(fields[2]), 0) || set_limit(RLIMIT_NPROC, atoll(fields[3]), 0))
        fail(status, "limits", errno);
    if (chdir(fields[4]) != 0) fail(status, "exec", errno);
    /* NULL-terminate argv and env in place: each is followed by a count field we no longer need. */
    program[argc_] = NULL;
    env[envc] = NULL;
    char *with_args[argc_ + 3], fd_text[16];
    if (optc > 0) {  /* bubblewrap's options in an anonymous file: --args FD */
        int fd = memfd_create("bwrap-args", 0);
        if (fd < 0) fail(status, "exec", errno);
        for (int i = 0; i < optc; i++)
            if (write(fd, options[i], strlen(options[i]) + 1) < 0) fail(status, "exec", errno);
        lseek(fd, 0, SEEK_SET);
        snprintf(fd_text, sizeof fd_text, "%d", fd);
        with_args[0] = program[0];
        with_args[1] = "--args";
        with_args[2] = fd_text;
        for (int i = 1; i <= argc_; i++) with_args[i + 2] = program[i];
        program = with_args;
    }
    fcntl(status, F_SETFD, FD_CLOEXEC);
    if (sandboxed) execve(program[0], program, env);
    else exec_searching(program, env);
    fail(status, "exec", errno);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: launcher status_fd go_fd procs sandboxed\n");
        return 127;
    }
    int status = atoi(argv[1]), go = atoi(argv[2]);
    char *procs = argv[3];
    int sandboxed = strcmp(argv[4], "1") == 0;
    if (chdir("/") != 0) fail(status, "limits", errno);  /* hold none of planrun's directories */
    close_others(status > go ? status : go);
    if (sandboxed) prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);  /* bubblewrap's PID 1 is ours */
    pid_t child = fork();
    if (child < 0) fail(status, "limits", errno);
    if (child == 0) {
        join_groups(status, procs);
        start_program(status, go, sandboxed);
    }
    close(go);
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
