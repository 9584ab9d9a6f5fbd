#!/usr/bin/env python3
"""What a log's fdatasync costs on this machine's disk, by how the bytes synced reach the file.

Each case writes COUNT chunks of CHUNK bytes (a group commit's worth), one fdatasync after each,
and prints the syncs per second and the median fdatasync:

  append      to a new file, growing it (a log started in a new file)
  overwrite   over a file's existing, cached bytes (a log written over an older log's file)
  fallocate   into space reserved by posix_fallocate (unwritten extents: no help)
  zero-fill   over zeros written and synced beforehand (as PostgreSQL's WAL segments are)

  scripts/fsync-probe.py [DIR] [ROUNDS]     (DIR: target/fsync-probe; ROUNDS: 3)
"""
import os
import statistics
import sys
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else "target/fsync-probe"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
CHUNK, COUNT = 30_000, 2_000
os.makedirs(DIR, exist_ok=True)
data = os.urandom(CHUNK)


def fresh(name):
    path = os.path.join(DIR, name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)


def timed(fd):
    syncs = []
    started = time.perf_counter()
    for _ in range(COUNT):
        os.write(fd, data)
        t = time.perf_counter()
        os.fdatasync(fd)
        syncs.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    os.close(fd)
    return COUNT / elapsed, statistics.median(syncs) * 1e3


def append():
    return timed(fresh("append"))


def overwrite():
    path = os.path.join(DIR, "overwrite")
    if not os.path.exists(path) or os.path.getsize(path) < CHUNK * COUNT:
        fd = fresh("overwrite")
        for _ in range(COUNT):
            os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
    return timed(os.open(path, os.O_WRONLY))


def fallocate():
    fd = fresh("fallocate")
    os.posix_fallocate(fd, 0, CHUNK * COUNT)
    os.fsync(fd)
    return timed(fd)


def zero_fill():
    fd = fresh("zero-fill")
    os.write(fd, bytes(CHUNK * COUNT))
    os.fsync(fd)
    os.lseek(fd, 0, os.SEEK_SET)
    return timed(fd)


for _ in range(ROUNDS):
    for name, case in (("append", append), ("overwrite", overwrite),
                       ("fallocate", fallocate), ("zero-fill", zero_fill)):
        rate, median = case()
        print(f"{name:10s} {rate:6.0f} syncs/s  median fdatasync {median:.3f} ms", flush=True)
