"""Cross-process commit wake-ups for one SQLite database file.

Processes sharing a SQLite file see each other's commits only when they look
(``PRAGMA data_version``), so a store that only polls adds half a poll interval to
every hop between processes. Here each store is *told* instead:

- **Where.** A directory next to the database, ``<database>-wake/``, named like
  SQLite's own ``-wal`` and ``-shm`` files and, like them, found through the
  database's real path: every process that can open the database finds the same
  directory, with the permissions of the database's directory. Each open store binds
  a Unix datagram socket there, named ``<pid>-<8 hex digits>``; the last store to
  close removes the (then empty) directory.
- **Telling.** After each commit that changed something, the writer sends one byte,
  never blocking, to every other socket in the directory. The listing is cached and
  re-read when the directory's modification time changes (or changed too recently
  to trust). A full receive queue means that peer has a wake-up pending already, but
  perhaps not for these kinds of work: the byte is kept and sent, merged with later
  ones, after the next commit or idle poll. Each peer gets its own sending socket: on
  Linux queued bytes count against the sender's buffer, and a stopped peer must not
  use it up for all.
- **Listening.** The event loop that waits for changes watches the socket itself
  (``attach``): a wake-up then costs one thread wake-up, not two (the listener's,
  then the loop's), about 60 µs less per hop between processes on a virtual machine.
  Until a loop attaches, and again once that loop has closed or stopped, a thread per
  store sleeps on the socket instead (while a loop watches, that thread wakes every
  0.1 s only to see whether the loop still runs). Either takes everything
  queued (many commits, one wake-up) and calls ``on_wake``.
- **Dead peers.** A process killed with SIGKILL leaves its socket file behind;
  sending to it fails with ECONNREFUSED and the sender removes it.
- **Long paths.** A Unix socket address holds about 104 bytes. When the directory's
  path is too long, on Linux the sockets are addressed through an open descriptor of
  the directory (``/proc/self/fd/<fd>/<name>``: the same files, a short address).
  Elsewhere such a store goes without, as below.
- **Safety net.** The store keeps polling ``PRAGMA data_version``, every
  ``poll_interval`` (at least 100 ms) instead of every ``fast_poll``. When the poll
  finds a commit that no byte announced (a process of an older version, the sqlite3
  shell, a store that could not bind), it polls fast again for a while, so such
  writers are noticed as quickly as without this module. Nothing here ever fails a
  commit: without a socket (``:memory:``, no Unix sockets, a read-only directory)
  the store simply polls fast, as it always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import secrets
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("tether.store")

SAFETY_POLL = 0.1
"""Seconds between ``data_version`` polls while wake-ups arrive by socket."""
FAST_AFTER_MISS = 30.0
"""Seconds of fast polling after the poll found a commit no wake-up announced."""

_MAX_ADDRESS = 103  # sun_path is 104 bytes on macOS (with its NUL), 108 on Linux
_NAME = re.compile(r"[0-9]{1,7}-[0-9a-f]{8}")  # pid (at most 7 digits on Linux) and a nonce
_NAME_MAX = 16
_RACY_NS = 2_000_000_000  # a listing taken this soon after a change may miss another one
_BIND_ATTEMPTS = 3  # the directory may vanish under us: its last store removes it on close


class CommitWakeup:
    """Wakes the other stores on one database file after our commits, and us after theirs.

    Used by the store's writer thread: ``committed`` after each commit that changed
    something, ``polled`` after each idle ``data_version`` poll, ``poll_interval`` for
    how long to wait before the next one. ``on_wake`` runs on the listener thread, or
    on the event loop that ``attach`` named while that loop runs.
    """

    def __init__(self, db_path: str, on_wake: Callable[[int], None], fast_poll: float) -> None:
        self._on_wake = on_wake
        self._fast_poll = fast_poll
        self._slow_poll = max(fast_poll, SAFETY_POLL)
        self._fast_until = 0.0
        self._received = 0  # wake-ups taken by the listener (read by the writer's poll)
        self._received_at_poll = 0
        self._peers: dict[str, socket.socket] = {}
        self._owed: dict[str, int] = {}  # change masks a full queue refused, by peer
        self._listed_mtime = -1
        self._listing_racy = True
        self._closing = False
        self._sock: socket.socket | None = None
        self._dir_fd = -1
        self._stop_r = self._stop_w = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop watching the socket in place of the listener thread."""
        self._watchers: dict[asyncio.AbstractEventLoop, socket.socket] = {}
        """Loops whose selector holds a registration, each of its own duplicate of the
        socket: only that loop unregisters and closes it, so no selector ever holds a
        closed descriptor whose number a new socket could take. (A loop that stopped
        for good keeps its duplicate open: a leak, not a hazard.)"""
        self._lock = threading.Lock()
        """Orders ``attach`` (on a loop) against ``close`` (perhaps on another thread)."""
        if db_path in ("", ":memory:") or not hasattr(socket, "AF_UNIX"):
            return
        self._dir = os.path.realpath(db_path) + "-wake"
        self._name = f"{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self._sock = self._bind()
            self._stop_r, self._stop_w = os.pipe()
            self._thread = threading.Thread(
                target=self._listen, name="tether-sqlite-wakeup", daemon=True
            )
            self._thread.start()
        except Exception as e:  # any failure here only means polling fast, as before
            logger.debug("no cross-process wake-ups for %s, polling instead: %s", db_path, e)
            self._release()

    @property
    def active(self) -> bool:
        return self._sock is not None

    @property
    def poll_interval(self) -> float:
        """Seconds to wait for work before the next ``data_version`` poll."""
        if self._sock is None or time.monotonic() < self._fast_until:
            return self._fast_poll
        return self._slow_poll

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let ``loop`` (the running loop: call this on its thread) watch the socket in
        place of the listener thread, unless a running loop does already."""
        if self._kept_by(loop):
            return
        with self._lock:
            if self._sock is None or self._closing or self._kept_by(loop):
                return
            self._forget_closed_loops()
            if loop not in self._watchers:
                own = self._sock.dup()
                try:
                    loop.add_reader(own, self._take_on_loop, loop, own)
                except Exception as e:  # a loop without add_reader: the thread watches
                    own.close()
                    logger.debug("wake-ups stay with the listener thread: %s", e)
                    return
                self._watchers[loop] = own
            self._loop = loop
            self._nudge()  # the thread stops watching the socket

    def _kept_by(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether the watching stays as it is: ``loop`` watches already, or another
        running loop does (it tells other loops' waiters: ``on_wake`` is thread-safe)."""
        current = self._loop
        return current is loop or (current is not None and current.is_running())

    def polled(self, changed: bool) -> None:
        """The idle poll ran; ``changed``: it found another connection's commit.

        No wake-up since the previous poll means that commit's writer does not tell
        us: poll fast for a while. (A commit polled just before its wake-up arrives
        counts too, harmlessly: it only costs fast polling, the old behaviour.)
        """
        received = self._received
        if changed and received == self._received_at_poll and not self._queued():
            self._fast_until = time.monotonic() + FAST_AFTER_MISS
        self._received_at_poll = received
        if self._owed:
            self._send(0)

    def committed(self, changes: int = 0xFF) -> None:
        """Wake every other store on this database after a commit; the byte sent says
        which kinds of work it made available (a ``Change`` mask)."""
        if self._sock is None:
            return
        try:
            self._refresh_peers()
        except OSError as e:
            logger.debug("cannot list %s: %s", self._dir, e)
        self._send(changes & 0xFF)

    def close(self) -> None:
        with self._lock:
            if self._sock is None or self._closing:
                return
            self._closing = True
            self._loop = None
            watchers = list(self._watchers)
        self._nudge()
        self._thread.join()
        with contextlib.suppress(OSError):
            os.unlink(self._address(self._name))
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)  # only once empty: the last store on the database to close
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop in watchers:
            if loop is running or loop.is_closed():
                self._unwatch(loop)
                continue
            try:  # only that loop may take its duplicate out of its selector
                loop.call_soon_threadsafe(self._unwatch, loop)
            except RuntimeError:  # it closed meanwhile, and its selector with it
                self._unwatch(loop)
        self._release()

    # -- internals ---------------------------------------------------------------
    def _send(self, changes: int) -> None:
        """Send ``changes`` (0: only what is owed) to every peer."""
        for name, sock in list(self._peers.items()):
            mask = changes | self._owed.pop(name, 0)
            if not mask:
                continue
            try:
                sock.sendto(bytes((mask,)), self._address(name))
            except (BlockingIOError, InterruptedError):
                self._owed[name] = mask  # its queue is full: send it with the next one
            except OSError as e:
                if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                    self._forget(name, unlink=e.errno == errno.ECONNREFUSED)
                # Anything else (ENOBUFS: full on macOS; EACCES: another user's store)
                # leaves that peer to its own safety-net poll.

    def _bind(self) -> socket.socket:
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
        attempt = 1
        while True:
            os.makedirs(self._dir, exist_ok=True)
            self._base = self._dir
            if len(os.fsencode(self._dir)) + 1 + _NAME_MAX > _MAX_ADDRESS:
                if not sys.platform.startswith("linux"):
                    raise OSError(f"{self._dir!r} is too long for a Unix socket address")
                self._dir_fd = os.open(self._dir, flags)
                self._base = f"/proc/self/fd/{self._dir_fd}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.bind(self._address(self._name))
                if self._dir_fd < 0:  # opened after bind, so it is the directory we are in
                    self._dir_fd = os.open(self._dir, flags)
                sock.setblocking(False)
                return sock
            except FileNotFoundError:
                # A closing store removed the directory since makedirs: create it again.
                # (Once our socket is in it, it is not empty and stays.)
                sock.close()
                if self._dir_fd >= 0:
                    os.close(self._dir_fd)
                    self._dir_fd = -1
                if attempt == _BIND_ATTEMPTS:
                    raise
                attempt += 1
            except BaseException:
                sock.close()
                raise

    def _address(self, name: str) -> str:
        return f"{self._base}/{name}"

    def _refresh_peers(self) -> None:
        mtime = os.stat(self._dir_fd).st_mtime_ns
        if mtime == self._listed_mtime and not self._listing_racy:
            return
        self._listed_mtime = mtime
        self._listing_racy = time.time_ns() - mtime < _RACY_NS
        names = {n for n in os.listdir(self._dir_fd) if n != self._name and _NAME.fullmatch(n)}
        for name in self._peers.keys() - names:
            self._forget(name, unlink=False)
        for name in names - self._peers.keys():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._peers[name] = sock

    def _forget(self, name: str, unlink: bool) -> None:
        self._peers.pop(name).close()
        self._owed.pop(name, None)
        if unlink:  # nobody is bound to it: its process died without closing
            with contextlib.suppress(OSError):
                os.unlink(self._address(name))

    def _queued(self) -> bool:
        """Whether a wake-up waits unread in the socket (a busy loop has not read it yet)."""
        sock = self._sock
        if sock is None:
            return False
        try:
            return bool(sock.recv(1, socket.MSG_PEEK))
        except OSError:  # (BlockingIOError: nothing queued)
            return False

    def _forget_closed_loops(self) -> None:
        """Close the duplicates of loops that have closed (their selectors are closed
        with them); the caller holds ``_lock``."""
        for loop in [loop for loop in self._watchers if loop.is_closed()]:
            self._watchers.pop(loop).close()

    def _nudge(self) -> None:
        """Make the listener thread look again at what it should watch (or stop)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._stop_w, b"\0")

    def _listen(self) -> None:
        assert self._sock is not None
        sock = self._sock
        watching = False
        with selectors.DefaultSelector() as selector:
            selector.register(self._stop_r, selectors.EVENT_READ)
            while True:
                loop = self._loop
                if loop is not None and not loop.is_running():
                    # That loop has closed or stopped: watch the socket here again (a
                    # stopped loop that runs again stops watching at its next wake-up).
                    with self._lock:
                        if self._loop is loop:
                            self._loop = loop = None
                        self._forget_closed_loops()
                if watching != (loop is None):
                    watching = not watching
                    if watching:
                        selector.register(sock, selectors.EVENT_READ)
                    else:
                        selector.unregister(sock)
                # While a loop watches, look every safety-poll interval whether it still runs.
                ready = selector.select(None if watching else SAFETY_POLL)
                if self._closing:
                    return
                if any(key.fd == self._stop_r for key, _ in ready):
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._stop_r, 64)
                if watching and not self._take(sock):
                    return

    def _take_on_loop(self, loop: asyncio.AbstractEventLoop, own: socket.socket) -> None:
        if self._closing or self._loop is not loop or not self._take(own):
            # Closing, or no longer the loop that watches: stop (else the selector would
            # report the unread socket again at once).
            self._unwatch(loop)

    def _unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop`` (or once it has closed): take its duplicate out of its selector
        and close it."""
        with self._lock:
            own = self._watchers.pop(loop, None)
        if own is None:
            return
        if not loop.is_closed():
            loop.remove_reader(own)
        own.close()

    def _take(self, sock: socket.socket) -> bool:
        """Take every queued wake-up and tell ``on_wake``; False if the socket failed."""
        got = False
        changes = 0
        try:
            while True:  # many commits, one wake-up
                for byte in sock.recv(64):
                    changes |= byte
                got = True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:  # never seen; the safety-net poll takes over
            logger.debug("wake-up socket %s failed: %s", self._name, e)
            return False
        if got:
            self._received += 1
            try:
                self._on_wake(changes)
            except Exception:
                logger.exception("waking the SQLite store's waiters failed")
        return True

    def _release(self) -> None:
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._dir_fd, self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._dir_fd = self._stop_r = self._stop_w = -1
