#!/usr/bin/env python3
# Measures FICLONE and FICLONERANGE cost against extent count (docs/consistency.md).
# Usage: python3 scripts/measure-clone-ranges.py DIR   (DIR on a scratch XFS reflink=1 pool,
# e.g. truncate -s 3G p.img && mkfs.xfs -m reflink=1 p.img && mount -o loop p.img DIR).
# Freezes nothing; writes and removes 256 MiB images in DIR.
import os, fcntl, struct, time, sys, statistics
FICLONE = 0x40049409
FICLONERANGE = 0x4020940D
FIEMAP = 0xC020660B
def extents(path):
    fd = os.open(path, os.O_RDONLY)
    # fiemap header: start, length, flags, mapped_extents, extent_count, reserved
    hdr = struct.pack("QQIIII", 0, 0xFFFFFFFFFFFFFFFF, 0, 0, 0, 0)
    out = bytearray(hdr); fcntl.ioctl(fd, FIEMAP, out, True)
    os.close(fd)
    return struct.unpack("QQIIII", out)[3]
def make(path, size_mb, every):
    # allocated file, then clone + rewrite every `every`-th 4K block: each rewrite a new extent
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * size_mb)
        f.flush(); os.fsync(f.fileno())
    if every:
        tmp = path + ".tmp"
        s = os.open(path, os.O_RDONLY); d = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.ioctl(d, FICLONE, s); os.close(s); os.close(d)
        fd = os.open(path, os.O_RDWR)
        blk = 4096
        for off in range(0, size_mb << 20, blk * every):
            data = os.pread(fd, blk, off)
            os.pwrite(fd, data, off)
        os.fsync(fd); os.close(fd)
        os.unlink(tmp)
def clone_full(src, dst):
    s = os.open(src, os.O_RDONLY); d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    t = time.perf_counter(); fcntl.ioctl(d, FICLONE, s); el = time.perf_counter() - t
    os.close(s); os.close(d); os.unlink(dst); return el
def clone_ranges(src, dst, rng):
    s = os.open(src, os.O_RDONLY); d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    size = os.fstat(s).st_size; per = []
    t0 = time.perf_counter()
    for off in range(0, size, rng):
        ln = min(rng, size - off)
        arg = struct.pack("qQQQ", s, off, ln, off)
        t = time.perf_counter(); fcntl.ioctl(d, FICLONERANGE, arg); per.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    os.close(s); os.close(d); os.unlink(dst); return total, per
pool = sys.argv[1]
for size_mb, every in [(256, 0), (256, 64), (256, 16), (256, 4), (256, 2)]:
    p = f"{pool}/img-{size_mb}-{every}.img"
    make(p, size_mb, every)
    n = extents(p)
    full = [clone_full(p, p + ".c") for _ in range(3)]
    line = f"size={size_mb}MiB extents={n} FICLONE median={statistics.median(full)*1000:.1f}ms"
    for rng in [1 << 20, 4 << 20, 16 << 20, 64 << 20]:
        total, per = clone_ranges(p, p + ".c", rng)
        per_ms = sorted(x * 1000 for x in per)
        line += f" | range={rng>>20}MiB total={total*1000:.1f}ms max={per_ms[-1]:.2f}ms"
    print(line, flush=True)
    os.unlink(p)
