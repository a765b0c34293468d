"""One worker of tests/tests/stress.rs: N random file-system operations in a
shared work directory on a jfs mount, racing with the other workers.

usage: stress_worker.py WORKDIR SEED NOPS INDEX NO_PUNCH(0|1) SHARED_MMAP(0|1)

Errors that are legitimate outcomes of racing with the other workers
(ENOENT, EEXIST, ENOTEMPTY, ...) are counted. Anything else (EIO, ENOTCONN,
EBADF, ...) or wrong data in this worker's private file is fatal: the worker
prints FATAL with the operation and exits 3. ESTALE is counted and fatal
only in a storm (more than MAX_ESTALE). The last line of stdout is a JSON
summary.
"""

import ctypes
import errno
import faulthandler
import json
import mmap
import os
import random
import sys
import time
import traceback

WORKDIR, SEED, NOPS, INDEX = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
NO_PUNCH = sys.argv[5] == "1"
# Mapping shared files that other workers create and grow at the same time
# still ends in SIGBUS now and then (docs/KNOWN_ISSUES.md); off unless asked.
SHARED_MMAP = len(sys.argv) > 6 and sys.argv[6] == "1"

# A SIGBUS/SIGSEGV (e.g. a mapped page the file system failed to read) kills
# the worker; this prints where it was first.
faulthandler.enable()

rng = random.Random(SEED)
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.fallocate.restype = ctypes.c_int
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

# Name classes. Renames and links stay within a class.
# T: files anyone may truncate (shrink).
T = ["f%d" % i for i in range(6)] + ["h%d" % i for i in range(4)]
# M: files nobody ever shrinks below MSIZE, so mapping [0, MSIZE) is safe
# (a shrink under a mapping would SIGBUS on any file system).
M = ["m%d" % i for i in range(3)] + ["n%d" % i for i in range(3)]
D = ["d%d" % i for i in range(4)]
X = ["x%d" % i for i in range(3)]
MIB = 1 << 20
MSIZE = MIB
MAXOFF = 8 << 20
MAX_ESTALE = 20

# errnos that racing workers legitimately cause
LEGIT = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY}

ok = {}
raced = {}
estale = 0


def p(*names):
    return os.path.join(WORKDIR, *names)


def rand_off():
    return rng.randrange(0, MIB) if rng.random() < 0.5 else rng.randrange(0, MAXOFF)


def rand_len():
    r = rng.random()
    if r < 0.70:
        return rng.randint(1, 16 << 10)
    if r < 0.95:
        return rng.randint(1, 256 << 10)
    return rng.randint(1, MIB)


class Fatal(Exception):
    pass


# ------------------------------------------------------------ shared-file ops


def op_write():
    name = rng.choice(T + M)
    fd = os.open(p(name), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, rng.randbytes(rand_len()), rand_off())
        if rng.random() < 0.1:
            os.fsync(fd)
    finally:
        os.close(fd)


def op_read():
    name = rng.choice(T + M)
    fd = os.open(p(name), os.O_RDONLY)
    try:
        os.pread(fd, rand_len(), rand_off())
    finally:
        os.close(fd)


def op_mmap():
    if not SHARED_MMAP:
        return
    name = rng.choice(M)
    fd = os.open(p(name), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size < MSIZE:
            os.ftruncate(fd, MSIZE)  # only ever grows an M file, to exactly MSIZE
        # Say what is about to be touched: if the worker dies of SIGBUS, its
        # last line names the file and the inode.
        st = os.fstat(fd)
        os.write(1, ("mmap %s ino %d size %d nlink %d\n" % (name, st.st_ino, st.st_size, st.st_nlink)).encode())
        mm = mmap.mmap(fd, MSIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            off = rng.randrange(0, MSIZE - 4096)
            n = rng.randint(1, 4096)
            _ = mm[off:off + n]
            off = rng.randrange(0, MSIZE - 4096)
            mm[off:off + n] = rng.randbytes(n)
            if rng.random() < 0.5:
                mm.flush()
        finally:
            mm.close()
    finally:
        os.close(fd)


def op_truncate():
    os.truncate(p(rng.choice(T)), rng.randrange(0, MAXOFF))


def op_copy():
    src, dst = rng.choice(T + M), rng.choice(T + M)
    fi = os.open(p(src), os.O_RDONLY)
    try:
        fo = os.open(p(dst), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.copy_file_range(fi, fo, rand_len(), rand_off(), rand_off())
        finally:
            os.close(fo)
    finally:
        os.close(fi)


def op_fallocate():
    fd = os.open(p(rng.choice(T + M)), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, rand_off(), rand_len())
    finally:
        os.close(fd)


def op_punch():
    if NO_PUNCH:
        return
    fd = os.open(p(rng.choice(T + M)), os.O_RDWR)
    try:
        if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, rand_off(), rand_len()) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "fallocate(PUNCH_HOLE|KEEP_SIZE): " + os.strerror(e))
    finally:
        os.close(fd)


def op_rename():
    cls = rng.choice([T, M, D])
    os.rename(p(rng.choice(cls)), p(rng.choice(cls)))


def op_link():
    cls = rng.choice([T, M])
    os.link(p(rng.choice(cls)), p(rng.choice(cls)))


def op_unlink():
    os.unlink(p(rng.choice(T + M)))


def op_mkdir():
    os.mkdir(p(rng.choice(D)))


def op_rmdir():
    os.rmdir(p(rng.choice(D)))


def op_dirfile():
    f = p(rng.choice(D), rng.choice(X))
    if rng.random() < 0.6:
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, rng.randbytes(rng.randint(0, 8192)))
        finally:
            os.close(fd)
    else:
        os.unlink(f)


def op_listdir():
    for n in os.listdir(WORKDIR):
        try:
            os.lstat(p(n))
        except FileNotFoundError:
            raced["listdir-stat:ENOENT"] = raced.get("listdir-stat:ENOENT", 0) + 1


# ------------------------------------------------------------ private file

OWN = p("own%d" % INDEX)
model = bytearray()


def verify(fd, off, n, what):
    got = os.pread(fd, n, off)
    want = bytes(model[off:off + n])
    if got != want:
        i = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), min(len(got), len(want)))
        raise Fatal("DATA MISMATCH in %s (%s): pread(%d, %d): got %d bytes, want %d; first difference at byte %d"
                    % (OWN, what, n, off, len(got), len(want), off + i))


def op_private():
    global model
    r = rng.random()
    fd = os.open(OWN, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if r < 0.45:
            off, data = rng.randrange(0, 2 * MIB), rng.randbytes(rng.randint(1, 64 << 10))
            os.pwrite(fd, data, off)
            if len(model) < off + len(data):
                model.extend(bytes(off + len(data) - len(model)))
            model[off:off + len(data)] = data
        elif r < 0.55:
            size = rng.randrange(0, 3 * MIB)
            os.ftruncate(fd, size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        elif r < 0.95:
            off = rng.randrange(0, len(model) + 4096)
            verify(fd, off, rng.randint(1, 128 << 10), "random read")
        else:
            st = os.fstat(fd).st_size
            if st != len(model):
                raise Fatal("SIZE MISMATCH in %s: st_size %d, want %d" % (OWN, st, len(model)))
            verify(fd, 0, len(model) + 1, "whole file")
    finally:
        os.close(fd)


OPS = [
    (op_write, 18), (op_read, 14), (op_mmap, 8), (op_truncate, 5), (op_copy, 6),
    (op_fallocate, 4), (op_punch, 4), (op_rename, 8), (op_link, 5), (op_unlink, 7),
    (op_mkdir, 4), (op_rmdir, 3), (op_dirfile, 6), (op_listdir, 2), (op_private, 10),
]
FUNCS = [f for f, _ in OPS]
WEIGHTS = [w for _, w in OPS]


def main():
    global estale
    start = time.time()
    for i in range(NOPS):
        f = rng.choices(FUNCS, WEIGHTS)[0]
        name = f.__name__[3:]
        try:
            f()
            ok[name] = ok.get(name, 0) + 1
        except Fatal as e:
            print("FATAL worker %d op %d (%s): %s" % (INDEX, i, name, e), flush=True)
            sys.exit(3)
        except OSError as e:
            en = e.errno
            legit = en in LEGIT or (name == "copy" and en == errno.EINVAL)
            if en == errno.ESTALE:
                estale += 1
                legit = estale <= MAX_ESTALE
            if not legit:
                print("FATAL worker %d op %d (%s): errno %s (%s): %s"
                      % (INDEX, i, name, en, errno.errorcode.get(en, "?"), e, traceback.format_exc()), flush=True)
                sys.exit(3)
            key = "%s:%s" % (name, errno.errorcode.get(en, en))
            raced[key] = raced.get(key, 0) + 1
        if (i + 1) % 1000 == 0:
            print("progress worker %d: %d ops in %.1f s" % (INDEX, i + 1, time.time() - start), flush=True)
    # The private file is exactly what this worker wrote.
    fd = os.open(OWN, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        st = os.fstat(fd).st_size
        if st != len(model):
            print("FATAL worker %d: final SIZE MISMATCH in %s: st_size %d, want %d" % (INDEX, OWN, st, len(model)))
            sys.exit(3)
        verify(fd, 0, len(model) + 1, "final whole file")
    except Fatal as e:
        print("FATAL worker %d: %s" % (INDEX, e), flush=True)
        sys.exit(3)
    finally:
        os.close(fd)
    print(json.dumps({"worker": INDEX, "ops": NOPS, "seconds": round(time.time() - start, 1),
                      "ok": ok, "raced": raced, "estale": estale}), flush=True)


main()
