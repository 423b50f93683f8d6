"""The raw NATS connection (bus.wire): frame parsing split anywhere, URLs and credentials, and
a real nats-server for the handshake, auth, permissions, restarts, stale connections and close."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import msgspec
import pytest

from bus.identity import load_credential

from bus import Bus, BusConfig, BusUnavailable, ConfigurationError, ConsumerSettings, PermissionDenied
from bus.errors import NoAnswer, NoResponders
from bus.server import ANY_PORT, EmbeddedServer, ServerSettings
from bus.wire import (
    FrameParser,
    ProtocolViolation,
    ServerAddress,
    WireConnection,
    WireSettings,
    header_value,
    parse_headers,
    parse_status,
    parse_url,
    parse_urls,
)
from bus.transport import ConnectionSpec, Transport
from schemas import Delivery, Envelope
from schemas.payloads import Note

from conftest import refused_port, seed_of, wait_for

# -- parsing (no server) ---------------------------------------------------------------------


class _Recorder:
    """Collects what a parser hands out, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def message(self, sid: str):  # type: ignore[no-untyped-def]
        def on_message(subject: bytes, reply: bytes, header: bytes, data: bytes) -> None:
            self.events.append(("msg", sid, subject, reply, header, data))

        return on_message

    def on_ping(self) -> None:
        self.events.append(("ping",))

    def on_pong(self) -> None:
        self.events.append(("pong",))

    def on_info(self, info: dict[str, Any]) -> None:
        self.events.append(("info", info))

    def on_error(self, text: str) -> None:
        self.events.append(("err", text))


_HEADER = b"NATS/1.0\r\nNats-Msg-Id: abc\r\nNats-Batch-Id: b1\r\n\r\n"
_PAYLOAD = b"data with \r\n inside"
_STREAM = b"".join([
    b'INFO {"server_id":"x","headers":true}\r\n',
    b"MSG a.b 1 5\r\nhello\r\n",
    b"MSG a.c 2 _INBOX.r 0\r\n\r\n",
    b"HMSG $JS.x 1 $JS.ACK.S.c.1.2.3.4.5 %d %d\r\n%s%s\r\n" % (
        len(_HEADER), len(_HEADER) + len(_PAYLOAD), _HEADER, _PAYLOAD),
    b"PING\r\n+OK\r\nPONG\r\n",
    b"HMSG _INBOX.z 2 16 16\r\nNATS/1.0 100\r\n\r\n\r\n",
    b"MSG gone 9 3\r\nxyz\r\n",  # an unknown subscription id: dropped
    b"-ERR 'Permissions Violation for Subscription to \"x\"'\r\n",
    b"MSG a.b 1 0\r\n\r\n",
])
_EXPECTED = [
    ("info", {"server_id": "x", "headers": True}),
    ("msg", "one", b"a.b", b"", b"", b"hello"),
    ("msg", "two", b"a.c", b"_INBOX.r", b"", b""),
    ("msg", "one", b"$JS.x", b"$JS.ACK.S.c.1.2.3.4.5", _HEADER, _PAYLOAD),
    ("ping",),
    ("pong",),
    ("msg", "two", b"_INBOX.z", b"", b"NATS/1.0 100\r\n\r\n", b""),
    ("err", 'Permissions Violation for Subscription to "x"'),
    ("msg", "one", b"a.b", b"", b"", b""),
]


def _parser() -> tuple[FrameParser, _Recorder]:
    recorder = _Recorder()
    parser = FrameParser({b"1": recorder.message("one"), b"2": recorder.message("two")}, recorder)
    return parser, recorder


def test_parser_reads_every_frame_kind() -> None:
    """One chunk with every frame the server sends yields each message (subject, reply,
    raw header block, payload) and each control frame, in order; unknown ids are dropped."""
    parser, recorder = _parser()
    parser.feed(_STREAM)
    assert recorder.events == _EXPECTED
    assert parser.buffered == 0


@pytest.mark.parametrize("cut", range(1, len(_STREAM)))
def test_parser_frames_split_at_any_byte(cut: int) -> None:
    """The same bytes cut in two at any position give exactly the same events."""
    parser, recorder = _parser()
    parser.feed(_STREAM[:cut])
    parser.feed(_STREAM[cut:])
    assert recorder.events == _EXPECTED


def test_parser_byte_by_byte() -> None:
    """Fed one byte at a time, the parser still yields every frame once."""
    parser, recorder = _parser()
    for i in range(len(_STREAM)):
        parser.feed(_STREAM[i:i + 1])
    assert recorder.events == _EXPECTED


@pytest.mark.parametrize(
    "garbage",
    [b"MSG a.b 1 notanumber\r\n", b"HMSG a 1 x y\r\n", b"WHAT is this\r\n", b"INFO {not json\r\n",
     b"MSG a 1 " + b"9" * (70 * 1024)],
)
def test_parser_refuses_garbage(garbage: bytes) -> None:
    """Bytes that are not NATS protocol raise ProtocolViolation (a BusUnavailable) instead of
    being misread."""
    parser, _ = _parser()
    with pytest.raises(ProtocolViolation):
        parser.feed(garbage)


def test_a_failing_callback_loses_only_its_message() -> None:
    """A receiver that raises loses that one message; the parser goes on with the next."""
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def flaky(subject: bytes, reply: bytes, header: bytes, data: bytes) -> None:
        if data == b"bad":
            raise RuntimeError("receiver bug")
        seen.append(data)

    parser = FrameParser({b"1": flaky}, _Recorder(), errors.append)
    parser.feed(b"MSG s 1 3\r\nbad\r\nMSG s 1 2\r\nok\r\n")
    assert seen == [b"ok"] and len(errors) == 1


def test_status_and_header_helpers() -> None:
    """Status code and description come from a header block's first line; header values are
    found case-insensitively."""
    block = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 5\r\nNats-Pending-Bytes: 0\r\n\r\n"
    assert parse_status(block) == ("408", "Request Timeout")
    assert parse_status(b"NATS/1.0 503\r\n\r\n") == ("503", "")
    assert parse_status(_HEADER) == ("", "")
    assert parse_status(b"") == ("", "")
    assert header_value(block, "nats-pending-messages") == "5"
    assert header_value(block, "Missing") is None
    assert parse_headers(_HEADER) == {"Nats-Msg-Id": "abc", "Nats-Batch-Id": "b1"}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nats://127.0.0.1:4333", ServerAddress(host="127.0.0.1", port=4333)),
        ("localhost", ServerAddress(host="localhost")),
        ("nats://u:p@h:1", ServerAddress(host="h", port=1, user="u", password="p")),
        ("nats://s3cret@h", ServerAddress(host="h", token="s3cret")),
        ("tls://h:2", ServerAddress(host="h", port=2, tls=True)),
    ],
)
def test_url_parsing(url: str, expected: ServerAddress) -> None:
    """Host, port, TLS and credentials (user/password, or a lone user name as a token, as
    nats-py reads it) come from the URL."""
    assert parse_url(url) == expected


def test_url_lists_and_bad_urls() -> None:
    """A comma-separated list gives each server once, in order; a wrong scheme or an empty
    list is a ConfigurationError."""
    assert [a.port for a in parse_urls("nats://a:1, nats://b:2,nats://a:1")] == [1, 2]
    with pytest.raises(ConfigurationError):
        parse_urls("ws://a:1")
    with pytest.raises(ConfigurationError):
        parse_urls(" , ")


# -- against a real server -------------------------------------------------------------------

_FAST = WireSettings(connect_timeout_s=2.0, reconnect_wait_s=0.05, ping_interval_s=0.2, max_pings_out=2)


def _fast_as(credentials: str) -> WireSettings:
    """_FAST, presenting the test server's admin credential (authorization is on)."""
    return msgspec.structs.replace(_FAST, credential=load_credential(credentials))


async def _server_with(tmp_path: Path, config: str) -> EmbeddedServer:
    conf = tmp_path / "server.conf"
    conf.write_text(f"host: 127.0.0.1\njetstream {{ sync_interval: always }}\n{config}\n")
    server = EmbeddedServer(ServerSettings(
        store_dir=tmp_path / "nats", port=ANY_PORT, monitor_port=None, config_file=conf,
    ))
    await server.start()
    return server


@pytest.fixture
async def auth_server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    """A server with two users: `agent` may not subscribe or publish to `forbidden.>`."""
    server = await _server_with(tmp_path, """
authorization {
  users: [
    {user: admin, password: "pw-admin"}
    {user: agent, password: "pw-agent", permissions: {subscribe: {deny: ["forbidden.>"]}, publish: {deny: ["forbidden.>"]}}}
  ]
}""")
    try:
        yield server
    finally:
        await server.stop()


async def test_messages_with_and_without_headers_arrive_raw(nats_server: EmbeddedServer, admin_credentials: str) -> None:
    """A subscription gets what a nats-py client publishes: subject, reply, the raw header
    block and the payload; frames written on the raw connection reach nats-py subscribers."""
    conn = WireConnection(parse_urls(nats_server.url), name="test", settings=_fast_as(admin_credentials))
    await conn.connect()
    got: list[tuple[bytes, bytes, bytes, bytes]] = []
    conn.subscribe("t.>", lambda *frame: got.append(frame))
    await conn.flush()
    other = await nats.connect(nats_server.url, nkeys_seed_str=seed_of(admin_credentials))
    try:
        echoed: list[bytes] = []

        async def echo(msg: Any) -> None:
            echoed.append(msg.data)

        sub = await other.subscribe("back", cb=echo)
        await other.flush()
        await other.publish("t.one", b"plain", reply="r.1")
        await other.publish("t.two", b"with headers", headers={"Nats-Msg-Id": "m-1", "X": "y"})
        await other.flush()
        await wait_for(lambda: len(got) == 2, what="two messages")
        conn.publish("back", b"from raw")
        await conn.flush()
        await wait_for(lambda: echoed == [b"from raw"], what="a raw publish seen by nats-py")
        await sub.unsubscribe()
    finally:
        await other.close()
        await conn.close()
    assert got[0] == (b"t.one", b"r.1", b"", b"plain")
    subject, reply, header, data = got[1]
    assert (subject, reply, data) == (b"t.two", b"", b"with headers")
    assert parse_headers(header) == {"Nats-Msg-Id": "m-1", "X": "y"}


async def test_unsubscribe_drains_then_stops(nats_server: EmbeddedServer, admin_credentials: str) -> None:
    """After unsubscribe returns, nothing more reaches the callback."""
    conn = WireConnection(parse_urls(nats_server.url), name="test", settings=_fast_as(admin_credentials))
    await conn.connect()
    got: list[bytes] = []
    sid = conn.subscribe("u", lambda s, r, h, d: got.append(d))
    await conn.flush()
    conn.publish("u", b"1")
    await conn.flush()
    await wait_for(lambda: got == [b"1"], what="first message")
    await conn.unsubscribe(sid)
    conn.publish("u", b"2")
    await conn.flush()
    await conn.close()
    assert got == [b"1"]


async def test_user_password_auth(auth_server: EmbeddedServer) -> None:
    """Credentials in the URL are presented; wrong ones are PermissionDenied, not a hang."""
    port = auth_server.settings.port
    good = WireConnection(parse_urls(f"nats://admin:pw-admin@127.0.0.1:{port}"), name="ok", settings=_FAST)
    await good.connect()
    await good.flush()
    await good.close()
    for url in (f"nats://admin:wrong@127.0.0.1:{port}", f"nats://127.0.0.1:{port}"):
        bad = WireConnection(parse_urls(url), name="bad", settings=_FAST)
        with pytest.raises(PermissionDenied):
            await bad.connect()
        await bad.close()


async def test_token_auth(tmp_path: Path) -> None:
    """A token (a URL user name without password) authenticates against a token server."""
    server = await _server_with(tmp_path, 'authorization { token: "t0ken" }')
    try:
        conn = WireConnection(parse_urls(f"nats://t0ken@127.0.0.1:{server.settings.port}"), name="t", settings=_FAST)
        await conn.connect()
        await conn.flush()
        await conn.close()
        wrong = WireConnection(parse_urls(f"nats://nope@127.0.0.1:{server.settings.port}"), name="t", settings=_FAST)
        with pytest.raises(PermissionDenied):
            await wrong.connect()
    finally:
        await server.stop()


async def test_permission_violation_surfaces_on_flush(auth_server: EmbeddedServer) -> None:
    """A subscription the server refuses makes the next flush raise PermissionDenied; the
    connection stays usable."""
    url = f"nats://agent:pw-agent@127.0.0.1:{auth_server.settings.port}"
    conn = WireConnection(parse_urls(url), name="agent", settings=_FAST)
    await conn.connect()
    try:
        conn.subscribe("forbidden.x", lambda *frame: None)
        with pytest.raises(PermissionDenied, match="forbidden"):
            await conn.flush()
        await conn.flush()  # nothing refused since
        assert conn.is_connected
    finally:
        await conn.close()


async def test_requests_on_the_raw_connection(auth_server: EmbeddedServer) -> None:
    """request() returns the first answer's header and data; nobody listening is NoResponders
    at once; an unanswered request is NoAnswer after its timeout; a refused publish is
    PermissionDenied at once; the connection stays usable after each."""
    url = f"nats://admin:pw-admin@127.0.0.1:{auth_server.settings.port}"
    answerer = WireConnection(parse_urls(url), name="answerer", settings=_FAST)
    asker = WireConnection(parse_urls(f"nats://agent:pw-agent@127.0.0.1:{auth_server.settings.port}"),
                           name="agent", settings=_FAST)
    await answerer.connect()
    await asker.connect()
    try:
        answerer.subscribe("svc.echo", lambda _s, reply, _h, data: answerer.publish(reply, b"echo:" + data))
        answerer.subscribe("svc.silent", lambda *frame: None)
        await answerer.flush()
        assert await asker.request("svc.echo", b"hi", timeout_s=5) == (b"", b"echo:hi")
        started = time.perf_counter()
        with pytest.raises(NoResponders, match="svc.nobody"):
            await asker.request("svc.nobody", b"", timeout_s=5)
        assert time.perf_counter() - started < 1.0
        with pytest.raises(NoAnswer, match="svc.silent"):
            await asker.request("svc.silent", b"", timeout_s=0.2)
        started = time.perf_counter()
        with pytest.raises(PermissionDenied, match="forbidden.x"):
            await asker.request("forbidden.x", b"", timeout_s=5)
        assert time.perf_counter() - started < 1.0
        assert await asker.request("svc.echo", b"again", timeout_s=5) == (b"", b"echo:again")
    finally:
        await asker.close()
        await answerer.close()


async def test_no_server_is_bus_unavailable() -> None:
    """Nobody listening: BusUnavailable after trying every server, within the timeout."""
    with refused_port() as first, refused_port() as second:
        conn = WireConnection(parse_urls(f"nats://127.0.0.1:{first},nats://127.0.0.1:{second}"),
                              name="x", settings=_FAST)
        with pytest.raises(BusUnavailable):
            await conn.connect()


async def test_reconnects_after_a_server_restart(nats_server: EmbeddedServer, admin_credentials: str) -> None:
    """When the server restarts, the connection comes back by itself, re-subscribes, counts
    the reconnect, and sends what was written while it was down."""
    conn = WireConnection(parse_urls(nats_server.url), name="r", settings=_fast_as(admin_credentials))
    await conn.connect()
    got: list[bytes] = []
    conn.subscribe("r", lambda s, r, h, d: got.append(d))
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(conn.run())
        await nats_server.stop()
        await wait_for(lambda: not conn.is_connected, what="the loss noticed")
        conn.publish("r", b"written while down")
        await nats_server.start()
        await wait_for(lambda: conn.is_connected, what="reconnected")
        assert conn.reconnects == 1
        conn.publish("r", b"after")
        await conn.flush()
        await wait_for(lambda: got == [b"written while down", b"after"], what="both messages")
        await conn.close()
        await asyncio.wait_for(runner, 2)  # run() ends with close()


async def test_a_stale_connection_is_dropped_and_replaced(nats_server: EmbeddedServer, admin_credentials: str) -> None:
    """A server that stops answering (paused) is detected by unanswered PINGs; the connection
    is replaced once the server answers again."""
    conn = WireConnection(parse_urls(nats_server.url), name="s", settings=_fast_as(admin_credentials))
    await conn.connect()
    pid = nats_server.pid
    assert pid is not None
    async with asyncio.TaskGroup() as tg:
        tg.create_task(conn.run())
        os.kill(pid, signal.SIGSTOP)
        try:
            await wait_for(lambda: not conn.is_connected, timeout_s=5, what="the stale connection dropped")
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_for(lambda: conn.is_connected, timeout_s=10, what="a new connection")
        await conn.flush()
        await conn.close()


async def test_close_is_idempotent_and_final(nats_server: EmbeddedServer, admin_credentials: str) -> None:
    """close() twice is fine; afterwards writes and flushes raise BusUnavailable."""
    conn = WireConnection(parse_urls(nats_server.url), name="c", settings=_fast_as(admin_credentials))
    await conn.connect()
    await conn.close()
    await conn.close()
    with pytest.raises(BusUnavailable):
        conn.publish("x", b"")
    with pytest.raises(BusUnavailable):
        await conn.flush()
    with pytest.raises(BusUnavailable):
        await conn.connect()


async def test_the_transports_raw_connections_carry_the_spec_credentials(auth_server: EmbeddedServer) -> None:
    """A raw connection made by the transport goes to the server the control connection is on,
    with the credentials of the seed URL (a server learned from the cluster has none in its URL)."""
    url = f"nats://admin:pw-admin@127.0.0.1:{auth_server.settings.port}"
    async with Transport(ConnectionSpec.from_urls(url, name="x")) as transport:
        servers = transport.known_servers()
        assert servers[0] == ServerAddress(host="127.0.0.1", port=auth_server.settings.port,
                                           user="admin", password="pw-admin")
        conn = transport.wire("probe")
        await conn.connect()
        await conn.close()


async def test_consumer_engine_on_an_authenticated_server(auth_server: EmbeddedServer) -> None:
    """The consumer engine's own connection authenticates like the bus: envelopes sent to an
    agent are handled and acked on a server that requires a password."""
    url = f"nats://admin:pw-admin@127.0.0.1:{auth_server.settings.port}"
    async with Bus(BusConfig(url=url, name="tester")) as bus:
        texts: list[str] = []

        async def handle(envelope: Envelope[Any], delivery: Delivery) -> None:
            texts.append(envelope.payload.text)

        async with bus.consumer("guarded", handle, settings=ConsumerSettings(report_interval_s=0.01)):
            await bus.send("guarded", Note(text="hello"))
            await wait_for(lambda: texts == ["hello"], what="the message handled")

            async def acked() -> bool:
                info = await bus.js.consumer_info(bus.subjects.stream, "guarded__inbox")
                return info.num_ack_pending == 0 and info.num_pending == 0

            await wait_for(acked, what="acked")


async def test_tls_when_the_server_requires_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that requires TLS gets a TLS handshake after its INFO (verified against the
    default trust store, here pointed at a test CA), and messages flow over it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    server = await _server_with(tmp_path, f'tls {{ cert_file: "{cert}", key_file: "{key}" }}')
    try:
        url = f"nats://127.0.0.1:{server.settings.port}"
        untrusted = WireConnection(parse_urls(url), name="tls", settings=_FAST)
        with pytest.raises(BusUnavailable):
            await untrusted.connect()  # the self-signed certificate is not trusted yet
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        conn = WireConnection(parse_urls(url), name="tls", settings=_FAST)
        await conn.connect()
        got: list[bytes] = []
        conn.subscribe("secure", lambda s, r, h, d: got.append(d))
        conn.publish("secure", b"over tls")
        await conn.flush()
        await wait_for(lambda: got == [b"over tls"], what="a message over TLS")
        assert conn.info.get("tls_required") is True
        await conn.close()
    finally:
        await server.stop()
