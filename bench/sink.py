"""A minimal SMTP sink for benchmarks: answers every command at once and throws messages away.

Fast enough not to be the bottleneck of a Python client (it does no parsing beyond lines), and it answers
pipelined commands in order, as RFC 2920 asks. Counts the messages it accepted. Loopback only.
"""

from __future__ import annotations

import asyncio
import threading

EXTENSIONS = (
    b"250-sink.invalid\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 100000000\r\n250 ENHANCEDSTATUSCODES\r\n"
)


class _SinkProtocol(asyncio.Protocol):
    """One client connection. Replies to everything in one received chunk go out in one write, as a real
    server flushes its output only when its input runs dry: pipelined commands get pipelined replies."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.buffer = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 sink.invalid ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies = []
        while True:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            if self.in_data:
                if line == b".":
                    self.in_data = False
                    self.sink.messages += 1
                    replies.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                replies.append(EXTENSIONS)
            elif verb == b"DATA":
                self.in_data = True
                replies.append(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(replies))
                self.transport.close()
                return
            else:
                replies.append(b"250 2.0.0 Ok\r\n")
        if replies:
            self.transport.write(b"".join(replies))


class Sink:
    """Run with `with Sink() as sink:`; `sink.port` to connect to, `sink.messages` accepted so far."""

    def __init__(self) -> None:
        self.messages = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            self._loop.create_server(lambda: _SinkProtocol(self), "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    def __enter__(self) -> Sink:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def main() -> None:
    """Serve in this process until stdin closes, after printing the port: `python bench/sink.py`."""
    import sys

    with Sink() as sink:
        print(sink.port, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
