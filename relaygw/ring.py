"""
The kernel's io_uring through ctypes, as much of it as the spool's syncs
need: C{fsync} requests handed to the kernel in one system call, and their
results read from shared memory once the ring's descriptor is readable (so
the reactor's epoll says when a sync is done, and no thread of ours waits
for the disk).  Linux 5.6 or newer; L{Ring} raises C{OSError} where the
kernel or a seccomp policy has no io_uring.
"""

import ctypes
import mmap
import os
import struct

_SYS_SETUP, _SYS_ENTER = 425, 426  # (x86-64's numbers, and every other architecture's but alpha's)
_OFF_SQES = 0x10000000
_FEAT_SINGLE_MMAP = 1
_OP_FSYNC = 3
_FSYNC_DATASYNC = 1
_SQE = struct.Struct("=BBHiQQIIQHHiQQ")  # struct io_uring_sqe, 64 octets
_CQE = struct.Struct("=QiI")  # struct io_uring_cqe, 16 octets
_U32 = struct.Struct("=I")

_libc = None


def _syscall(*args):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    while True:
        result = _libc.syscall(*args)
        if result >= 0:
            return result
        e = ctypes.get_errno()
        if e != 4:  # (EINTR)
            raise OSError(e, os.strerror(e))


class Ring:
    """One submission and completion queue pair; not thread-safe."""

    def __init__(self, entries=256):
        params = ctypes.create_string_buffer(120)  # struct io_uring_params
        self.fd = _syscall(_SYS_SETUP, ctypes.c_uint(entries), params)
        try:
            self._map(params.raw)
        except BaseException:
            os.close(self.fd)
            raise
        self._unsubmitted = 0

    def _map(self, params):
        sqEntries, cqEntries, _, _, _, features = struct.unpack_from("=6I", params, 0)
        if not features & _FEAT_SINGLE_MMAP:
            raise OSError(95, "io_uring without a single ring mapping (a kernel before 5.4)")
        head, tail, mask, _, _, _, array = struct.unpack_from("=7I", params, 40)
        cqHead, cqTail, cqMask, _, _, cqes = struct.unpack_from("=6I", params, 80)
        size = max(array + sqEntries * 4, cqes + cqEntries * 16)
        self._rings = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._sqes = mmap.mmap(self.fd, sqEntries * 64, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=_OFF_SQES)
        # The offsets name where the kernel keeps each value in the shared rings.
        self._sqTail, self._sqArray, self._cqHead, self._cqTail, self._cqes = tail, array, cqHead, cqTail, cqes
        self._sqMask = _U32.unpack_from(self._rings, mask)[0]
        self._cqMask = _U32.unpack_from(self._rings, cqMask)[0]
        #: Requests that fit before L{submit}: the submission queue's size
        #: (the completion queue is twice that, so results never overflow).
        self.capacity = sqEntries

    def fsync(self, fd, tag, dataOnly=False):
        """Queue an C{fsync} (C{fdatasync} with C{dataOnly}) of C{fd}; its result comes back with C{tag}."""
        if self._unsubmitted >= self.capacity:
            raise OSError(105, "io_uring submission queue full")  # (ENOBUFS)
        tail = _U32.unpack_from(self._rings, self._sqTail)[0]
        index = tail & self._sqMask
        _SQE.pack_into(self._sqes, index * 64, _OP_FSYNC, 0, 0, fd, 0, 0, 0,
                       _FSYNC_DATASYNC if dataOnly else 0, tag, 0, 0, 0, 0, 0)
        _U32.pack_into(self._rings, self._sqArray + index * 4, index)
        _U32.pack_into(self._rings, self._sqTail, (tail + 1) & 0xFFFFFFFF)
        self._unsubmitted += 1

    def submit(self):
        """Hand the queued requests to the kernel."""
        while self._unsubmitted:
            self._unsubmitted -= _syscall(_SYS_ENTER, self.fd, self._unsubmitted, 0, 0, None, 0)

    def completions(self):
        """The results come back since the last call: C{[(tag, result)]}, a negative errno for a failure."""
        head = _U32.unpack_from(self._rings, self._cqHead)[0]
        tail = _U32.unpack_from(self._rings, self._cqTail)[0]
        out = []
        while head != tail:
            tag, result, _ = _CQE.unpack_from(self._rings, self._cqes + (head & self._cqMask) * 16)
            out.append((tag, result))
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(self._rings, self._cqHead, head)
        return out

    def close(self):
        self._sqes.close()
        self._rings.close()
        os.close(self.fd)
