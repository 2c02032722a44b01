"""Authentication and transport of issue 4 against a real `floki start`: requirepass (AUTH,
HELLO AUTH as redis-py 8 sends it, NOAUTH, WRONGPASS, Redis's pre-auth limits), protected mode,
and TLS with redis-py's `ssl=True` (server certificate, then required client certificates).

Certificates are made per module with the `openssl` command line (skipped without it).
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import hiredis
import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from helpers import FlokiServer, free_port

PASSWORD = "correct horse battery staple"
NO_RETRY = Retry(NoBackoff(), 0)       # an expected refusal is not worth redis-py's retries
NOAUTH = b"-NOAUTH Authentication required.\r\n"
WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"


def resp(*argv: bytes | str) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in argv]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)


def exchange(address: tuple[str, int], data: bytes, replies: int | None = None,
             timeout_s: float = 10.0) -> tuple[list, bool]:
    """Sends `data`; returns (replies parsed, True if the server closed the connection).

    With `replies` None, reads until the server closes (failing after timeout_s)."""
    sock = socket.create_connection(address, timeout=timeout_s)
    reader = hiredis.Reader()
    out, closed = [], False
    try:
        sock.sendall(data)
        while replies is None or len(out) < replies:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            reader.feed(chunk)
            while (value := reader.gets()) is not False:
                out.append(value)
    except ConnectionResetError:
        closed = True
    finally:
        sock.close()
    return out, closed


def with_password(server: FlokiServer, password: str) -> FlokiServer:
    """Makes server.client() (and so wait_ready) authenticate."""
    plain = server.client
    server.client = lambda **kwargs: plain(**{"password": password, **kwargs})
    return server


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    srv = with_password(FlokiServer(tmp_path_factory.mktemp("auth") / "floki", shards=2,
                                    requirepass=PASSWORD), PASSWORD)
    try:
        yield srv.start()
    finally:
        srv.cleanup()


# --- requirepass ------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_authenticates_with_auth_or_hello(auth_server, protocol):
    """redis-py 8 sends `HELLO 3 AUTH default <pw>`; with protocol=2 it sends `AUTH <pw>`."""
    client = auth_server.client(protocol=protocol)
    assert client.ping() is True
    assert client.execute_command("SET", f"q{protocol}", "c")
    assert client.execute_command("RPUSH", f"q{protocol}", "m") == 1
    assert client.execute_command("HMGET", f"q{protocol}", "c", 1)[0][2] == b"m"
    client.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_wrong_or_missing_password_cannot_connect(auth_server, protocol):
    kwargs = {"host": auth_server.host, "port": auth_server.port, "protocol": protocol,
              "retry": NO_RETRY}
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(password="wrong", **kwargs).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(username="admin", password=PASSWORD, **kwargs).ping()
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
        redis.Redis(**kwargs).ping()          # RESP3: HELLO refused; RESP2: PING gets NOAUTH


def test_before_auth_every_command_but_auth_hello_quit_gets_noauth(auth_server):
    address = (auth_server.host, auth_server.port)
    commands = [resp("PING"), resp("RPUSH", "q2", "x"), resp("INFO"), resp("CONFIG", "GET",
                "server"), b"SET q c\r\n", resp("NOSUCHCOMMAND"), resp("CLIENT", "SETNAME", "x"),
                resp("SELECT", "0")]
    replies, closed = exchange(address, b"".join(commands), len(commands))
    assert [str(r) for r in replies] == ["NOAUTH Authentication required."] * len(commands)
    replies, closed = exchange(address, resp("AUTH", "nope") + resp("AUTH", "default", "nope")
                               + resp("HELLO", "3") + resp("AUTH", PASSWORD) + resp("PING")
                               + resp("QUIT"))
    assert [str(r) for r in replies[:3]] == [WRONGPASS[1:-2].decode()] * 2 + [
        "NOAUTH HELLO must be called with the client already authenticated, otherwise the "
        "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
        "select the RESP protocol version at the same time"]
    assert replies[3:] == [b"OK", b"PONG", b"OK"] and closed
    replies, closed = exchange(address, resp("QUIT") + resp("PING"))
    assert replies == [b"OK"] and closed


def test_hello_3_auth_switches_protocol_and_authenticates(auth_server):
    replies, _ = exchange((auth_server.host, auth_server.port),
                          resp("HELLO", "3", "AUTH", "default", PASSWORD, "SETNAME", "me")
                          + resp("CLIENT", "GETNAME"), 2)
    hello, name = replies
    assert hello[b"proto"] == 3 and name == b"me"


@pytest.mark.parametrize("frame,error", [
    (resp(*["x"] * 11), "unauthenticated multibulk length"),
    (b"*2\r\n$4\r\nAUTH\r\n$16385\r\n", "unauthenticated bulk length"),
    (b"*2\r\n$4\r\nECHO\r\n$600000000\r\n", "invalid bulk length"),
])
def test_redis_pre_auth_limits_close_the_connection(auth_server, frame, error):
    replies, closed = exchange((auth_server.host, auth_server.port), frame)
    assert [str(r) for r in replies] == [f"ERR Protocol error: {error}"] and closed


def test_after_auth_the_normal_limits_apply_even_within_the_same_write(auth_server):
    body = b"b" * 100_000
    replies, closed = exchange((auth_server.host, auth_server.port),
                               resp("AUTH", PASSWORD) + resp("SET", "big", "c")
                               + resp("RPUSH", "big", *[b"m"] * 20, body) + resp("QUIT"))
    assert replies == [b"OK", b"OK", 21, b"OK"] and closed


def test_config_get_server_does_not_show_the_password(auth_server):
    client = auth_server.client()
    client.set_response_callback("CONFIG", lambda response, **options: response)
    config = json.loads(client.execute_command("CONFIG", "GET", "server")[0])
    assert config["requirepass"] == "********" and PASSWORD not in json.dumps(config)
    client.close()


# --- protected mode ------------------------------------------------------------------------

def non_loopback_address() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


@pytest.mark.parametrize("overrides,expect_denied", [
    ({}, True),
    ({"requirepass": PASSWORD}, False),
    ({"protected_mode": False}, False),
])
def test_protected_mode_refuses_remote_clients_without_a_password(floki_server, overrides,
                                                                  expect_denied):
    remote = non_loopback_address()
    if remote is None:
        pytest.skip("no non-loopback IPv4 address to connect from")
    server = floki_server(start=False, **overrides)
    server.overrides["bind"] = f"0.0.0.0:{server.port}"
    if "requirepass" in overrides:
        with_password(server, PASSWORD)
    server.start()
    replies, closed = exchange((remote, server.port), resp("PING"), None if expect_denied else 1)
    if expect_denied:
        assert closed and len(replies) == 1
        assert str(replies[0]).startswith("DENIED Floki is running in protected mode because "
                                          "protected mode is enabled and no password is set")
        local, _ = exchange(("127.0.0.1", server.port), resp("PING"), 1)
        assert local == [b"PONG"]                  # the loopback is served
    elif "requirepass" in overrides:
        assert [str(r) for r in replies] == ["NOAUTH Authentication required."]
    else:
        assert replies == [b"PONG"]


# --- TLS -----------------------------------------------------------------------------------------

def openssl(*args) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate it signed."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command line to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.crt", "-days", "2",
            "-subj", "/CN=floki test CA")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                  "extendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", *ec, "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr",
                "-subj", f"/CN=floki test {name}")
        openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.crt", "-CAkey",
                d / "ca.key", "-CAcreateserial", "-out", d / f"{name}.crt", "-days", "2",
                "-extfile", d / f"{name}.ext")
    return d


def tls_settings(certs: Path, **extra) -> dict:
    return dict(tls_port=free_port(), tls_cert_file=str(certs / "server.crt"),
                tls_key_file=str(certs / "server.key"), **extra)


def tls_client(server: FlokiServer, certs: Path, client_cert: bool = False, **kwargs):
    if client_cert:
        kwargs.update(ssl_certfile=str(certs / "client.crt"), ssl_keyfile=str(certs / "client.key"))
    return redis.Redis(host="127.0.0.1", port=server.overrides["tls_port"], ssl=True,
                       ssl_ca_certs=str(certs / "ca.crt"), socket_timeout=10, retry=NO_RETRY,
                       **kwargs)


def test_tls_round_trip_with_redis_py(floki_server, certs):
    server = floki_server(**tls_settings(certs))
    for protocol in (2, 3):
        client = tls_client(server, certs, protocol=protocol)
        assert client.ping() is True
        assert client.execute_command("SET", f"t{protocol}", "c")
        body = bytes(range(256)) * 300
        assert client.execute_command("RPUSH", f"t{protocol}", body) == 1
        assert client.execute_command("HMGET", f"t{protocol}", "c", 1)[0][2] == body
        client.close()
    plain = server.client()                     # the plain port still serves
    assert plain.ping() is True
    plain.close()
    with pytest.raises(redis.ConnectionError):  # a plain client on the TLS port gets nowhere
        redis.Redis(host="127.0.0.1", port=server.overrides["tls_port"], socket_timeout=3,
                    socket_connect_timeout=3, retry=NO_RETRY).ping()
    untrusting = redis.Redis(host="127.0.0.1", port=server.overrides["tls_port"], ssl=True,
                             ssl_cert_reqs="required", socket_timeout=3, retry=NO_RETRY)
    with pytest.raises(redis.ConnectionError):  # a client that does not trust the test CA
        untrusting.ping()


def test_tls_with_required_client_certificates_and_a_password(floki_server, certs):
    server = with_password(floki_server(start=False, requirepass=PASSWORD, **tls_settings(
        certs, tls_ca_cert_file=str(certs / "ca.crt"), tls_auth_clients="yes")), PASSWORD)
    server.start()
    with pytest.raises(redis.ConnectionError):
        tls_client(server, certs, password=PASSWORD).ping()            # no certificate
    with pytest.raises(redis.AuthenticationError):
        tls_client(server, certs, client_cert=True).ping()             # no password
    client = tls_client(server, certs, client_cert=True, password=PASSWORD)
    assert client.ping() is True
    assert client.execute_command("CLIENT", "ID") > 0
    client.close()


def test_unusable_tls_settings_stop_the_server_with_a_boot_error(floki_server, tmp_path):
    server = floki_server(start=False, tls_port=free_port(),
                          tls_cert_file=str(tmp_path / "missing.crt"),
                          tls_key_file=str(tmp_path / "missing.key"))
    server.launch()
    assert server.proc.wait(30) == 3
    assert "cannot serve TLS" in server.log_tail()
