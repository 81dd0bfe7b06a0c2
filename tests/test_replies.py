"""The bounded reply reader under a session (`pymta.delivery.smtp.replies.Client`), on a socket pair."""

from __future__ import annotations

import socket

import pytest

from pymta.config.model import Smarthost
from pymta.delivery.smtp import replies

REPLIES = [
    b"250 2.0.0 Ok: queued\r\n",
    b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"250   padded  \r\n",
    b"250 \r\n",
    b"250\r\n",
    b"250-first\r\n250 second\r\n",
    b"421 4.4.2 bye\n",
    b"no code at all\r\n",
    b"25 short\r\n",
    b"2x0 not digits\r\n",
]


@pytest.mark.parametrize("line", REPLIES)
def test_a_reply_already_read_is_taken_as_one_read_from_the_socket(line: bytes) -> None:
    """`Client.getreply` takes a one-line reply that came in an earlier read (a pipelined group) without a
    read of its own (issue 12): what it gives is what a reply read from the socket gives."""

    def client_on(sock: socket.socket) -> replies.Client:
        client = replies.Client(Smarthost(host="127.0.0.1", port=25, security="none"), "client.example")
        client.sock = sock
        return client

    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(line + b"250 after\r\n")
        fresh = client_on(ours)
        from_socket = [fresh.getreply(1), fresh.getreply(1)]
        theirs.sendall(b"250 before\r\n" + line + b"250 after\r\n")
        buffered = client_on(ours)
        assert buffered.getreply(1) == (250, b"before")  # the rest stays in its buffer
        assert [buffered.getreply(1), buffered.getreply(1)] == from_socket
        buffered.sock = fresh.sock = None


def _client(sock: socket.socket, timeout: float = 7) -> replies.Client:
    client = replies.Client(
        Smarthost(host="127.0.0.1", port=25, security="none", timeout=timeout), "client.example"
    )
    sock.settimeout(client.timeout)
    client.sock = sock
    return client


def test_a_reply_read_within_the_sessions_own_timeout_sets_no_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each settimeout is a system call (issue 12): a read that may wait as long as the socket waits, or
    longer (DATA's end), leaves it alone; only a reply's deadline that comes sooner sets it, and sets it
    back after the reply."""
    set_to: list[float | None] = []
    real = socket.socket.settimeout

    def settimeout(sock: socket.socket, value: float | None) -> None:
        set_to.append(value)
        real(sock, value)

    ours, theirs = socket.socketpair()
    with ours, theirs:
        client = _client(ours)
        monkeypatch.setattr(socket.socket, "settimeout", settimeout)
        theirs.sendall(b"250-first\r\n")
        theirs.sendall(b"250 second\r\n354 go ahead\r\n")
        assert client.getreply() == (250, b"first\nsecond")
        assert client.getreply() == (354, b"go ahead")
        theirs.sendall(b"250 queued\r\n")
        assert client.getreply(600) == (250, b"queued")  # as DATA's end waits: longer than the socket
        assert set_to == []
        theirs.sendall(b"250 ok\r\n")
        assert client.getreply(2) == (250, b"ok")  # a shorter limit: set for the read, then set back
        assert set_to == [2, 7]
        assert ours.gettimeout() == 7
        client.sock = None


def test_a_wait_longer_than_the_sockets_timeout_reads_on_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket's own timeout running out within a longer wait is not the end of the reply: it is read
    on; the wait's own end (without a reply) still closes the connection."""
    real = socket.socket.recv
    timeouts = [TimeoutError("timed out")] * 3

    def recv(sock: socket.socket, size: int) -> bytes:
        if timeouts:
            raise timeouts.pop()  # as the socket's timeout does when the server says nothing for a while
        return real(sock, size)

    ours, theirs = socket.socketpair()
    with ours, theirs:
        client = _client(ours)
        monkeypatch.setattr(socket.socket, "recv", recv)
        theirs.sendall(b"250 2.0.0 queued after a while\r\n")
        assert client.getreply(600) == (250, b"2.0.0 queued after a while")
        assert timeouts == []
        client.sock = None

    ours, theirs = socket.socketpair()
    with ours, theirs:
        client = _client(ours, timeout=0.05)
        monkeypatch.setattr(socket.socket, "recv", real)
        with pytest.raises(replies.smtplib.SMTPServerDisconnected, match="unexpectedly closed: timed out$"):
            client.getreply(0.2)  # the server says nothing at all: a few of the socket's timeouts, then out
        assert client.sock is None
