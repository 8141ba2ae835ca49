"""SQLite's write-ahead log, checkpointed beside the message writer instead of inside it.

SQLite copies the log back into the database file (a checkpoint) in whichever connection's
commit finds the log past `wal_autocheckpoint` pages. That was the writer's, every few hundred
milliseconds under load, and the commit that ran it took 12 to 17 ms instead of a fraction of
one: on the latency benchmark (1,000 messages/s) every send queued behind it. The writer's
connection now never checkpoints; a thread of its own, on a connection of its own, checkpoints
in PASSIVE mode, which never blocks the writer (p99 18.2-18.4 -> 12.5-13.0 ms, p50 3.2 -> 2.4).
"""

import logging
import sqlite3
import threading

logger = logging.getLogger(__name__)

# Seconds between checkpoints. The log grows by at most this much of the writer's work.
CHECKPOINT_INTERVAL = 0.1


# The message writer's page cache (64 MB) and memory-mapped reads (up to 256 MB of the file):
# with the longer log between checkpoints, they halved its cost per batch (bench/, direct
# workload). Every connection had them once; the others now keep SQLite's defaults (a 2 MB cache,
# reads through it), since each connection caches what it touches on its own: with 10,000 idle
# sockets the pages of their rows, which the socket's session reads and writes once, held about
# 1 KB of the server's memory per socket (bench idle, SQLite, 15.0 -> 13.9 KB per socket).
WRITER_PRAGMAS = ("PRAGMA cache_size=-65536", "PRAGMA mmap_size=268435456")


def checkpoints_off(connection: sqlite3.Connection) -> None:
    """Let this connection's commits leave checkpoints to a Checkpointer."""
    connection.execute("PRAGMA wal_autocheckpoint=0")


def configure_writer(connection: sqlite3.Connection) -> None:
    """Set up the message writer's own connection: no checkpoints, a large cache, mapped reads."""
    checkpoints_off(connection)
    for pragma in WRITER_PRAGMAS:
        connection.execute(pragma)


def is_file(path) -> bool:
    """Whether a database NAME is a file other connections can open (not in memory)."""
    name = str(path)
    return bool(name) and name != ":memory:" and "mode=memory" not in name


class Checkpointer:
    """A thread that checkpoints the database file's log every CHECKPOINT_INTERVAL seconds."""

    def __init__(self, path):
        self.path = str(path)
        self.checkpoints = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hub-checkpoint", daemon=True)

    def start(self) -> "Checkpointer":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Checkpoint once more and end the thread."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            connection = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        except sqlite3.Error:
            logger.warning("cannot open the database to checkpoint it", exc_info=True)
            return
        try:
            while True:
                stopping = self._stop.wait(CHECKPOINT_INTERVAL)
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error:
                    # Busy or locked this time (another process checkpointing, a migration):
                    # the next turn tries again, and until then the log only grows.
                    logger.debug("checkpoint skipped", exc_info=True)
                if stopping:
                    return
        finally:
            connection.close()
