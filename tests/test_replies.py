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
