/*
 * _reaper.c - the parts of pyshim that Python cannot do (or cannot do
 * without allocating on a hot path): child-subreaper, the waitpid reap
 * loop, SIGCHLD delivery on a pipe the event loop can watch, SCM_RIGHTS fd
 * passing, unix sockets with path or abstract names, SO_PEERCRED, mount(2)
 * malloc_trim, madvise, giving back all-zero pages, and for the warm
 * template: a bare fork, its request loop and the write that makes one of
 * its objects immortal.
 *
 * Every function is flat: it returns a value >= 0 or -errno, and never
 * allocates (but reaper_malloc_keep, whose job that is). Buffers are owned by
 * the caller.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdint.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

/* --- subreaper ---------------------------------------------------------- */

int reaper_set_subreaper(void)
{
	if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
		return -errno;
	return 0;
}

/* --- SIGCHLD on a pipe -------------------------------------------------- */

static int sigchld_wfd = -1;
static unsigned long caught;	/* bit n: signal n (other than SIGCHLD) arrived */

static void on_sigchld(int sig)
{
	int saved = errno;
	char b = (char)sig;

	if (sig != SIGCHLD && sig > 0 && sig < 64)
		__atomic_fetch_or(&caught, 1UL << sig, __ATOMIC_SEQ_CST);
	/* A full pipe already holds a wake-up: dropping this byte loses nothing. */
	(void)!write(sigchld_wfd, &b, 1);
	errno = saved;
}

/*
 * Installs a SIGCHLD handler that writes one byte to a non-blocking pipe and
 * returns the pipe's read end. A handler (rather than a blocked signal read
 * from a signalfd) leaves the signal mask of every spawned runc untouched,
 * and exec resets the handler in children.
 */
int reaper_sigchld_fd(void)
{
	int fds[2];
	struct sigaction sa;

	if (sigchld_wfd >= 0)
		return -EBUSY;
	if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) < 0)
		return -errno;
	sigchld_wfd = fds[1];
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigchld;
	sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGCHLD, &sa, NULL) < 0) {
		int err = errno;
		close(fds[0]);
		close(fds[1]);
		sigchld_wfd = -1;
		return -err;
	}
	return fds[0];
}

/*
 * Sends signal `sig` down the same pipe as SIGCHLD (after reaper_sigchld_fd):
 * the loop learns of it from one watched fd, and no other signal machinery
 * (uvloop's add_signal_handler runs a good deal of Python for each) is set
 * up in the shim. reaper_caught_signals tells which signals came.
 */
int reaper_catch_signal(int sig)
{
	struct sigaction sa;

	if (sigchld_wfd < 0)
		return -EBADF;
	if (sig <= 0 || sig >= 64 || sig == SIGCHLD)
		return -EINVAL;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigchld;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if (sigaction(sig, &sa, NULL) < 0)
		return -errno;
	return 0;
}

/* The caught signals (bit n for signal n) since the last call, and clears them. */
long reaper_caught_signals(void)
{
	return (long)__atomic_exchange_n(&caught, 0UL, __ATOMIC_SEQ_CST);
}

/* --- reaping ------------------------------------------------------------ */

/*
 * Reaps exited children with waitpid(-1, WNOHANG) until none is left or
 * `max` were collected. Fills pids[i] and codes[i] (exit code, or 128+signo
 * for a signal death) and returns the count; a caller that gets `max` back
 * calls again. ECHILD ends the loop as 0 does.
 */
int reaper_reap(int *pids, int *codes, int max)
{
	int n = 0;

	while (n < max) {
		int status = 0;
		pid_t pid = waitpid(-1, &status, WNOHANG);

		if (pid < 0) {
			if (errno == EINTR)
				continue;
			if (errno == ECHILD)
				break;
			return n ? n : -errno;
		}
		if (pid == 0)
			break;
		if (WIFEXITED(status))
			codes[n] = WEXITSTATUS(status);
		else if (WIFSIGNALED(status))
			codes[n] = 128 + WTERMSIG(status);
		else
			continue; /* stopped or continued: not an exit */
		pids[n++] = pid;
	}
	return n;
}

/* --- unix sockets ------------------------------------------------------- */

/*
 * Fills a sockaddr_un from `name` (len bytes, no NUL needed). A leading '@'
 * selects the abstract namespace. Returns the address length or -errno.
 */
static int fill_addr(struct sockaddr_un *sa, const char *name, size_t len)
{
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	if (len == 0)
		return -EINVAL;
	if (name[0] == '@') {
		if (len > sizeof(sa->sun_path))
			return -ENAMETOOLONG;
		memcpy(sa->sun_path + 1, name + 1, len - 1);
		return (int)(offsetof(struct sockaddr_un, sun_path) + len);
	}
	if (len >= sizeof(sa->sun_path))
		return -ENAMETOOLONG;
	if (memchr(name, 0, len))
		return -EINVAL;
	memcpy(sa->sun_path, name, len);
	return (int)(offsetof(struct sockaddr_un, sun_path) + len + 1);
}

/* Binds and listens on a new close-on-exec socket; returns its fd. */
int reaper_unix_listen(const char *name, size_t len, int backlog)
{
	struct sockaddr_un sa;
	int alen = fill_addr(&sa, name, len);
	int fd, err;

	if (alen < 0)
		return alen;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, (socklen_t)alen) < 0 ||
	    listen(fd, backlog) < 0) {
		err = errno;
		close(fd);
		return -err;
	}
	return fd;
}

/*
 * Connects a new close-on-exec socket; returns its fd. With `nonblock` the
 * socket is non-blocking and a connect still in progress is not an error.
 */
int reaper_unix_connect(const char *name, size_t len, int nonblock)
{
	struct sockaddr_un sa;
	int alen = fill_addr(&sa, name, len);
	int fd, err;

	if (alen < 0)
		return alen;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
	if (fd < 0)
		return -errno;
	while (connect(fd, (struct sockaddr *)&sa, (socklen_t)alen) < 0) {
		if (errno == EINTR)
			continue;
		if (errno == EINPROGRESS)
			break;
		err = errno;
		close(fd);
		return -err;
	}
	return fd;
}

/* Writes the peer's pid, uid and gid to out[0..2]. */
int reaper_peer_cred(int fd, int *out)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
		return -errno;
	out[0] = (int)cred.pid;
	out[1] = (int)cred.uid;
	out[2] = (int)cred.gid;
	return 0;
}

/* --- SCM_RIGHTS --------------------------------------------------------- */

int reaper_send_fd_flags(int sock, int fd, const char *data, size_t len, int flags);

/* Sends `len` bytes of `data` (one zero byte when len is 0) with `fd` attached. */
int reaper_send_fd(int sock, int fd, const char *data, size_t len)
{
	return reaper_send_fd_flags(sock, fd, data, len, 0);
}

/* reaper_send_fd with more sendmsg flags (MSG_DONTWAIT). */
int reaper_send_fd_flags(int sock, int fd, const char *data, size_t len, int flags)
{
	char zero = 0;
	struct iovec iov;
	struct msghdr msg;
	union {
		struct cmsghdr hdr;
		char buf[CMSG_SPACE(sizeof(int))];
	} ctl;
	struct cmsghdr *cmsg;
	ssize_t n;

	iov.iov_base = len ? (void *)data : (void *)&zero;
	iov.iov_len = len ? len : 1;
	memset(&msg, 0, sizeof(msg));
	memset(&ctl, 0, sizeof(ctl));
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = ctl.buf;
	msg.msg_controllen = sizeof(ctl.buf);
	cmsg = CMSG_FIRSTHDR(&msg);
	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
	do {
		n = sendmsg(sock, &msg, MSG_NOSIGNAL | flags);
	} while (n < 0 && errno == EINTR);
	return n < 0 ? -errno : (int)n;
}

/*
 * Receives up to `len` bytes into `data` and at most one fd (made
 * close-on-exec) into *fd, which is -1 when none came; extra fds are closed.
 * Returns the byte count; 0 means the peer closed.
 */
int reaper_recv_fd(int sock, char *data, size_t len, int *fd)
{
	struct iovec iov;
	struct msghdr msg;
	union {
		struct cmsghdr hdr;
		char buf[CMSG_SPACE(sizeof(int) * 4)];
	} ctl;
	struct cmsghdr *cmsg;
	ssize_t n;

	*fd = -1;
	iov.iov_base = data;
	iov.iov_len = len;
	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = ctl.buf;
	msg.msg_controllen = sizeof(ctl.buf);
	do {
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	for (cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
		size_t i, count;
		int got;

		if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS)
			continue;
		count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (i = 0; i < count; i++) {
			memcpy(&got, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
			if (*fd < 0)
				*fd = got;
			else
				close(got);
		}
	}
	/* A datagram or packet longer than `len` lost its tail: refused whole. */
	if (msg.msg_flags & MSG_TRUNC) {
		if (*fd >= 0)
			close(*fd);
		*fd = -1;
		return -EMSGSIZE;
	}
	return (int)n;
}

/* --- mounts ------------------------------------------------------------- */

int reaper_mount(const char *source, const char *target, const char *fstype,
		 unsigned long flags, const char *data)
{
	if (mount(source, target, fstype, flags, data) < 0)
		return -errno;
	return 0;
}

int reaper_umount(const char *target, int flags)
{
	if (umount2(target, flags) < 0)
		return -errno;
	return 0;
}

/* --- memory ------------------------------------------------------------- */

int reaper_malloc_trim(size_t pad)
{
	return malloc_trim(pad);
}

/*
 * malloc_info(3)'s XML written to `fd` (through a FILE of its own on a dup);
 * returns its length or -errno. The FILE's buffer is static: made and freed
 * here at each call, it would be a free chunk again right after
 * fill_malloc_holes took them all (the FILE itself is one small chunk).
 */
static char malloc_info_buf[8192];

long reaper_malloc_info(int fd)
{
	int copy = dup(fd);
	FILE *f;
	long len;

	if (copy < 0)
		return -errno;
	f = fdopen(copy, "w");
	if (!f) {
		close(copy);
		return -errno;
	}
	setvbuf(f, malloc_info_buf, _IOFBF, sizeof(malloc_info_buf));
	if (malloc_info(0, f) < 0 || fflush(f) != 0) {
		fclose(f);
		return -EIO;
	}
	len = ftell(f);
	if (fclose(f) < 0 || len < 0)
		return -errno;
	return len;
}

/*
 * The one function here that allocates, on purpose: `count` blocks of `size`
 * bytes from malloc that are never freed, so that free chunks of the warm
 * template's heap hold something and a forked shim's malloc does not carve
 * its blocks out of pages it shares. Returns how many it got.
 */
long reaper_malloc_keep(size_t size, long count)
{
	long i;

	for (i = 0; i < count; i++)
		if (!malloc(size))
			break;
	return i;
}

/*
 * The same, until malloc hands out `chunk`-sized chunks one right after the
 * other (four in a row: carved from fresh memory, not holes), or `max`
 * blocks: drains the tcache and bins of one size whatever their capacity.
 */
long reaper_malloc_keep_until_packed(size_t size, size_t chunk, long max)
{
	char *prev = NULL, *p;
	long i, run = 0;

	for (i = 0; i < max; i++) {
		p = malloc(size);
		if (!p)
			break;
		run = prev && (size_t)(p - prev) == chunk ? run + 1 : 0;
		prev = p;
		if (run >= 3)
			return i + 1;
	}
	return i;
}

/* madvise(2) on [start, start + len): MADV_MERGEABLE & co. for KSM. */
int reaper_madvise(uintptr_t start, size_t len, int advice)
{
	if (madvise((void *)start, len, advice) < 0)
		return -errno;
	return 0;
}

/*
 * Gives back the all-zero pages of [start, start + len), an anonymous private
 * mapping of this process, that are present and mapped by this process alone
 * (read from /proc/self/pagemap on `pagemap_fd`): madvise(MADV_DONTNEED) on
 * each run of them. The memory then reads as zeros, as it did, and costs no
 * page until it is written again. Returns the number of pages given back, or
 * -errno.
 *
 * Only for a single-threaded caller: a write from another thread between the
 * check and the madvise would be lost. Never for a file mapping, whose pages
 * would read back as the file's content.
 */
#define PAGEMAP_PRESENT (1ULL << 63)
#define PAGEMAP_EXCLUSIVE (1ULL << 56)
#define PAGEMAP_BATCH 512

/* Eight words (a cache line) at a time, stopping at the first that is not
 * zero: most present pages hold data in their first bytes. */
static int page_is_zero(const uint64_t *p, size_t words)
{
	size_t i, j;

	for (i = 0; i < words; i += 8) {
		uint64_t acc = 0;

		for (j = i; j < i + 8 && j < words; j++)
			acc |= p[j];
		if (acc)
			return 0;
	}
	return 1;
}

long reaper_release_zero_pages(int pagemap_fd, uintptr_t start, size_t len)
{
	uint64_t entries[PAGEMAP_BATCH];
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t pages = len / page, i = 0, j, got;
	uintptr_t run = 0;	/* start of the current run of zero pages, 0: none */
	long released = 0;
	ssize_t n;

	while (i < pages) {
		size_t want = pages - i < PAGEMAP_BATCH ? pages - i : PAGEMAP_BATCH;

		n = pread(pagemap_fd, entries, want * sizeof(entries[0]),
			  (off_t)((start / page + i) * sizeof(entries[0])));
		if (n < 0)
			return -errno;
		got = (size_t)n / sizeof(entries[0]);
		if (got == 0)
			return -EIO;
		for (j = 0; j < got; j++) {
			uintptr_t addr = start + (i + j) * page;
			int zero = (entries[j] & (PAGEMAP_PRESENT | PAGEMAP_EXCLUSIVE))
					== (PAGEMAP_PRESENT | PAGEMAP_EXCLUSIVE)
				&& page_is_zero((const uint64_t *)addr, page / sizeof(uint64_t));

			if (zero && !run)
				run = addr;
			if (!zero && run) {
				if (madvise((void *)run, addr - run, MADV_DONTNEED) < 0)
					return -errno;
				released += (long)((addr - run) / page);
				run = 0;
			}
		}
		i += got;
	}
	if (run) {
		uintptr_t end = start + pages * page;

		if (madvise((void *)run, end - run, MADV_DONTNEED) < 0)
			return -errno;
		released += (long)((end - run) / page);
	}
	return released;
}

/* --- immortal objects ---------------------------------------------------- */

/*
 * The head of a CPython object on a 64-bit little-endian default build, as
 * 3.12 to 3.14 lay it out: the low half of ob_refcnt is the 32-bit count the
 * interpreter tests for immortality (its sign bit); 3.14 keeps 16 bits of
 * ob_flags at the top of the word. Only ever handed an object's address by
 * the template, after it checked the interpreter's version and build.
 */
struct object_head {
	uint32_t refcnt;
	uint16_t overflow;
	uint16_t flags;
};

/*
 * Makes the object at `addr` immortal: its count becomes `refcnt` (already
 * immortal ones keep theirs) and `flags` are or-ed into ob_flags. Returns 1
 * if it already was immortal, else 0. Once immortal, Py_INCREF and Py_DECREF
 * never write to it again, so a forked child keeps sharing its page.
 */
int reaper_immortalize(uintptr_t addr, uint32_t refcnt, uint16_t flags)
{
	struct object_head *h = (struct object_head *)addr;

	if ((int32_t)h->refcnt < 0)
		return 1;
	h->refcnt = refcnt;
	h->flags |= flags;
	return 0;
}

/* --- fork --------------------------------------------------------------- */

/*
 * fork(2) alone. os.fork() also runs, in the child, every callback Python
 * code registered with os.register_at_fork (threading, logging, random,
 * concurrent.futures): code that runs nowhere else and writes to objects
 * spread over ~0.3 MB of pages the child shares with its parent. Only for a
 * single-threaded caller that holds no lock and has the signals whose
 * Python handlers must not run in the child blocked: the warm template.
 * (cffi releases the GIL around this call, so the child takes it afresh.)
 */
int reaper_fork(void)
{
	pid_t pid = fork();

	return pid < 0 ? -errno : pid;
}

/* --- the warm template's request loop ------------------------------------ */

/*
 * The template answers its requests here, in C, because every page it writes
 * after forking a shim stops being shared with that shim: Python code would
 * write refcounts and allocator state all over the heap at every request
 * (~150 pages on 3.11), and each shim would end up with its own copy of all
 * of them. This loop writes its stack, the request buffer and a few counters.
 *
 * A request (see pyshim._pack_request) is a big-endian header, the byte
 * counts of its fields and of its data, then both; its first field is its
 * kind. Every request of a user other than the template's is refused; a
 * well-formed "start" or "fork" (the latter with an fd attached) is forked
 * off, the child returning to Python to do the work and answer.
 */

#define TEMPLATE_REQUEST_MAX (4u << 20)
#define TEMPLATE_IO_SECONDS 5
/* The biggest request handed to the start helper or the spare (their receive buffers). */
const long reaper_handover_message_max = 1L << 18;

static char template_buf[TEMPLATE_REQUEST_MAX + 8]; /* untouched pages cost nothing */
static long template_children;	/* forked and not yet reaped */
static long long template_last_fork_ms;

static long long monotonic_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void template_say(int conn, const char *text)
{
	ssize_t n;

	do {
		n = send(conn, text, strlen(text), MSG_NOSIGNAL);
	} while (n < 0 && errno == EINTR);
}

static pid_t template_helper = -1;	/* the start helper (not counted in children) */
static pid_t template_spare = -1;	/* the spare shim (counted once it is handed a fork) */
static int template_spare_fd = -1;	/* our end of the spare's socketpair */
static long long template_spare_retry_ms; /* no spare is made before then (a fork failed) */
static int template_spare_idle = 1;	/* spares wait at SCHED_IDLE (until a raise fails) */
static long template_forks;		/* fork requests answered since the launch */

static void template_drop_spare(void)
{
	if (template_spare_fd >= 0)
		close(template_spare_fd);
	template_spare_fd = -1;
	template_spare = -1;
}

static void template_reap(void)
{
	for (;;) {
		pid_t pid = waitpid(-1, NULL, WNOHANG);

		if (pid > 0 && pid == template_helper)
			template_helper = -1;
		else if (pid > 0 && pid == template_spare)
			template_drop_spare(); /* it died waiting */
		else if (pid > 0 && template_children > 0)
			template_children--;
		else if (pid > 0)
			continue;
		else if (pid == 0)
			break;
		else if (errno == ECHILD) {
			template_children = 0;
			break;
		} else if (errno != EINTR) {
			break;
		}
	}
}

/* Nonzero when the file at `path` is no longer the one `stamp` describes
 * (inode, size, mtime and ctime in ns): pyshim.py was rewritten. */
static int template_stale(const char *path, const long long *stamp)
{
	struct stat st;

	if (stat(path, &st) < 0)
		return 1;
	return (long long)st.st_ino != stamp[0] || (long long)st.st_size != stamp[1] ||
	       (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec != stamp[2] ||
	       (long long)st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec != stamp[3];
}

/* Reads one request from `conn` into template_buf; its length, or -1 after
 * answering the error (or when the peer is gone). */
static long template_read(int conn, int *fd)
{
	uint32_t flen, dlen;
	size_t want, have;
	ssize_t n;

	n = reaper_recv_fd(conn, template_buf, 65536, fd);
	if (n <= 0)
		return -1;
	have = (size_t)n;
	if (have < 8) {
		template_say(conn, "error malformed request\n");
		return -1;
	}
	memcpy(&flen, template_buf, 4);
	memcpy(&dlen, template_buf + 4, 4);
	flen = ntohl(flen), dlen = ntohl(dlen);
	want = 8 + (size_t)flen + dlen;
	if ((size_t)flen + dlen > TEMPLATE_REQUEST_MAX) {
		template_say(conn, "error request too large\n");
		return -1;
	}
	while (have < want) {
		n = recv(conn, template_buf + have, want - have, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break; /* cut short: the child's parse says so */
		have += (size_t)n;
	}
	return (long)(have < want ? have : want);
}

/*
 * Whether the fork request in template_buf (`len` bytes as template_read
 * returned them) is whole and well formed: its fields are kind, cwd, argc,
 * argc arguments (at least one) and KEY=VALUE entries, NUL-separated. The
 * template answers "ok PID" itself once it has forked, so the child must
 * never be the first to find the request unusable.
 */
static int template_fork_request_ok(long len)
{
	uint32_t flen, dlen;
	const char *p, *end;
	long field = 0, argc = -1;

	memcpy(&flen, template_buf, 4);
	memcpy(&dlen, template_buf + 4, 4);
	flen = ntohl(flen), dlen = ntohl(dlen);
	if (len != 8 + (long)flen + (long)dlen)
		return 0;
	p = template_buf + 8;
	end = p + flen;
	while (p <= end) {
		const char *nul = memchr(p, '\0', (size_t)(end - p));
		size_t n = nul ? (size_t)(nul - p) : (size_t)(end - p);

		if (field == 2) {
			argc = 0;
			if (n == 0 || n > 6)
				return 0;
			for (size_t i = 0; i < n; i++) {
				if (p[i] < '0' || p[i] > '9')
					return 0;
				argc = argc * 10 + (p[i] - '0');
			}
			if (argc == 0)
				return 0;
		} else if (field > 2 + argc && argc > 0) {
			const char *eq = memchr(p, '=', n);

			if (!eq || eq == p)
				return 0; /* an environment entry without KEY= */
		}
		field++;
		p += n + 1;
	}
	return argc > 0 && field >= 3 + argc;
}

/*
 * Sends the request in template_buf (`len` bytes) with `fd` over `sock`, our
 * SOCK_SEQPACKET end to the start helper or the spare shim, without waiting:
 * 0 when sent; -1 when it is over their receive buffer or was not sent, with
 * *gone = 1 when their end is closed.
 */
static int template_pass(int sock, int fd, long len, int *gone)
{
	*gone = 0;
	if (len > reaper_handover_message_max)
		return -1;
	if (reaper_send_fd_flags(sock, fd, template_buf, (size_t)len, MSG_DONTWAIT) >= 0)
		return 0;
	*gone = errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN;
	return -1;
}

/*
 * Hands the start request in template_buf (`len` bytes) and its connection
 * to the start helper on `helper` (a SOCK_SEQPACKET socketpair end), without
 * waiting: 0 when it took them, else -1 (helper gone, busy or the request too
 * big for one message) and the caller forks for the request instead.
 */
static int template_hand_over(int *helper, int conn, long len)
{
	int gone;

	if (*helper < 0 || template_helper < 0)
		return -1;
	if (template_pass(*helper, conn, len, &gone) == 0)
		return 0;
	if (gone) {
		close(*helper);
		*helper = -1;
	}
	return -1;
}

/*
 * Forks the spare shim: a child that makes ready what every shim sets up
 * before it knows which one it is (pyshim._spare_shim), then waits on a
 * socketpair for a fork request to become that shim. Returns 1 in the child,
 * with out[1] = its end of the pair; 0 in the template, which keeps the
 * other end; -1 when it cannot be had (retried a second later).
 *
 * The spare is work done ahead of need: it runs at SCHED_IDLE, on CPU time no
 * other process wants, so its set-up (a few ms of CPU, made 20 ms after a
 * start, while that start's runc create runs) never holds up a container's
 * start; template_hand_to_spare raises it back before it takes a request.
 */
static int template_make_spare(long *out)
{
	sigset_t term, old;
	int pair[2];
	pid_t pid;

	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0) {
		template_spare_retry_ms = monotonic_ms() + 1000;
		return -1;
	}
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	sigaddset(&term, SIGINT);
	sigprocmask(SIG_BLOCK, &term, &old);
	pid = fork();
	if (pid == 0) {
		struct sched_param none = {0};

		if (template_spare_idle)
			sched_setscheduler(0, SCHED_IDLE, &none); /* failing, it runs as before */
		close(pair[0]);
		out[0] = -1, out[1] = pair[1], out[2] = -1, out[3] = 0;
		return 1;
	}
	sigprocmask(SIG_SETMASK, &old, NULL);
	close(pair[1]);
	if (pid < 0) {
		close(pair[0]);
		template_spare_retry_ms = monotonic_ms() + 1000;
		return -1;
	}
	template_spare = pid;
	template_spare_fd = pair[0];
	return 0;
}

/*
 * Hands the fork request in template_buf (`len` bytes) and the socket `fd`
 * that came with it to the spare shim, which becomes that shim; its pid, or
 * -1 when there is no spare or it cannot take it (the caller forks).
 */
static pid_t template_hand_to_spare(int fd, long len)
{
	struct sched_param none = {0};
	pid_t pid = template_spare;
	int gone;

	if (template_spare < 0 || template_spare_fd < 0)
		return -1;
	/* Back from SCHED_IDLE first: the shim it becomes, and every runc it
	 * runs, must not wait for idle CPUs. Where that is not allowed (no
	 * CAP_SYS_NICE, as under rootless containerd) the spare is dropped and
	 * later spares wait at the usual policy. */
	if (sched_getscheduler(pid) == SCHED_IDLE && sched_setscheduler(pid, SCHED_OTHER, &none) < 0) {
		template_spare_idle = 0;
		kill(pid, SIGKILL);
		template_drop_spare();
		template_children++; /* reaped as a plain child */
		return -1;
	}
	if (template_pass(template_spare_fd, fd, len, &gone) < 0) {
		if (gone)
			template_drop_spare(); /* dying: reaped later as a plain child */
		return -1;
	}
	template_drop_spare(); /* what was sent is still read: the spare is now a shim */
	return pid;
}

/* In a child of the template: closes what only the template holds. */
void reaper_template_forget(void)
{
	template_drop_spare();
}

/*
 * Serves requests on the listening socket `lsock` until one is forked off
 * (returns 0 in the child, with out[] = the connection, the fd that came with
 * the request or -1, the request's length in reaper_template_request(), the
 * requester's pid; SIGTERM and SIGINT are blocked there, the parent's are
 * not), or until something is for Python to do, returning:
 *   -EINTR      a signal arrived (its Python handler runs next);
 *   -ETIMEDOUT  no child left and no fork for idle_ms, nothing queued;
 *   -ESTALE     the file `watch` changed from `stamp`: the request was told
 *               so ("cold stale template" to a start), nothing more is forked;
 *   -ECHILD     a start was forked for because there is no start helper (it
 *               has not been made yet, left idle or died): make one;
 *   another -errno from accept or fork.
 * With spare_ms >= 0, once a fork request has been answered, the loop keeps
 * a spare shim (template_make_spare; returns 1 in it), made when no request
 * has come for spare_ms, and hands the next fork request to it instead of
 * forking. A request whose requester has hung up (it timed out and went cold) is
 * dropped unanswered. A "start" goes, with its connection, to the start
 * helper on *helper (pid helper_pid) when it takes it (template_hand_over);
 * *helper is closed and set to -1 once the helper is gone (reaped).
 */
int reaper_template_serve(int lsock, long idle_ms, const char *watch, const long long *stamp,
			  int *helper, int helper_pid, long spare_ms, long *out)
{
	struct timeval tv = {TEMPLATE_IO_SECONDS, 0};
	struct ucred cred;
	socklen_t clen;
	sigset_t term, old;

	if (!template_last_fork_ms)
		template_last_fork_ms = monotonic_ms();
	if (helper_pid != template_helper && helper_pid > 0) {
		/* A helper replaced before it was reaped (it was leaving) is counted
		 * as an ordinary child from now on: however many are replaced
		 * before any of them is reaped, each exit takes one off the count. */
		if (template_helper > 0)
			template_children++;
		template_helper = helper_pid;
	}
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	sigaddset(&term, SIGINT);
	for (;;) {
		struct pollfd p = {lsock, POLLIN, 0};
		long long idle, now;
		long len;
		int conn, fd = -1, r, wait_ms = 5000;
		pid_t pid;

		template_reap();
		if (*helper >= 0 && template_helper < 0) {
			close(*helper); /* the helper left (idle) or died */
			*helper = -1;
		}
		now = monotonic_ms();
		idle = now - template_last_fork_ms;
		if (template_children == 0) {
			if (idle >= idle_ms) {
				if (poll(&p, 1, 0) == 0)
					return -ETIMEDOUT;
			} else if (idle_ms - idle < wait_ms) {
				wait_ms = (int)(idle_ms - idle);
			}
		}
		if (spare_ms >= 0 && template_forks > 0 && template_spare < 0) {
			long long at = template_last_fork_ms + spare_ms;

			if (at < template_spare_retry_ms)
				at = template_spare_retry_ms;
			/* Made in a lull, never while a request waits: its set-up
			 * would take a CPU from the starts. */
			if (now >= at) {
				if (poll(&p, 1, 0) == 0 && !template_stale(watch, stamp) &&
				    template_make_spare(out) == 1)
					return 1;
			} else if (at - now < wait_ms) {
				wait_ms = (int)(at - now);
			}
		}
		r = poll(&p, 1, wait_ms);
		if (r < 0)
			return -errno;
		if (r == 0)
			continue;
		conn = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
		if (conn < 0) {
			if (errno == EAGAIN || errno == ECONNABORTED)
				continue;
			return -errno;
		}
		setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
		clen = sizeof(cred);
		if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0 ||
		    cred.uid != geteuid() || cred.gid != getegid()) {
			template_say(conn, "error refused: another user\n");
			close(conn);
			continue;
		}
		len = template_read(conn, &fd);
		if (len >= 0) {
			struct pollfd h = {conn, POLLRDHUP, 0};
			const char *kind = template_buf + 8;
			uint32_t flen;

			memcpy(&flen, template_buf, 4);
			flen = ntohl(flen);
			if (poll(&h, 1, 0) > 0) {
				len = -1; /* the requester hung up: it went cold */
			} else if (template_stale(watch, stamp)) {
				template_say(conn, flen >= 5 && !memcmp(kind, "start", 5) ?
					     "cold stale template\n" : "error stale template\n");
				if (fd >= 0)
					close(fd);
				close(conn);
				return -ESTALE;
			} else if (!((flen >= 6 && !memcmp(kind, "start\0", 6)) ||
				     (flen >= 5 && !memcmp(kind, "fork\0", 5) && fd >= 0 &&
				      template_fork_request_ok(len)))) {
				template_say(conn, "error malformed request\n");
				len = -1;
			}
		}
		if (len >= 0 && fd < 0 && !memcmp(template_buf + 8, "start\0", 6) &&
		    template_hand_over(helper, conn, len) == 0) {
			template_last_fork_ms = monotonic_ms(); /* a start is use too */
			len = -1;
		}
		if (len < 0) {
			if (fd >= 0)
				close(fd);
			close(conn);
			continue;
		}
		/* A fork request goes to the spare when there is one, else is forked for. */
		pid = fd >= 0 ? template_hand_to_spare(fd, len) : -1;
		if (pid < 0) {
			sigprocmask(SIG_BLOCK, &term, &old);
			pid = fork();
			if (pid == 0) {
				reaper_template_forget();
				out[0] = conn, out[1] = fd, out[2] = len, out[3] = cred.pid;
				return 0;
			}
			r = errno;
			sigprocmask(SIG_SETMASK, &old, NULL);
		}
		if (fd >= 0)
			close(fd);
		if (pid < 0) {
			template_say(conn, "error fork failed\n");
			close(conn);
			return -r;
		}
		if (fd >= 0) {
			char ok[32];

			snprintf(ok, sizeof(ok), "ok %d\n", (int)pid);
			template_say(conn, ok);
		}
		close(conn);
		template_children++;
		if (fd >= 0)
			template_forks++;
		template_last_fork_ms = monotonic_ms();
		if (fd < 0 && *helper < 0)
			return -ECHILD; /* a start with no helper: Python makes one for the next */
	}
}

/* The request the child of reaper_template_serve was forked for. */
const char *reaper_template_request(void)
{
	return template_buf;
}
