"""Python's cyclic garbage collector and thread switching, tuned for a long-running server process.

Measured on the latency benchmark (1,000 messages/s, SQLite): the server's full collections took
about 100 ms each, most of it walking the objects that importing Django, DRF, Channels and the
project leaves behind, which live as long as the process. Each one stalled every socket and the
message writer alike: p99 latency was 62 to 93 ms. Freezing the start-up heap moves those
objects out of the collector's sight (they are still freed by reference counting if ever
dropped); a full collection then walks only what the process has made since, and p99 fell to
about 28 ms.

The first generation is collected after 2,000 net allocations instead of 700: every message
allocates dozens of short-lived containers, most of them freed by reference counting anyway,
and each collection is a pass over all of them. With both changes the direct benchmark used
148 to 189 µs of server CPU per message, against 185 to 218 µs without (two runs each).
A threshold of 20,000 saved no more CPU than that, and each of its collections stalled the
server for 8 to 9 ms (latency benchmark, with checkpoints off the writer's path: p99 10.8-12.9
ms at 20,000, 7.9-8.8 ms at 2,000).

A full collection runs after 100 passes of the middle generation instead of 10, so about as
often as with the 20,000 threshold (every 4 million net allocations): with 10 and 10,000 idle
sockets, whose objects are made after the freeze, the full collections came ten times as often
and the heartbeat p99 of the idle benchmark rose from 60 to 250-313 ms (SQLite); with 100 it is
59 ms, and the latency and direct benchmarks did not change beyond noise.

The interpreter lock changes hands every 0.5 ms instead of 5 ms when two threads want it. The
message writer (messaging/engine.py) gives it up for each statement it sends to the database,
and waited up to a whole interval for it back while the event loop ran: latency benchmark at
1,000 messages/s, p99 on PostgreSQL 18.9-19.9 -> 14.5-14.6 ms, on SQLite 7.7 -> 4.7 ms, p50 on
SQLite 1.9 -> 1.7 ms; direct throughput the same within noise.
"""

import gc
import sys

# (generation 0 allocations, generation 0 passes per generation 1 pass, generation 1 passes per
# full pass): see gc.set_threshold.
SERVING_THRESHOLDS = (2_000, 20, 100)
# Seconds a thread holds the interpreter lock while another waits for it (Python's default: 5 ms).
SERVING_SWITCH_INTERVAL = 0.0005


def tune_for_serving() -> None:
    """Collect once, freeze what start-up made, collect the young generation less often, and
    hand the interpreter lock over sooner."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_THRESHOLDS)
    sys.setswitchinterval(SERVING_SWITCH_INTERVAL)
