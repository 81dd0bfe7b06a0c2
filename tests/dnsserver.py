"""A small authoritative DNS server on loopback for tests, on dnspython's wire format (UDP and TCP).

    from dnsserver import DnsServer, dns_server

    def test_mx(dns_server):
        dns_server.zone = {
            "example.test": {"MX": ["10 mx1.example.test.", "20 mx2.example.test."]},
            "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
            "alias.example.test": {"CNAME": ["mx1.example.test."]},
        }
        dns_server.servfail.add("broken.test")     # answers SERVFAIL
        dns_server.silent.add("slow.test")         # never answers: the client times out
        dns_server.truncate.add("big.test")        # UDP answers truncated: the client retries on TCP
        settings = dns_server.settings(timeout=1)   # pymta.config.model.DnsSettings pointing here

A name in `zone` exists (with no records of a type: an empty answer); any other name is NXDOMAIN. Records
are answered in the order the zone lists them (no round robin). A CNAME
is followed within the zone, as an authoritative server does for its own names. Both sockets share one
free port; `queries` records (transport, name, type) of each question, in order.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from pymta.config.model import DnsSettings

TTL = 300
MAX_CNAME_CHAIN = 8


class DnsServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.zone: dict[str, dict[str, list[str]]] = {}
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.truncate: set[str] = set()
        self.queries: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(20):  # one free port for both: bind UDP on any, then TCP on the same, else again
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            break
        else:
            raise RuntimeError("no free port for both UDP and TCP")
        tcp.listen(16)
        udp.settimeout(0.2)
        tcp.settimeout(0.2)
        self.port = port
        self._udp, self._tcp = udp, tcp
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def settings(self, timeout: float = 2.0) -> DnsSettings:
        return DnsSettings(nameservers=(self.host,), port=self.port, timeout=timeout)

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._udp.close()
        self._tcp.close()

    # -- answering

    def answer(self, wire: bytes, transport: str, limit: int) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((transport, name, rdtype))
        if name in self.silent:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if transport == "udp" and name in self.truncate:
            response.flags |= dns.flags.TC
            return response.to_wire()
        for _ in range(MAX_CNAME_CHAIN):
            records = self.zone.get(name)
            if records is None:
                if not response.answer:  # NXDOMAIN, unless a CNAME led here (then the chain's end is missing)
                    response.set_rcode(dns.rcode.NXDOMAIN)
                break
            if "CNAME" in records and rdtype != "CNAME":
                target = records["CNAME"][0]
                response.answer.append(self._rrset(name, "CNAME", [target]))
                name = target.rstrip(".").lower()
                continue
            if records.get(rdtype):
                response.answer.append(self._rrset(name, rdtype, records[rdtype]))
            break
        wire_out = response.to_wire(want_shuffle=False)  # records in the order the zone lists them
        if transport == "udp" and len(wire_out) > limit:
            response.answer.clear()
            response.flags |= dns.flags.TC
            wire_out = response.to_wire()
        return wire_out

    @staticmethod
    def _rrset(name: str, rdtype: str, values: list[str]) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(dns.name.from_text(name), TTL, dns.rdataclass.IN, rdtype, values)

    # -- transports

    def _serve_udp(self) -> None:
        while not self._stopping.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            limit = 512
            try:
                query = dns.message.from_wire(wire)
                if query.edns >= 0:
                    limit = max(512, query.payload)
            except Exception:
                pass
            reply = self.answer(wire, "udp", limit)
            if reply is not None:
                self._udp.sendto(reply, peer)

    def _serve_tcp(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve_connection, args=(connection,), daemon=True).start()

    def _serve_connection(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(5)
            try:
                while not self._stopping.is_set():
                    header = _read_exactly(connection, 2)
                    if header is None:
                        return
                    wire = _read_exactly(connection, struct.unpack("!H", header)[0])
                    if wire is None:
                        return
                    reply = self.answer(wire, "tcp", 65535)
                    if reply is None:
                        continue  # silent: the client's own timeout ends it
                    connection.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return


def _read_exactly(connection: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    try:
        yield server
    finally:
        server.stop()
