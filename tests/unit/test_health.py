import socket
import threading

import pytest

from floki import cli, health


class FakeFrontend:
    """A listener on 127.0.0.1 that answers each connection with `answer` (None: reads the
    PING and never answers, like a stuck event loop whose kernel still accepts)."""

    def __init__(self, answer: bytes | None):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            self.received.append(conn.recv(100))
            if self.answer is not None:
                conn.sendall(self.answer)
            self.done.wait(10)

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def frontend():
    made = []

    def make(answer):
        made.append(FakeFrontend(answer))
        return made[-1]
    yield make
    for fake in made:
        fake.close()


@pytest.mark.parametrize("answer", [b"+PONG\r\n", b"-NOAUTH Authentication required.\r\n"])
def test_an_answering_frontend_is_healthy(frontend, answer):
    fake = frontend(answer)
    assert health.check_frontend("127.0.0.1", fake.port, 5) is None
    assert fake.received == [health.PING]


@pytest.mark.parametrize("answer,why", [
    (b"-ERR max number of clients reached\r\n", "unexpected answer"),
    (b"+PO", "no answer to PING"),
    (None, "no answer to PING"),
])
def test_a_wrong_or_missing_answer_is_unhealthy(frontend, answer, why):
    fake = frontend(answer)
    assert why in health.check_frontend("127.0.0.1", fake.port, 0.3)


def test_nothing_listening_is_unhealthy():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert "cannot connect" in health.check_frontend("127.0.0.1", port, 1)


@pytest.mark.parametrize("bind,address", [
    ("0.0.0.0:9797", ("127.0.0.1", 9797)), ("*:1", ("127.0.0.1", 1)),
    ("[::]:9797", ("::1", 9797)), ("10.1.2.3:6000", ("10.1.2.3", 6000)),
    ("[::1]:80", ("::1", 80))])
def test_probe_address_checks_a_wildcard_bind_on_the_loopback(bind, address):
    assert health.probe_address(bind) == address


def test_the_command_reads_the_bind_address_from_the_config(frontend, tmp_path, capsys):
    fake = frontend(b"+PONG\r\n")
    toml = tmp_path / "floki.toml"
    toml.write_text(f'[server]\nbind = "0.0.0.0:{fake.port}"\n')
    assert cli.main(["health", "-c", str(toml)]) == 0
    assert capsys.readouterr().out == f"floki health 127.0.0.1:{fake.port}: ok\n"
    fake.close()
    assert cli.main(["health", "-c", str(toml), "--timeout", "0.5"]) == 1
    assert "cannot connect" in capsys.readouterr().err
