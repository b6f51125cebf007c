"""cffi (API mode) build of pyshim's C core, `_reaper`.

setup.py runs it through `cffi_modules=["build_reaper.py:ffibuilder"]`; run it
by hand (`python3 build_reaper.py`) to build the extension in place for tests.
"""

import os

from cffi import FFI

# The functions of _reaper.c: each returns a value >= 0 or -errno.
DECLARATIONS = """
int reaper_set_subreaper(void);
int reaper_sigchld_fd(void);
int reaper_catch_signal(int sig);
long reaper_caught_signals(void);
int reaper_reap(int *pids, int *codes, int max);
int reaper_unix_listen(const char *name, size_t len, int backlog);
int reaper_unix_connect(const char *name, size_t len, int nonblock);
int reaper_peer_cred(int fd, int *out);
int reaper_send_fd(int sock, int fd, const char *data, size_t len);
int reaper_recv_fd(int sock, char *data, size_t len, int *fd);
int reaper_mount(const char *source, const char *target, const char *fstype,
                 unsigned long flags, const char *data);
int reaper_umount(const char *target, int flags);
int reaper_malloc_trim(size_t pad);
int reaper_madvise(uintptr_t start, size_t len, int advice);
int reaper_fork(void);
int reaper_immortalize(uintptr_t addr, uint32_t refcnt, uint16_t flags);
"""

# Kernel constants the Python side needs, taken from the system headers at
# build time rather than written down as numbers.
CONSTANTS = """
#define MS_RDONLY ...
#define MS_NOSUID ...
#define MS_NODEV ...
#define MS_NOEXEC ...
#define MS_SYNCHRONOUS ...
#define MS_REMOUNT ...
#define MS_MANDLOCK ...
#define MS_DIRSYNC ...
#define MS_NOATIME ...
#define MS_NODIRATIME ...
#define MS_BIND ...
#define MS_MOVE ...
#define MS_REC ...
#define MS_SILENT ...
#define MS_PRIVATE ...
#define MS_SLAVE ...
#define MS_SHARED ...
#define MS_UNBINDABLE ...
#define MS_RELATIME ...
#define MS_STRICTATIME ...
#define MNT_DETACH ...
#define WNOHANG ...
#define MADV_MERGEABLE ...
#define MADV_UNMERGEABLE ...
"""



def make_builder(source: str) -> FFI:
    """The FFI builder of module `_reaper`, compiling the C file at `source`."""
    ffi = FFI()
    ffi.cdef(DECLARATIONS + CONSTANTS)
    ffi.set_source(
        "_reaper",
        "#include <sys/mman.h>\n#include <sys/mount.h>\n#include <sys/wait.h>\n#include <stddef.h>\n#include <stdint.h>\n" + DECLARATIONS,
        sources=[source],
        extra_compile_args=["-O2", "-Wall", "-Wextra"],
    )
    return ffi


ffibuilder = make_builder("_reaper.c")

if __name__ == "__main__":
    # cffi names its generated source after the module, _reaper.c, which is
    # also the name of our hand-written file: generate into build/ instead.
    # cffi generates its own source named after the module (_reaper.c) in
    # tmpdir, so our file is named by absolute path to keep the two apart.
    here = os.path.dirname(os.path.abspath(__file__))
    make_builder(os.path.join(here, "_reaper.c")).compile(
        tmpdir=os.path.join(here, "build"), target=os.path.join(here, "_reaper.*")
    )
