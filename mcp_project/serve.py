"""Start the hub's web and WebSocket server: `python -m mcp_project.serve <daphne's arguments>`.

This is daphne, run on uvloop's event loop instead of asyncio's own. daphne creates its event
loop when its server module is imported, before it loads the application, so the choice has to
be made here, first. Measured with the direct benchmark (SQLite, alternating runs): 7 to 10%
more messages/s at 5 to 10% less CPU per message; on the latency benchmark p50 fell from about
3.0 to 2.6 ms.

HUB_EVENT_LOOP=asyncio runs on asyncio's own loop, as plain `daphne` does.
"""

import asyncio
import os
import sys


def command(*daphne_arguments: str) -> list[str]:
    """The argument list that starts the server with this interpreter (tests, benchmarks)."""
    return [sys.executable, "-m", "mcp_project.serve", *daphne_arguments]


def install_event_loop() -> str:
    """Make uvloop the event loop daphne will create (unless told otherwise); return its name."""
    if os.environ.get("HUB_EVENT_LOOP", "uvloop") == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:  # a platform uvloop does not build on
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def main() -> None:
    install_event_loop()
    from daphne.cli import CommandLineInterface

    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
