"""Group commit and local delivery for the agent sockets of one server process.

Every socket's sends, acknowledgements and "written to the socket" marks wait in one queue. A
writer thread of its own takes everything queued, stores it in one transaction
(`batch.write_batch`) and hands the outcome back to the event loop, which answers each waiter:
under load one commit serves hundreds of frames, with no load a frame waits for nobody. A
recipient whose sockets are on this process gets its frames straight from here; the channel
layer carries only what sockets on other processes must see.

The writer is a thread with a database connection of its own, not a call through
`database_sync_to_async`: it goes on to the next batch as soon as a commit is done, without
waiting for the event loop to hand the batch over, and nothing else queues in front of it in
Channels' shared database thread. On the latency benchmark (SQLite, two runs each) p50 went from
3.4-3.5 to 3.0-3.1 ms; direct throughput did not change beyond noise. On SQLite a checkpointer
thread runs beside it (messaging/wal.py).
"""

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections import deque

from channels.layers import get_channel_layer
from django.db import DEFAULT_DB_ALIAS, close_old_connections, connection, connections

from agents.live import agent_group

from . import batch, wal

logger = logging.getLogger(__name__)

# Sends stored per transaction at most; the rest wait for the next one.
MAX_BATCH_SENDS = 500
# Seconds an idle writer thread waits for work before it ends (and closes its connection).
WRITER_LINGER = 5.0
# Seconds delivered marks and liveness touches wait before they are written, with whatever batch
# runs then; a batch of their own only if none does (latency benchmark, SQLite, three
# alternating runs each: p99 8.3 / 10.0 / 10.9 -> 11.5 / 6.2 / 5.8 ms, p50 2.7 -> 2.2-2.5 ms). A
# closing socket's go at once. Meanwhile an ack of the recipient drops the marks it covers: a
# client that acks within this delay has its deliveries written twice (stored, acked) instead of
# three times (stored, delivered, acked).
RECORD_DELAY = 0.05
# Seconds an acknowledgement nobody waits to hear about may wait for a batch with sends. Short,
# so that an agent that acks and reconnects at once finds it settled; a closing socket's, and
# everything queued when a session opens on this process, go at once.
ACK_DELAY = 0.004
# Seconds between checks that the writer's connection is still usable and young enough while
# batches succeed (each check cost about 25 µs a batch); after a failed batch the next one checks.
CONNECTION_CHECK_INTERVAL = 1.0


class Engine:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)
        # What the writer takes next; the event loop adds to it, the writer thread empties it.
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)
        self._sends: list[tuple[batch.Outgoing, asyncio.Future]] = []
        self._acks: list[tuple[batch.Ack, asyncio.Future]] = []
        self._quiet_acks: list[tuple[batch.Ack, None]] = []
        self._marks: dict[int, list[int]] = {}
        self._touches: dict[int, int] = {}
        self._closing = False
        self._thread: threading.Thread | None = None
        self._wake_pending = False
        # When the queued delivered marks and touches are due to be written.
        self._records_due: float | None = None
        # When the queued quiet acks are due to be written (they also go with any earlier batch).
        self._acks_due: float | None = None
        # Futures of callers waiting for the records queued so far to be committed.
        self._record_waiters: list[asyncio.Future] = []
        # The writer thread's connection, once set up for the writer (SQLite: messaging/wal.py).
        self._configured = None
        # When the writer's connection is next checked (monotonic seconds).
        self._check_due = 0.0
        # Batches whose frames for their own senders wait to be routed (`_answer`).
        self._routes_waiting = 0
        self._remote: deque[tuple[int, list[dict]]] = deque()
        self._remote_task: asyncio.Task | None = None
        self.batches_written = 0
        # The sockets of this process with an agent session, by channel name.
        self.sockets: dict[str, object] = {}
        # Per recipient: [epoch, seq]. Every delivery up to seq is settled, as the acks of its
        # sockets here committed it; an ack up to a seq reads only the deliveries after it.
        # Reset (epoch + 1, seq 0) when a session opens and on every replay: an operator's
        # redelivery of a dead letter makes an older seq pending again, and replays it.
        self._settled: dict[int, list[int]] = {}

    # --- What sockets ask -------------------------------------------------------------------

    def attach(self, consumer) -> None:
        self.sockets[consumer.channel_name] = consumer
        self.forget_settled(consumer.agent.pk)

    def detach(self, consumer) -> None:
        if self.sockets.get(consumer.channel_name) is consumer:
            del self.sockets[consumer.channel_name]

    def send(self, outgoing: batch.Outgoing) -> asyncio.Future:
        """Queue a send; the future gives its `Accepted` after the commit, or the refusal."""
        future = self._loop().create_future()
        with self._lock:
            self._sends.append((outgoing, future))
        self._wake()
        return future

    def ack(self, ack: batch.Ack) -> asyncio.Future:
        """Queue an acknowledgement; the future gives how many deliveries it settled."""
        future = self._loop().create_future()
        self._bound(ack)
        with self._lock:
            self._acks.append((ack, future))
            self._drop_acked_marks(ack)
        self._wake()
        return future

    def ack_quietly(self, ack: batch.Ack) -> None:
        """Queue an acknowledgement nobody waits to hear about, for a batch within ACK_DELAY.

        On its own each one made a batch of its own: at 1,000 messages/s that was one commit for
        the send and one for its ack. A batch that fails loses it, and the messages it settled
        are delivered again: at least once."""
        self._bound(ack)
        with self._lock:
            self._quiet_acks.append((ack, None))
            self._drop_acked_marks(ack)
            sooner = self._due_within("_acks_due", ACK_DELAY)
        if sooner:
            self._wake()

    def forget_settled(self, recipient_id: int) -> None:
        """Let the next acks of this recipient read all its deliveries again (see `_settled`);
        acks queued before do not move the seq known settled once they commit."""
        state = self._settled.setdefault(recipient_id, [0, 0])
        state[0] += 1
        state[1] = 0

    def _bound(self, ack: batch.Ack) -> None:
        """Give an ack up to a seq the seq below which it has nothing to read.

        An ack up to a seq read every delivery of the recipient below it, through an index
        that keeps an entry for each delivery acked before until a vacuum, or through one of
        all its deliveries, whichever the writer's first plan took: 8,454 entries an ack in 15
        seconds of bench direct on PostgreSQL, and growing."""
        if ack.up_to_seq is not None:
            ack.epoch, ack.after_seq = self._settled.setdefault(ack.recipient_id, [0, 0])

    def _settle(self, acks) -> None:
        """Move the seqs known settled on by the committed acks up to a seq: up to the seq,
        but not past what the acking socket had seen (all of it committed, in seq order)."""
        for ack, _ in acks:
            if ack.up_to_seq is None:
                continue
            state = self._settled.get(ack.recipient_id)
            if state is not None and state[0] == ack.epoch:
                state[1] = max(state[1], min(ack.up_to_seq, ack.seen_seq))

    def _drop_acked_marks(self, ack: batch.Ack) -> None:
        """Forget the queued delivered marks an ack settles (lock held): the ack records the
        delivery as well (batch.py)."""
        if ack.up_to_seq is None or not (seqs := self._marks.get(ack.recipient_id)):
            return
        kept = [seq for seq in seqs if seq > ack.up_to_seq]
        if kept:
            self._marks[ack.recipient_id] = kept
        else:
            del self._marks[ack.recipient_id]

    def mark_delivered(self, recipient_id: int, seqs: list[int]) -> None:
        """Record, with a batch within RECORD_DELAY, that these frames were written to a socket."""
        with self._lock:
            self._marks.setdefault(recipient_id, []).extend(seqs)
            sooner = self._due_within("_records_due", RECORD_DELAY)
        if sooner:
            self._wake()

    def touch(self, connection_id: int, agent_id: int) -> None:
        """Record, with a batch within RECORD_DELAY, that a connection and its agent showed
        signs of life."""
        with self._lock:
            self._touches[connection_id] = agent_id
            sooner = self._due_within("_records_due", RECORD_DELAY)
        if sooner:
            self._wake()

    def write_records_now(self) -> asyncio.Future:
        """Store the queued records with the next batch, now; the future is done once they are
        committed (or their batch failed). A socket that closes calls it: its agent's next
        session, here or on another process, reads them; a session that opens here awaits it
        before it reads the agent's backlog."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._records_due is None and self._acks_due is None:
                future.set_result(None)
                return future
            self._records_due = 0.0
            self._record_waiters.append(future)
        self._wake()
        return future

    def _due_within(self, deadline: str, delay: float) -> bool:
        """Move the deadline `deadline` (`_records_due` or `_acks_due`) to within `delay`
        seconds; whether that is sooner than it was (lock held). Only then does the writer need
        waking: otherwise it already waits for an earlier deadline."""
        due = time.monotonic() + delay
        current = getattr(self, deadline)
        if current is not None and current <= due:
            return False
        setattr(self, deadline, due)
        return True

    async def close(self) -> None:
        """Store what is queued, then end the writer thread and close its connection.

        The next frame starts a new writer, with a new connection (shutdown, and tests that
        change the database settings). The writer hands out its last answers before it ends."""
        await asyncio.to_thread(self.stop_writer)

    def stop_writer(self) -> None:
        """`close` for callers outside the event loop: blocks until the writer has ended."""
        with self._lock:
            self._closing = True
            if self._thread is None and self._queued_work():
                self._start_writer()
            thread = self._thread
            self._queued.notify()
        if thread is not None:
            thread.join()
        with self._lock:
            self._closing = False

    # --- The writer ---------------------------------------------------------------------------

    def _wake(self) -> None:
        # Once per turn of the event loop, after it: what the loop read in one turn is stored
        # together even when the writer is idle.
        if not self._wake_pending:
            self._wake_pending = True
            self._loop().call_soon(self._notify_writer)

    def _notify_writer(self) -> None:
        self._wake_pending = False
        with self._lock:
            if self._thread is not None:
                self._queued.notify()
            elif self._queued_work():
                self._start_writer()

    def _start_writer(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hub-writer", daemon=True)
        self._thread.start()

    def _queued_work(self) -> bool:
        return bool(self._sends or self._acks or self._quiet_acks or self._marks or self._touches)

    def _run(self) -> None:
        """The writer thread: store batches while there is work, then linger and end."""
        checkpointer = None
        self._check_due = 0.0
        if connection.vendor == "sqlite" and wal.is_file(connection.settings_dict["NAME"]):
            checkpointer = wal.Checkpointer(connection.settings_dict["NAME"]).start()
        try:
            while batches := self._take():
                self._write(*batches)
        finally:
            if checkpointer is not None:
                checkpointer.stop()
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
            try:
                connection.close()
            except Exception:
                logger.warning("the writer's database connection did not close", exc_info=True)

    def _due(self) -> bool:
        """Whether to write now: a send or an answered ack waits, or quiet acks or the records
        are due."""
        if self._sends or self._acks or self._closing:
            return True
        next_due = self._next_due()
        return next_due is not None and time.monotonic() >= next_due

    def _next_due(self) -> float | None:
        dues = [due for due in (self._records_due, self._acks_due) if due is not None]
        return min(dues) if dues else None

    def _records_taken(self) -> bool:
        """Whether this batch takes the marks and touches (lock held)."""
        return self._closing or (
            self._records_due is not None and time.monotonic() >= self._records_due
        )

    def _take(self):
        """The next batch; None once nothing came for WRITER_LINGER seconds (or on close)."""
        with self._lock:
            while not self._due():
                if (next_due := self._next_due()) is not None:
                    self._queued.wait(next_due - time.monotonic())
                elif not self._queued.wait(WRITER_LINGER) and not self._queued_work():
                    break
            if not self._queued_work():
                self._thread = None
                return None
            sends = self._sends[:MAX_BATCH_SENDS]
            del self._sends[:MAX_BATCH_SENDS]
            acks = self._acks + self._quiet_acks
            self._acks, self._quiet_acks = [], []
            self._acks_due = None
            marks, touches, waiters = {}, {}, []
            if self._records_taken():
                self._records_due = None
                marks, self._marks = self._marks, {}
                touches, self._touches = self._touches, {}
                waiters, self._record_waiters = self._record_waiters, []
        return sends, acks, marks, touches, waiters

    def _write(self, sends, acks, marks, touches, waiters) -> None:
        try:
            now = time.monotonic()
            if now >= self._check_due:
                # A connection that failed or outlived CONN_MAX_AGE is replaced (PITFALLS P10).
                close_old_connections()
                self._check_due = now + CONNECTION_CHECK_INTERVAL
            self._own_checkpoints()
            outcome = batch.write_batch(
                [outgoing for outgoing, _ in sends], [ack for ack, _ in acks], marks, touches
            )
            self.batches_written += 1
        except Exception as exc:
            outcome = exc
            self._check_due = 0.0
        loop = self._loop()
        # A loop that is gone (closed, collected) took everyone waiting with it.
        with contextlib.suppress(AttributeError, RuntimeError):
            loop.call_soon_threadsafe(self._answer, sends, acks, outcome, waiters)

    def _own_checkpoints(self) -> None:
        """On SQLite, leave checkpoints to the checkpointer thread and give the writer's
        connection its cache (messaging/wal.py)."""
        db = connections[DEFAULT_DB_ALIAS]
        if db.vendor != "sqlite":
            return
        db.ensure_connection()
        if db.connection is not self._configured:
            wal.configure_writer(db.connection)
            self._configured = db.connection

    def _answer(self, sends, acks, outcome, waiters=()) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if isinstance(outcome, Exception):
            # Nothing of the batch was stored: every waiter hears why (delivered marks are lost,
            # so those rows stay queued and are replayed: at least once, never lost; a lost
            # touch is made again by a later frame).
            logger.warning("a batch could not be stored", exc_info=outcome)
            for _, future in sends + acks:
                if future is not None and not future.done():
                    future.set_exception(outcome)
            return
        # Recipients that sent nothing in this batch get their frames first, before the senders
        # hear `accepted`, unless an earlier batch's frames still wait to be routed (each
        # recipient's frames go in commit order) or the batch fans out to more recipients than
        # it has sends: a broadcaster's next sends wait for its `accepted` (fan-out on
        # PostgreSQL, hub only: broadcast 15,200-16,531 -> 12,800-13,112 delivered/s with the
        # recipients first).
        first, after = outcome.frames, {}
        if self._routes_waiting or len(outcome.frames) > len(sends):
            first, after = {}, outcome.frames
        else:
            senders = {outgoing.sender.pk for outgoing, _ in sends}
            if not senders.isdisjoint(first):
                first = {key: frames for key, frames in first.items() if key not in senders}
                after = {key: frames for key, frames in outcome.frames.items() if key in senders}
        if first:
            self._route(first, outcome.channels)
        for (_, future), result in zip(sends, outcome.sends, strict=True):
            if future.done():
                continue  # the socket went away while waiting
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        for (_, future), count in zip(acks, outcome.acks, strict=True):
            if future is not None and not future.done():
                future.set_result(count)
        self._settle(acks)
        # After the callbacks those results scheduled: a socket that sent to itself reads its
        # `accepted` before the message, whether it answers from a callback or a task.
        if after:
            self._routes_waiting += 1
            self._loop().call_soon(self._route_after, after, outcome.channels)

    def _route_after(self, frames: dict[int, list[dict]], channels: dict[int, list[str]]) -> None:
        self._routes_waiting -= 1
        self._route(frames, channels)

    def _route(self, frames: dict[int, list[dict]], channels: dict[int, list[str]]) -> None:
        """Hand frames to local sockets; nudge the recipient's group if it has sockets elsewhere."""
        for recipient_id, recipient_frames in frames.items():
            elsewhere = False
            for channel_name in channels.get(recipient_id, ()):
                consumer = self.sockets.get(channel_name)
                if consumer is None:
                    elsewhere = True
                else:
                    consumer.deliver_local(recipient_frames)
            if elsewhere:
                self._remote.append((recipient_id, recipient_frames))
        if self._remote and self._remote_task is None:
            self._remote_task = asyncio.ensure_future(self._nudge_remote())

    async def _nudge_remote(self) -> None:
        """Send the frames for other processes' sockets through the layer, in commit order."""
        layer = get_channel_layer()
        try:
            while self._remote:
                recipient_id, frames = self._remote.popleft()
                try:
                    await layer.group_send(
                        agent_group(recipient_id), {"type": "hub.deliver", "frames": frames}
                    )
                except Exception:
                    # The rows are committed: the recipient's socket catches up or the sweep
                    # replays.
                    logger.warning(
                        "channel layer nudge failed; delivery falls back to replay", exc_info=True
                    )
        finally:
            self._remote_task = None


_engines: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Engine]" = (
    weakref.WeakKeyDictionary()
)


# The last loop asked for, the thread it ran in and its engine: a lookup in _engines builds a weak
# reference each time, and asyncio.get_running_loop() makes a getpid system call on each call
# (Python 3.11, about 0.3 µs; it was called several times for every message).
_current: tuple[weakref.ref, int, Engine] | None = None


def stop_writers() -> None:
    """End every engine's writer thread (between tests, which run an event loop each)."""
    for each in list(_engines.values()):
        each.stop_writer()


def engine() -> Engine:
    """This event loop's engine (one per server process; tests run a loop each)."""
    global _current
    if _current is not None and _current[1] == threading.get_ident():
        loop = _current[0]()
        # One loop runs in a thread at a time: the one that ran here last, if it still runs.
        if loop is not None and loop.is_running():
            return _current[2]  # the server's loop, every time but the first
    loop = asyncio.get_running_loop()
    current = _engines.get(loop)
    if current is None:
        current = _engines[loop] = Engine(loop)
    _current = (weakref.ref(loop), threading.get_ident(), current)
    return current
