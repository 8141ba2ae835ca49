"""The load client: agents on WebSockets (and keep-alive HTTP) that time what they see.

Each `*_worker` coroutine runs in a load-client process (see workers.py) and returns a picklable
dict of counts, latency samples (microseconds, as array bytes) and its own CPU use. One connection
is one reader task plus, for senders, one sender task; nothing is spawned per message.

Latency is measured end to end: the sender puts a CLOCK_MONOTONIC timestamp (ns) in the 64-byte
payload and the receiver subtracts it on receipt. At a fixed offered rate the timestamp is the
*scheduled* send time, so a sender held back by a full window still counts the wait.
"""

import asyncio
import contextlib
import random
import time
from array import array

import orjson
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

NS = 1_000_000_000
PAYLOAD_BYTES = 64
_PAD = "x" * PAYLOAD_BYTES
FAR = 1 << 62  # "never", in monotonic nanoseconds
QUIET_S = 3.0  # a drain ends after this long without a new delivery (duration mode)
CONNECT_TIMEOUT = 120.0
CONNECT_ATTEMPTS = 5  # backing off 0.5, 1, 2, 4 s between them


def payload(t: int, n: int) -> dict:
    """Return a payload that serializes to exactly PAYLOAD_BYTES: {"t":..,"n":..,"p":"xx.."}."""
    used = 18 + len(str(t)) + len(str(n))  # the JSON around an empty "p"
    return {"t": t, "n": n, "p": _PAD[: PAYLOAD_BYTES - used]}


def now_ns() -> int:
    return time.monotonic_ns()


async def sleep_until(deadline_ns: int) -> None:
    delay = deadline_ns - time.monotonic_ns()
    if delay > 0:
        await asyncio.sleep(delay / NS)


# --- Connections ----------------------------------------------------------------------------------


async def open_agent(target: dict, agent: dict, *, timeout: float = CONNECT_TIMEOUT):
    """Connect one agent and read its welcome; return the connection."""
    if target["kind"] == "hub":
        uri = target["ws_url"]
        headers = {"Authorization": f"Bearer {agent['access']}"}
    else:
        uri = f"{target['ws_url']}?agent_id={agent['agent_id']}"
        headers = None
    ws = await ws_connect(
        uri,
        additional_headers=headers,
        compression=None,  # daphne does not negotiate it either
        ping_interval=None,  # the protocol's heartbeats are what the idle workload measures
        proxy=None,
        open_timeout=timeout,
        close_timeout=2,
        max_size=1 << 22,
        user_agent_header=None,
    )
    try:
        welcome = orjson.loads(await asyncio.wait_for(ws.recv(decode=False), timeout))
    except BaseException:
        await ws.close()  # a retry must not leave this one open on the server
        raise
    if welcome.get("type") != "welcome":
        await ws.close()
        if welcome.get("code") == "unavailable":
            raise RetryLater(f"{agent['agent_id']}: {welcome.get('detail')}")
        raise RuntimeError(f"{agent['agent_id']}: expected welcome, got {welcome!r}")
    return ws


class RetryLater(Exception):
    """The server refused the session for now (`unavailable`): an agent reconnects later."""


class Connector:
    """Connect agents, `concurrency` handshakes at a time, retrying the way an agent would.

    `retries` counts failed attempts that were tried again; with `tolerate`, an agent that
    fails CONNECT_ATTEMPTS times is None in the result instead of failing the run.
    """

    def __init__(self, target: dict, *, concurrency: int, tolerate: bool = False):
        self.target = target
        self.gate = asyncio.Semaphore(concurrency)
        self.tolerate = tolerate
        self.retries = 0
        self.errors: dict[str, int] = {}

    async def open(self, agents: list[dict]) -> tuple[list, array]:
        """Return the sockets (in order) and the µs each took to open."""
        timings = array("q", bytes(8 * len(agents)))

        async def one(index: int, agent: dict):
            async with self.gate:
                started = now_ns()
                for attempt in range(CONNECT_ATTEMPTS):
                    try:
                        ws = await open_agent(self.target, agent)
                        break
                    except (
                        OSError,
                        InvalidHandshake,
                        TimeoutError,
                        ConnectionClosed,
                        RetryLater,
                    ) as exc:
                        # A full accept backlog or a busy database refuses part of a burst.
                        name = type(exc).__name__
                        self.errors[name] = self.errors.get(name, 0) + 1
                        if attempt == CONNECT_ATTEMPTS - 1:
                            if self.tolerate:
                                return None
                            raise
                        self.retries += 1
                        await asyncio.sleep(0.5 * 2**attempt)
                timings[index] = (now_ns() - started) // 1000
                return ws

        sockets = await asyncio.gather(*(one(i, agent) for i, agent in enumerate(agents)))
        return list(sockets), timings


async def close_all(sockets) -> None:
    for start in range(0, len(sockets), 500):
        await asyncio.gather(
            *(ws.close() for ws in sockets[start : start + 500]), return_exceptions=True
        )


# --- Recording ------------------------------------------------------------------------------------


class Recorder:
    """Counts and latencies of one worker; only events inside [begin_ns, end_ns) are timed."""

    def __init__(self):
        self.begin_ns = FAR
        self.end_ns = FAR
        self.latencies = array("q")  # µs
        self.delivered = 0  # unique deliveries inside the window
        self.delivered_total = 0  # unique deliveries, whole run
        self.duplicates = 0
        self.sent_total = 0
        self.accepted = 0  # inside the window
        self.accepted_total = 0
        self.expected_total = 0  # recipients summed over accepted messages
        self.errors: dict[str, int] = {}
        self.first_receipt_ns = 0
        self.last_receipt_ns = 0

    def set_window(self, begin_ns: int, end_ns: int) -> None:
        self.begin_ns, self.end_ns = begin_ns, end_ns

    def delivery(self, sent_ns: int, at_ns: int) -> None:
        self.delivered_total += 1
        self.last_receipt_ns = at_ns
        if not self.first_receipt_ns:
            self.first_receipt_ns = at_ns
        if self.begin_ns <= at_ns < self.end_ns:
            self.delivered += 1
            self.latencies.append((at_ns - sent_ns) // 1000)

    def accept(self, recipients: int, at_ns: int) -> None:
        self.accepted_total += 1
        self.expected_total += recipients
        if self.begin_ns <= at_ns < self.end_ns:
            self.accepted += 1

    def error(self, code) -> None:
        self.errors[str(code)] = self.errors.get(str(code), 0) + 1

    def result(self) -> dict:
        return {
            "delivered": self.delivered,
            "delivered_total": self.delivered_total,
            "duplicates": self.duplicates,
            "sent_total": self.sent_total,
            "accepted": self.accepted,
            "accepted_total": self.accepted_total,
            "expected_total": self.expected_total,
            "errors": self.errors,
            "first_receipt_ns": self.first_receipt_ns,
            "last_receipt_ns": self.last_receipt_ns,
            "latencies_us": self.latencies.tobytes(),
        }


class Peer:
    """One agent connection: reads every frame, frees send slots, records and acknowledges messages.

    Acks go out as `up_to_seq` once `ack_every` messages are unacknowledged or `ack_delay` seconds
    after the first of them, and never past a gap in `seq`, so a lost message is never acked.
    """

    def __init__(
        self,
        ws,
        recorder: Recorder,
        *,
        window: int = 0,
        ack_every: int = 10,
        ack_delay: float = 0.02,
    ):
        self.ws = ws
        self.rec = recorder
        self.window = window
        self.slots = asyncio.Semaphore(window) if window else None
        self.in_flight = 0
        self.ack_every = ack_every
        self.ack_delay = ack_delay
        self.last_seq = 0
        self.gaps: set[int] = set()
        self.acked_seq = 0
        self.unacked = 0
        self._ack_timer = None
        self._tasks: set[asyncio.Task] = set()
        self.waiters: dict[str, asyncio.Future] = {}
        self.heartbeat_latencies = array("q")
        self.closed = False

    async def read(self) -> None:
        ws, rec, loads, clock = self.ws, self.rec, orjson.loads, time.monotonic_ns
        try:
            while True:
                frame = loads(await ws.recv(decode=False))
                kind = frame["type"]
                if kind == "message":
                    await self._message(frame, clock())
                elif kind == "accepted":
                    self._settle()
                    rec.accept(frame.get("recipients", 1), clock())
                elif kind == "heartbeat_ack":
                    at = clock()
                    ref = frame.get("ref") or ""
                    if ref.startswith("h") and rec.begin_ns <= at < rec.end_ns:
                        self.heartbeat_latencies.append((at - int(ref[1:])) // 1000)
                else:
                    ref = frame.get("ref")
                    if kind == "error":
                        rec.error(frame.get("code"))
                        if ref is not None and ref[:1].isdigit():
                            self._settle()
                    waiter = self.waiters.pop(ref, None) if ref is not None else None
                    if waiter is not None and not waiter.done():
                        waiter.set_result(frame)
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            if self.slots is not None:
                for _ in range(self.window):
                    self.slots.release()  # wake a waiting sender so it sees the close
            for waiter in self.waiters.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("connection closed"))

    def _settle(self) -> None:
        if self.slots is not None:
            self.in_flight -= 1
            self.slots.release()

    async def _message(self, frame: dict, at: int) -> None:
        seq = frame["seq"]
        if seq > self.last_seq:
            if seq > self.last_seq + 1:
                self.gaps.update(range(self.last_seq + 1, seq))
            self.last_seq = seq
            fresh = True
        elif seq in self.gaps:
            self.gaps.discard(seq)
            fresh = True
        else:
            fresh = False
        if fresh:
            self.rec.delivery(frame["payload"]["t"], at)
        else:
            self.rec.duplicates += 1
        if not self.ack_every:
            return
        self.unacked += 1
        if self.unacked >= self.ack_every:
            await self.ack()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(self.ack_delay, self._ack_soon)

    def _ack_soon(self) -> None:
        self._ack_timer = None
        task = asyncio.ensure_future(self.ack())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ack(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        up_to = min(self.gaps) - 1 if self.gaps else self.last_seq
        if up_to > self.acked_seq and not self.closed:
            self.acked_seq = up_to
            self.unacked = 0
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send(orjson.dumps({"type": "ack", "up_to_seq": up_to}), text=True)

    async def request(self, frame: dict, *, timeout: float = 30.0) -> dict:
        """Send a frame with a fresh ref and return the server's answer to it."""
        ref = f"q{id(frame)}-{now_ns()}"
        future = asyncio.get_running_loop().create_future()
        self.waiters[ref] = future
        await self.ws.send(orjson.dumps({**frame, "ref": ref}), text=True)
        return await asyncio.wait_for(future, timeout)


async def send_loop(
    peer: Peer,
    build,
    *,
    start_ns: int,
    stop_ns: int,
    count: int | None = None,
    interval_ns: int = 0,
    phase_ns: int = 0,
) -> None:
    """Send `build(t, n)` frames, at most `window` unaccepted, until stop_ns or `count` are sent.

    With interval_ns, sends are scheduled at a fixed rate and timestamped with the schedule.
    """
    ws, slots, rec, clock = peer.ws, peer.slots, peer.rec, time.monotonic_ns
    n = 0
    scheduled = start_ns + phase_ns
    while not peer.closed:
        if interval_ns:
            await sleep_until(scheduled)
        if slots.locked():
            # The window is full: wait for an answer, but not past the end of the run.
            remaining = (stop_ns - clock()) / NS
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(slots.acquire(), remaining)
            except TimeoutError:
                return
        else:
            await slots.acquire()
        t = scheduled if interval_ns else clock()
        if t >= stop_ns or (count is not None and n >= count):
            slots.release()
            return
        peer.in_flight += 1
        rec.sent_total += 1
        try:
            await ws.send(build(t, n), text=True)
        except ConnectionClosed:
            return
        n += 1
        scheduled += interval_ns


def direct_frame(to: str):
    dumps = orjson.dumps

    def build(t: int, n: int) -> bytes:
        return dumps({"type": "send", "to": to, "payload": payload(t, n), "ref": str(n)})

    return build


def fanout_frame(mode: str, topic: str):
    dumps = orjson.dumps
    if mode == "broadcast":
        return lambda t, n: dumps({"type": "broadcast", "payload": payload(t, n), "ref": str(n)})
    return lambda t, n: dumps(
        {"type": "publish", "topic": topic, "payload": payload(t, n), "ref": str(n)}
    )


async def drain(senders: list[Peer], recorder: Recorder, *, expected=None, timeout: float) -> bool:
    """Wait for every send to be answered and the deliveries they promise to arrive.

    `expected()` gives the number of deliveries this process should see, when every recipient
    is here; without it, wait until nothing new has arrived for QUIET_S. Return whether the
    drain completed before the timeout.
    """
    deadline = now_ns() + int(timeout * NS)
    while now_ns() < deadline:
        answered = all(peer.in_flight <= 0 or peer.closed for peer in senders)
        if expected is not None:
            if answered and recorder.delivered_total >= expected():
                return True
        elif answered and now_ns() - max(recorder.last_receipt_ns, recorder.end_ns) > QUIET_S * NS:
            return True
        await asyncio.sleep(0.05)
    return False


class CpuProbe:
    """This process's CPU use over the measured window, as a fraction of one core."""

    def __init__(self):
        self.value = None

    async def run(self, begin_ns: int, end_ns: int) -> None:
        await sleep_until(begin_ns)
        cpu, wall = time.process_time(), now_ns()
        await sleep_until(end_ns)
        self.value = (time.process_time() - cpu) / max((now_ns() - wall) / NS, 1e-9)


def _window(cfg: dict, start_ns: int) -> tuple[int, int]:
    if cfg.get("messages"):
        return start_ns, FAR
    begin = start_ns + int(cfg["warmup"] * NS)
    return begin, begin + int(cfg["duration"] * NS)


# --- Workloads ------------------------------------------------------------------------------------


async def direct_worker(cfg: dict, ctl) -> dict:
    """Pairs of sender → receiver; windowed (direct) or at a fixed rate per pair (latency)."""
    target, pairs = cfg["target"], cfg["pairs"]
    senders_agents = [sender for sender, _ in pairs]
    receiver_agents = [receiver for _, receiver in pairs]
    connector = Connector(target, concurrency=50)
    sockets, _ = await connector.open(senders_agents + receiver_agents)
    rec = Recorder()
    senders = [Peer(ws, rec, window=cfg["window"]) for ws in sockets[: len(pairs)]]
    receivers = [
        Peer(ws, rec, ack_every=cfg["ack_every"], ack_delay=cfg["ack_delay"])
        for ws in sockets[len(pairs) :]
    ]
    readers = [asyncio.create_task(peer.read()) for peer in senders + receivers]
    await ctl.sync()  # all connected
    await ctl.sync()  # start time published
    start_ns = int(ctl.start_at * NS)
    begin_ns, end_ns = _window(cfg, start_ns)
    rec.set_window(begin_ns, end_ns)
    probe = CpuProbe()
    probe_task = asyncio.create_task(probe.run(begin_ns, end_ns)) if end_ns != FAR else None
    cpu_start = time.process_time()
    rate = cfg.get("rate_per_pair")
    interval = int(NS / rate) if rate else 0
    await sleep_until(start_ns)
    await asyncio.gather(
        *(
            send_loop(
                peer,
                direct_frame(receiver["agent_id"]),
                start_ns=start_ns,
                stop_ns=end_ns,
                count=cfg.get("messages"),
                interval_ns=interval,
                # Spread the pairs' schedules over one interval instead of sending in lockstep.
                phase_ns=(interval * index) // max(len(pairs), 1),
            )
            for index, (peer, receiver) in enumerate(zip(senders, receiver_agents, strict=True))
        )
    )
    drained = await drain(
        senders, rec, expected=lambda: rec.expected_total, timeout=cfg["drain_timeout"]
    )
    for peer in receivers:
        await peer.ack()
    if probe_task is not None:
        await probe_task
    cpu_util = probe.value
    if cpu_util is None:
        cpu_util = (time.process_time() - cpu_start) / max((now_ns() - start_ns) / NS, 1e-9)
    await close_all(sockets)
    for task in readers:
        task.cancel()
    return {
        **rec.result(),
        "start_ns": start_ns,
        "client_cpu_util": cpu_util,
        "drain_complete": drained,
        "connect_retries": connector.retries,
    }


async def fanout_worker(cfg: dict, ctl) -> dict:
    """One sender (in worker 0) broadcasts or publishes; every receiver here records."""
    target = cfg["target"]
    sender_agent = cfg.get("sender")
    agents = ([sender_agent] if sender_agent else []) + cfg["receivers"]
    connector = Connector(target, concurrency=100)
    sockets, _ = await connector.open(agents)
    rec = Recorder()
    offset = 1 if sender_agent else 0
    sender = Peer(sockets[0], rec, window=cfg["window"]) if sender_agent else None
    receivers = [
        Peer(ws, rec, ack_every=cfg["ack_every"], ack_delay=cfg["ack_delay"])
        for ws in sockets[offset:]
    ]
    peers = ([sender] if sender else []) + receivers
    readers = [asyncio.create_task(peer.read()) for peer in peers]
    if cfg["mode"] == "topic":
        gate = asyncio.Semaphore(100)

        async def subscribe(peer: Peer) -> None:
            async with gate:
                answer = await peer.request({"type": "subscribe", "topic": cfg["topic"]})
                if answer.get("type") != "subscribed":
                    raise RuntimeError(f"subscribe failed: {answer!r}")

        await asyncio.gather(*(subscribe(peer) for peer in receivers))
    await ctl.sync()
    await ctl.sync()
    start_ns = int(ctl.start_at * NS)
    begin_ns, end_ns = _window(cfg, start_ns)
    rec.set_window(begin_ns, end_ns)
    probe = CpuProbe()
    probe_task = asyncio.create_task(probe.run(begin_ns, end_ns)) if end_ns != FAR else None
    cpu_start = time.process_time()
    await sleep_until(start_ns)
    if sender is not None:
        await send_loop(
            sender,
            fanout_frame(cfg["mode"], cfg["topic"]),
            start_ns=start_ns,
            stop_ns=end_ns,
            count=cfg.get("messages"),
        )
    senders = [sender] if sender else []
    if cfg.get("messages"):
        # Every receiver gets every message: the expected count is known without the sender.
        expected = cfg["messages"] * len(receivers)
        drained = await drain(senders, rec, expected=lambda: expected, timeout=cfg["drain_timeout"])
    elif sender and cfg["workers"] == 1:
        # Every receiver is here: each gets every accepted message.
        drained = await drain(
            senders,
            rec,
            expected=lambda: rec.accepted_total * len(receivers),
            timeout=cfg["drain_timeout"],
        )
    else:
        await sleep_until(end_ns)
        drained = await drain(senders, rec, timeout=cfg["drain_timeout"])
    for peer in receivers:
        await peer.ack()
    if probe_task is not None:
        await probe_task
    cpu_util = probe.value
    if cpu_util is None:
        cpu_util = (time.process_time() - cpu_start) / max((now_ns() - start_ns) / NS, 1e-9)
    await close_all(sockets)
    for task in readers:
        task.cancel()
    result = rec.result()
    result.update(
        start_ns=start_ns,
        client_cpu_util=cpu_util,
        receivers=len(receivers),
        drain_complete=drained,
        connect_retries=connector.retries,
    )
    return result


async def idle_worker(cfg: dict, ctl) -> dict:
    """Connect many agents, then keep them alive with heartbeats and time the answers."""
    target, agents, warm = cfg["target"], cfg["agents"], cfg["warm"]
    rec = Recorder()
    connector = Connector(target, concurrency=cfg["concurrency"], tolerate=True)
    sockets, _ = await connector.open(agents[:warm])
    await ctl.sync()  # warm connections open: the orchestrator reads the baseline memory
    await ctl.sync()
    connect_started = now_ns()
    more, timings = await connector.open(agents[warm:])
    connect_s = (now_ns() - connect_started) / NS
    failures = sum(ws is None for ws in more)
    sockets += [ws for ws in more if ws is not None]
    peers = [Peer(ws, rec, ack_every=0) for ws in sockets]
    readers = [asyncio.create_task(peer.read()) for peer in peers]
    await ctl.sync()  # all connected: the orchestrator reads memory
    await ctl.sync()  # start time published
    start_ns = int(ctl.start_at * NS)
    begin_ns, end_ns = _window(cfg, start_ns)
    rec.set_window(begin_ns, end_ns)
    probe = CpuProbe()
    probe_task = asyncio.create_task(probe.run(begin_ns, end_ns))

    # Each agent beats once per interval, the agents spread evenly over it.
    interval_ns = int(cfg["heartbeat_interval"] * NS)
    order = list(range(len(peers)))
    random.Random(ctl.index).shuffle(order)
    tick_ns = 10_000_000
    per_tick = max(1, round(len(peers) * tick_ns / interval_ns))
    sent = 0
    position = 0
    next_tick = start_ns
    while next_tick < end_ns:
        await sleep_until(next_tick)
        for _ in range(per_tick):
            peer = peers[order[position]]
            position = (position + 1) % len(order)
            if not peer.closed:
                with contextlib.suppress(ConnectionClosed):
                    await peer.ws.send(
                        orjson.dumps({"type": "heartbeat", "ref": f"h{now_ns()}"}), text=True
                    )
                    sent += 1
        next_tick += tick_ns
    await probe_task
    await asyncio.sleep(0.5)  # the last answers
    closed_early = sum(peer.closed for peer in peers)
    await ctl.sync()  # the orchestrator reads memory and CPU before anyone disconnects
    await close_all(sockets)
    for task in readers:
        task.cancel()
    latencies = array("q")
    for peer in peers:
        latencies.extend(peer.heartbeat_latencies)
    return {
        "connections": len(sockets),
        "connected_in_s": connect_s,
        "connect_failures": failures,
        "connect_retries": connector.retries,
        "connect_errors": connector.errors,
        "connect_latencies_us": timings.tobytes(),
        "heartbeats_sent": sent,
        "heartbeat_latencies_us": latencies.tobytes(),
        "closed_early": closed_early,
        "errors": rec.errors,
        "client_cpu_util": probe.value,
    }


# --- REST -----------------------------------------------------------------------------------------


class HttpConnection:
    """A keep-alive HTTP/1.1 connection that does GETs one at a time."""

    def __init__(self, host: str, port: int, headers: dict):
        self.host, self.port = host, port
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._head_tail = f"Host: {host}:{port}\r\n{extra}\r\n".encode()
        self.reader = self.writer = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        self.writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self._head_tail)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = await self.reader.read()
            await self.close()
        if headers.get(b"connection", b"").lower() == b"close":
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def rest_worker(cfg: dict, ctl) -> dict:
    """`concurrency` keep-alive clients, each doing one discovery GET after another."""
    host, port = cfg["target"]["http"]
    headers = {"Authorization": f"Bearer {cfg['token']}"} if cfg.get("token") else {}
    clients = [HttpConnection(host, port, headers) for _ in range(cfg["concurrency"])]
    for client in clients:
        await client.open()
    # One request up front checks the answer's shape, so a broken server fails loudly.
    status, body = await clients[0].get(cfg["paths"][0])
    if status != 200:
        raise RuntimeError(f"discovery answered {status}: {body[:300]!r}")
    sample = orjson.loads(body)
    await ctl.sync()
    await ctl.sync()
    start_ns = int(ctl.start_at * NS)
    begin_ns, end_ns = _window(cfg, start_ns)
    probe = CpuProbe()
    probe_task = asyncio.create_task(probe.run(begin_ns, end_ns))
    latencies = array("q")
    statuses: dict[str, int] = {}
    rng = random.Random(ctl.index)
    paths = cfg["paths"]

    async def loop(client: HttpConnection) -> None:
        await sleep_until(start_ns)
        while True:
            sent = now_ns()
            if sent >= end_ns:
                return
            status, _ = await client.get(rng.choice(paths))
            done = now_ns()
            if begin_ns <= sent:
                latencies.append((done - sent) // 1000)
                statuses[str(status)] = statuses.get(str(status), 0) + 1

    await asyncio.gather(*(loop(client) for client in clients))
    await probe_task
    for client in clients:
        await client.close()
    return {
        "requests": len(latencies),
        "statuses": statuses,
        "latencies_us": latencies.tobytes(),
        "sample_count": sample.get("count"),
        "sample_results": len(sample.get("results", ())),
        "client_cpu_util": probe.value,
    }
