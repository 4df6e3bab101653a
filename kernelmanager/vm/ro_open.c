/* LD_PRELOAD shim for the jailed QEMU (kernelmanager/vm/jail.py).
 *
 * QEMU 7.2 opens a memory-backend-file O_RDWR even with share=off (MAP_PRIVATE), so a
 * jailed QEMU would need write permission on the template's (or fork's) RAM image,
 * which every other VM maps copy-on-write: one compromised QEMU could then rewrite the
 * memory of all the others through write(2). This shim turns an O_RDWR open (without
 * O_CREAT) of exactly the path in $VMKG_RO_OPEN into O_RDONLY. A MAP_PRIVATE mapping
 * of a read-only descriptor is still writable (copy-on-write), so the guest runs as
 * before, and the file stays read-only to QEMU (owner root, read-only bind mount).
 * Built on first use with the host's C compiler, cached by the hash of this source.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
static int fix(const char *path, int flags) {
    const char *ro = getenv("VMKG_RO_OPEN");
    if (ro && path && strcmp(path, ro) == 0 && (flags & O_ACCMODE) == O_RDWR && !(flags & O_CREAT))
        return (flags & ~O_ACCMODE) | O_RDONLY;
    return flags;
}
#define MODE_ARG mode_t mode = 0; if (flags & (O_CREAT | __O_TMPFILE)) { va_list ap; va_start(ap, flags); mode = va_arg(ap, int); va_end(ap); }
int open64(const char *path, int flags, ...) { MODE_ARG static int (*real)(const char *, int, ...); if (!real) real = dlsym(RTLD_NEXT, "open64"); return real(path, fix(path, flags), mode); }
int open(const char *path, int flags, ...) { MODE_ARG static int (*real)(const char *, int, ...); if (!real) real = dlsym(RTLD_NEXT, "open"); return real(path, fix(path, flags), mode); }
int __open64_2(const char *path, int flags) { static int (*real)(const char *, int); if (!real) real = dlsym(RTLD_NEXT, "__open64_2"); return real(path, fix(path, flags)); }
int __open_2(const char *path, int flags) { static int (*real)(const char *, int); if (!real) real = dlsym(RTLD_NEXT, "__open_2"); return real(path, fix(path, flags)); }
int openat64(int dirfd, const char *path, int flags, ...) { MODE_ARG static int (*real)(int, const char *, int, ...); if (!real) real = dlsym(RTLD_NEXT, "openat64"); return real(dirfd, path, fix(path, flags), mode); }
int openat(int dirfd, const char *path, int flags, ...) { MODE_ARG static int (*real)(int, const char *, int, ...); if (!real) real = dlsym(RTLD_NEXT, "openat"); return real(dirfd, path, fix(path, flags), mode); }
