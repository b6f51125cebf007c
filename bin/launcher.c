/*
 * launcher.c - the installed containerd-shim-pyshim-v1: a native front for
 * the Python shim, so that a container's `start` boots no interpreter.
 *
 * containerd runs this binary for every container's `start`. When the warm
 * template of this containerd and this build answers (the process
 * `containerd-shim-pyshim-v1 template`, see pyshim.py's warm template
 * section), `start` is handed over to it whole: this program reads its
 * stdin (the runtime options) and sends argv, environment, cwd and those
 * options in one request on the template's unix socket; the template does
 * all of start's work and replies with the exit status and the text to
 * print. Nothing is printed before a whole reply is in, so whatever goes
 * wrong on the way (no template, a stale build, a foreign uid, a template
 * that dies or stalls mid-request) ends in the Python path, never in half
 * an answer.
 *
 * Every other command, and `start` without an answering template, execs
 * the Python path: the interpreter named by the first line of the sibling
 * `pyshim-python`, with -I -S, running this very file, which carries the
 * Python part (bin/containerd-shim-pyshim-v1) as a zip archive appended by
 * setup.py: Python runs a zip's __main__.py. So `ps` shows every pyshim
 * process as `python -IS .../containerd-shim-pyshim-v1 ...`, as before.
 *
 * The template's socket is /run/containerd/s/pyshim-template-<16 hex of
 * sha256(identity of this file, NUL, build id, NUL, containerd's address)>,
 * the identity being "realpath NUL st_dev NUL st_ino NUL mtime_ns NUL
 * ctime_ns NUL size" in decimal and the build id the hash of the sources
 * setup.py compiles in (PYSHIM_BUILD_ID): pyshim.launcher_identity() and
 * template_path() compute the same string. Another build, or a reinstall
 * (which writes this file anew), gives another name.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define SOCKET_DIR "/run/containerd/s"
#define BINARY "containerd-shim-pyshim-v1"
#define RUNTIME "io.containerd.pyshim.v1"
#define REPLY_TIMEOUT_MS 3000 /* as pyshim's template_fork */
#define REQUEST_LIMIT (4u << 20) /* the template refuses more */
#ifndef PYSHIM_BUILD_ID /* setup.py defines it: pyshim.BUILD_ID of the same build */
#define PYSHIM_BUILD_ID ""
#endif

extern char **environ;

/* --- sha256 (FIPS 180-4), just enough for one short key ---------------- */

static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const unsigned char *p)
{
	uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
	int i;

	for (i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
		       (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (i = 16; i < 64; i++) {
		uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);

		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
	for (i = 0; i < 64; i++) {
		t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
		t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
		k = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
	}
	h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += k;
}

/* The first `nhex` hex digits of sha256(data) into out (nhex + 1 bytes). */
static void sha256_hex(const unsigned char *data, size_t len, char *out, int nhex)
{
	uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
			 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
	unsigned char tail[128];
	size_t i, rest = len % 64, n = rest < 56 ? 64 : 128;
	uint64_t bits = (uint64_t)len * 8;

	for (i = 0; i + 64 <= len; i += 64)
		sha256_block(h, data + i);
	memset(tail, 0, sizeof(tail));
	memcpy(tail, data + i, rest);
	tail[rest] = 0x80;
	for (i = 0; i < 8; i++)
		tail[n - 1 - i] = (unsigned char)(bits >> (8 * i));
	sha256_block(h, tail);
	if (n == 128)
		sha256_block(h, tail + 64);
	for (i = 0; i < (size_t)nhex; i++)
		out[i] = "0123456789abcdef"[(h[i / 8] >> (28 - 4 * (i % 8))) & 15];
	out[nhex] = '\0';
}

/* --- small helpers ----------------------------------------------------- */

/* A growable byte buffer; on allocation failure `bad` is set and it stops growing. */
struct buf {
	char *p;
	size_t len, cap;
	int bad;
};

static void put(struct buf *b, const void *data, size_t n)
{
	if (b->bad)
		return;
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		char *p;

		while (cap < b->len + n)
			cap *= 2;
		p = realloc(b->p, cap);
		if (!p) {
			b->bad = 1;
			return;
		}
		b->p = p, b->cap = cap;
	}
	memcpy(b->p + b->len, data, n);
	b->len += n;
}

static void put_str0(struct buf *b, const char *s, int nul)
{
	put(b, s, strlen(s) + (nul ? 1 : 0));
}

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for `events` on fd until the deadline: 1 ready, 0 timed out, -1 error. */
static int wait_fd(int fd, short events, long long deadline)
{
	struct pollfd p = {.fd = fd, .events = events};

	for (;;) {
		long long left = deadline - now_ms();
		int n;

		if (left <= 0)
			return 0;
		n = poll(&p, 1, (int)left);
		if (n > 0)
			return 1;
		if (n == 0)
			return 0;
		if (errno != EINTR)
			return -1;
	}
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w, n -= (size_t)w;
	}
	return 0;
}

/* --- the command line, as pyshim's Flags reads it ---------------------- */

struct args {
	const char *namespace, *address, *id, *action;
	int other; /* anything that is not a plain start: Python decides */
};

static void parse_args(int argc, char **argv, struct args *a)
{
	static const char *const strings[] = {"namespace", "address", "publish-binary", "id", "bundle",
					      "socket", "settings", "debug-socket", NULL};
	int i, j;

	memset(a, 0, sizeof(*a));
	a->namespace = a->address = a->id = a->action = "";
	for (i = 1; i < argc; i++) {
		const char *arg = argv[i], *name, *eq, *value;
		size_t len;

		if (!strcmp(arg, "--") || arg[0] != '-' || !strcmp(arg, "-")) {
			if (!strcmp(arg, "--"))
				a->action = i + 1 < argc ? argv[i + 1] : "";
			else
				a->action = arg;
			return;
		}
		for (name = arg; *name == '-'; name++)
			;
		eq = strchr(name, '=');
		len = eq ? (size_t)(eq - name) : strlen(name);
		if (len == 5 && !strncmp(name, "debug", 5))
			continue;
		for (j = 0; strings[j]; j++)
			if (strlen(strings[j]) == len && !strncmp(name, strings[j], len))
				break;
		if (!strings[j]) { /* -h, -v, -info, or a flag error: Python's words */
			a->other = 1;
			return;
		}
		if (eq) {
			value = eq + 1;
		} else if (i + 1 < argc) {
			value = argv[++i];
		} else {
			a->other = 1;
			return;
		}
		if (!strcmp(strings[j], "namespace"))
			a->namespace = value;
		else if (!strcmp(strings[j], "address"))
			a->address = value;
		else if (!strcmp(strings[j], "id"))
			a->id = value;
	}
}

/* --- the bundle's log, for the one line this program may write --------- */

static void put_quoted(struct buf *b, const char *s)
{
	const char *c;
	int plain = *s != '\0';

	for (c = s; *c && plain; c++)
		plain = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
			strchr("-_./:@", *c);
	if (plain) {
		put_str0(b, s, 0);
		return;
	}
	put(b, "\"", 1);
	for (c = s; *c; c++) {
		if (*c == '"' || *c == '\\')
			put(b, "\\", 1);
		if (*c == '\n')
			put(b, "\\n", 2);
		else
			put(b, c, 1);
	}
	put(b, "\"", 1);
}

/* A logrus line (level=warning) into the bundle's log fifo, as pyshim's log writes them. */
static void log_warning(const struct args *a, const char *msg, const char *error)
{
	struct buf b = {0};
	struct timespec ts;
	struct tm tm;
	char stamp[64];
	int fd = open("log", O_WRONLY | O_NONBLOCK | O_CLOEXEC);

	if (fd < 0)
		return;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
	put_str0(&b, "time=\"", 0);
	put_str0(&b, stamp, 0);
	snprintf(stamp, sizeof(stamp), ".%09ldZ\" level=warning msg=", ts.tv_nsec);
	put_str0(&b, stamp, 0);
	put_quoted(&b, msg);
	put_str0(&b, " error=", 0);
	put_quoted(&b, error);
	put_str0(&b, " namespace=", 0);
	put_quoted(&b, a->namespace);
	put_str0(&b, " id=", 0);
	put_quoted(&b, a->id);
	put_str0(&b, " runtime=" RUNTIME "\n", 0);
	if (!b.bad)
		(void)!write(fd, b.p, b.len);
	free(b.p);
	close(fd);
}

/* --- the Python path --------------------------------------------------- */

/* `name` looked up on PATH, as sh's `command -v` does, into out. */
static int search_path(const char *name, char *out, size_t size)
{
	const char *path = getenv("PATH"), *p, *end;

	if (strchr(name, '/')) {
		snprintf(out, size, "%s", name);
		return 0;
	}
	for (p = path ? path : "/usr/bin:/bin"; p; p = *end ? end + 1 : NULL) {
		end = strchrnul(p, ':');
		if ((size_t)snprintf(out, size, "%.*s/%s", (int)(end - p), end == p ? "." : p, name) < size &&
		    access(out, X_OK) == 0)
			return 0;
	}
	return -1;
}

/* Execs `python -IS self args...` with the interpreter pyshim-python names;
 * `options` (when not NULL) becomes its stdin again. Returns only on failure. */
static int exec_python(const char *self, const char *dir, int argc, char **argv, const struct buf *options)
{
	char named[4096], line[4096], py[4096];
	char **pargv;
	FILE *f;
	int i, n;

	snprintf(named, sizeof(named), "%s/pyshim-python", dir);
	py[0] = '\0';
	f = fopen(named, "re");
	if (f) {
		if (fgets(line, sizeof(line), f) && strlen(line) > 2) {
			line[strcspn(line, "\n")] = '\0';
			snprintf(py, sizeof(py), "%s", line + 2);
		}
		fclose(f);
	}
	if (!strncmp(py, "/usr/bin/env ", 13)) { /* a source checkout */
		snprintf(line, sizeof(line), "%s", py + 13);
		if (search_path(line, py, sizeof(py)) < 0)
			py[0] = '\0';
	}
	if (!py[0] || access(py, X_OK) != 0) {
		/* containerd shows start's (and delete's) stderr followed by ": exit
		 * status 127": no newline then, so that it stays one line. */
		const char *last = argc > 1 ? argv[argc - 1] : "";
		const char *nl = !strcmp(last, "start") || !strcmp(last, "delete") ? "" : "\n";

		if (py[0])
			fprintf(stderr, BINARY ": no Python to run pyshim: %s (named by %s) is not executable; "
				"reinstall pyshim%s", py, named, nl);
		else
			fprintf(stderr, BINARY ": no Python to run pyshim: %s is missing; reinstall pyshim%s",
				named, nl);
		return 127;
	}
	if (options) { /* stdin was read for the template: give Python the same bytes */
		int fd = memfd_create("pyshim-options", 0);

		if (fd < 0 || write_all(fd, options->p ? options->p : "", options->len) < 0 ||
		    lseek(fd, 0, SEEK_SET) < 0 || dup2(fd, 0) < 0) {
			fprintf(stderr, BINARY ": cannot hand the runtime options to Python: %s", strerror(errno));
			return 1;
		}
		close(fd);
	}
	pargv = calloc((size_t)argc + 3, sizeof(char *));
	if (!pargv) {
		fprintf(stderr, BINARY ": out of memory");
		return 1;
	}
	n = 0;
	pargv[n++] = py;
	pargv[n++] = "-IS";
	pargv[n++] = (char *)self;
	for (i = 1; i < argc; i++)
		pargv[n++] = argv[i];
	pargv[n] = NULL;
	execv(py, pargv);
	fprintf(stderr, BINARY ": cannot run %s: %s\n", py, strerror(errno));
	return 127;
}

/* --- the warm path ----------------------------------------------------- */

enum outcome { NO_TEMPLATE, COLD, BROKEN, TIMED_OUT, DONE };

/* A connection to the template at `path`, checked to be our own user's; -1 if none answers. */
static int connect_template(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct ucred cred;
	socklen_t len = sizeof(cred);
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -1;
	strcpy(sa.sun_path, path);
	/* Non-blocking: a full backlog (a stalled template) is EAGAIN, not a wait. */
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 ||
	    cred.uid != geteuid() || cred.gid != getegid()) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Reads all of fd 0 (the runtime options containerd writes, then closes). */
static int read_stdin(struct buf *b)
{
	char chunk[8192];

	for (;;) {
		ssize_t n = read(0, chunk, sizeof(chunk));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return errno == EBADF ? 0 : -1; /* no stdin: no options, as Python reads it */
		if (n == 0)
			return b->bad ? -1 : 0;
		put(b, chunk, (size_t)n);
	}
}

/* Hands `start` to the template; on DONE, *code is the exit status to leave with. */
static enum outcome warm_start(int argc, char **argv, const char *path, struct buf *options,
			       const char **why, int *code)
{
	struct buf req = {0}, reply = {0};
	char num[32], cwd[4096], *nl, *body;
	uint32_t head[2];
	long long deadline;
	size_t sent = 0, fields;
	unsigned long status, len;
	char **e;
	int fd, i;

	fd = connect_template(path);
	if (fd < 0)
		return NO_TEMPLATE;
	*why = "cannot read the runtime options";
	if (read_stdin(options) < 0 || !getcwd(cwd, sizeof(cwd)))
		goto broken;
	/* The header (bytes of fields, bytes of options, big-endian), then the
	 * fields NUL-separated: kind, cwd, argc, argv, environment. */
	put(&req, head, sizeof(head));
	put_str0(&req, "start", 1);
	put_str0(&req, cwd, 1);
	snprintf(num, sizeof(num), "%d", argc - 1);
	put_str0(&req, num, 1);
	for (i = 1; i < argc; i++)
		put_str0(&req, argv[i], 1);
	for (e = environ; *e; e++)
		put_str0(&req, *e, 1);
	fields = req.len - sizeof(head) - 1; /* no NUL after the last field */
	req.len--;
	if (req.bad || req.len + options->len > REQUEST_LIMIT) {
		*why = "request too large";
		goto broken;
	}
	put(&req, options->p ? options->p : "", options->len);
	if (req.bad)
		goto broken;
	head[0] = htobe32((uint32_t)fields);
	head[1] = htobe32((uint32_t)options->len);
	memcpy(req.p, head, sizeof(head));
	deadline = now_ms() + REPLY_TIMEOUT_MS;
	*why = "the warm template closed the connection";
	while (sent < req.len) {
		ssize_t n = send(fd, req.p + sent, req.len - sent, MSG_NOSIGNAL);

		if (n > 0) {
			sent += (size_t)n;
		} else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
			int r = wait_fd(fd, POLLOUT, deadline);

			if (r == 0)
				goto timed_out;
			if (r < 0)
				goto broken;
		} else {
			goto broken;
		}
	}
	for (;;) { /* the reply, to EOF: the template closes when it is done */
		char chunk[4096];
		ssize_t n = recv(fd, chunk, sizeof(chunk), 0);

		if (n > 0) {
			put(&reply, chunk, (size_t)n);
			continue;
		}
		if (n == 0)
			break;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			goto broken;
		i = wait_fd(fd, POLLIN, deadline);
		if (i == 0)
			goto timed_out;
		if (i < 0)
			goto broken;
	}
	close(fd);
	fd = -1;
	put(&reply, "", 1); /* a NUL after it, for the parsing below */
	if (reply.bad || reply.len < 2)
		goto broken;
	if (!strncmp(reply.p, "cold", 4)) {
		free(req.p), free(reply.p);
		return COLD;
	}
	nl = memchr(reply.p, '\n', reply.len);
	if (!nl || sscanf(reply.p, "exit %lu %lu\n", &status, &len) != 2 || status > 255) {
		*why = "the warm template answered something else";
		if (!strncmp(reply.p, "error ", 6) && nl) {
			*nl = '\0';
			*why = reply.p + 6;
		}
		free(req.p);
		return BROKEN; /* reply.p stays: *why points into it */
	}
	body = nl + 1;
	if ((size_t)(reply.p + reply.len - 1 - body) != len) {
		*why = "the warm template's answer was cut short";
		goto broken;
	}
	/* containerd reads stdout and stderr as one: the answer, or the error. */
	if (write_all(status ? 2 : 1, body, len) < 0)
		status = status ? status : 1;
	*code = (int)status;
	free(req.p), free(reply.p);
	return DONE;
timed_out:
	*why = "timed out waiting for the warm template";
	close(fd);
	free(req.p), free(reply.p);
	return TIMED_OUT;
broken:
	if (fd >= 0)
		close(fd);
	free(req.p), free(reply.p);
	return BROKEN;
}

int main(int argc, char **argv)
{
	char self[4096], dir[4096], key[8192], hex[17], path[128];
	const char *template_env = getenv("PYSHIM_TEMPLATE"), *why = "";
	struct buf options = {0};
	struct args a;
	struct stat st;
	ssize_t n;
	int code = 1, keylen;

	n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n <= 0) {
		fprintf(stderr, BINARY ": cannot find itself (/proc/self/exe): %s\n", strerror(errno));
		return 127;
	}
	self[n] = '\0';
	snprintf(dir, sizeof(dir), "%s", self);
	*strrchr(dir, '/') = '\0';
	parse_args(argc, argv, &a);
	if (a.other || strcmp(a.action, "start") || !a.namespace[0] ||
	    (template_env && !strcmp(template_env, "0")) || stat(self, &st) < 0)
		return exec_python(self, dir, argc, argv, NULL);
	keylen = snprintf(key, sizeof(key), "%s%c%llu%c%llu%c%lld%c%lld%c%lld%c%s%c%s", self, 0,
			  (unsigned long long)st.st_dev, 0, (unsigned long long)st.st_ino, 0,
			  (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec, 0,
			  (long long)st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec, 0,
			  (long long)st.st_size, 0, PYSHIM_BUILD_ID, 0, a.address);
	if (keylen <= 0 || (size_t)keylen >= sizeof(key))
		return exec_python(self, dir, argc, argv, NULL);
	sha256_hex((const unsigned char *)key, (size_t)keylen, hex, 16);
	snprintf(path, sizeof(path), SOCKET_DIR "/pyshim-template-%s", hex);
	switch (warm_start(argc, argv, path, &options, &why, &code)) {
	case DONE:
		return code;
	case NO_TEMPLATE: /* stdin untouched */
		return exec_python(self, dir, argc, argv, NULL);
	case COLD:
		break;
	case TIMED_OUT:
		/* A stalled template: Python must not wait for it a second time. */
		log_warning(&a, "warm template unavailable: starting the shim cold", why);
		setenv("PYSHIM_TEMPLATE", "0", 1);
		break;
	case BROKEN:
		log_warning(&a, "warm template unavailable: starting the shim cold", why);
		break;
	}
	return exec_python(self, dir, argc, argv, &options);
}
