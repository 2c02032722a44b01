"""floki/frontend/access.py: password check, loopback test, protected mode, TLS contexts."""
import shutil
import ssl
import subprocess

import pytest

from floki.config import ConfigError, ServerConfig
from floki.frontend import access
from floki.frontend.access import Password


def test_password_matches_only_itself_for_the_default_user():
    password = Password("pw")
    assert password.matches("default", b"pw")
    assert not password.matches("default", b"pw\x00")
    assert not password.matches("default", b"PW")
    assert not password.matches("other", b"pw")
    assert Password("é").matches("default", "é".encode())


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.5.6.7", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("LOCALHOST", True), ("192.0.2.2", False), ("::ffff:10.0.0.1", False),
    ("0.0.0.0", False), ("::", False), ("fe80::1%eth0", False), ("example.com", False),
    (None, False), ("", False),
])
def test_is_loopback(host, loopback):
    assert access.is_loopback(host) is loopback


def test_peer_is_loopback_reads_transport_peernames():
    assert access.peer_is_loopback(("127.0.0.1", 5000))
    assert access.peer_is_loopback(("::1", 5000, 0, 0))
    assert not access.peer_is_loopback(("10.1.2.3", 5000))
    assert access.peer_is_loopback("/tmp/floki.sock")          # AF_UNIX
    assert not access.peer_is_loopback(None)


@pytest.mark.parametrize("bind,host", [("127.0.0.1:1", "127.0.0.1"), ("*:1", None), (":1", None),
                                       ("[::1]:1", "::1"), ("0.0.0.0:9797", "0.0.0.0")])
def test_bind_host(bind, host):
    assert access.bind_host(bind) == host


def test_protected_mode_applies_only_without_password_on_a_public_bind():
    public = ServerConfig(bind="0.0.0.0:1")
    assert access.protected_mode_applies(public, "0.0.0.0")
    assert access.protected_mode_applies(public, None)
    assert not access.protected_mode_applies(public, "127.0.0.1")
    assert not access.protected_mode_applies(ServerConfig(requirepass="x"), "0.0.0.0")
    assert not access.protected_mode_applies(ServerConfig(protected_mode=False), "0.0.0.0")


def test_tls_settings_that_cannot_work_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="tls_cert_file"):
        access.tls_context(ServerConfig(tls_port=1))
    with pytest.raises(ConfigError, match="tls_cert_file"):
        access.tls_context(ServerConfig(tls_port=1, tls_cert_file=str(tmp_path / "no.crt"),
                                        tls_key_file=str(tmp_path / "no.key")))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.crt",
                    "-days", "2", "-subj", "/CN=t"], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", d / "s.key", "-out", d / "s.crt",
                    "-days", "2", "-subj", "/CN=s"], check=True, capture_output=True)
    return d


def test_tls_context_modes(certs):
    base = dict(tls_port=1, tls_cert_file=str(certs / "s.crt"), tls_key_file=str(certs / "s.key"))
    assert access.tls_context(ServerConfig(**base)).verify_mode == ssl.CERT_NONE
    with pytest.raises(ConfigError, match="tls_auth_clients"):
        access.tls_context(ServerConfig(**base, tls_auth_clients="yes"))
    with_ca = dict(base, tls_ca_cert_file=str(certs / "ca.crt"))
    assert access.tls_context(ServerConfig(**with_ca, tls_auth_clients="yes")).verify_mode == \
        ssl.CERT_REQUIRED
    assert access.tls_context(ServerConfig(**with_ca, tls_auth_clients="optional")).verify_mode \
        == ssl.CERT_OPTIONAL
    with pytest.raises(ConfigError, match="tls_cert_file"):          # key of another cert
        access.tls_context(ServerConfig(**dict(base, tls_key_file=str(certs / "ca.key"))))
    with pytest.raises(ConfigError, match="tls_ca_cert_file"):
        access.tls_context(ServerConfig(**dict(with_ca, tls_ca_cert_file=str(certs / "s.key"))))


def test_access_and_limit_keys_parse_from_floki_toml_values():
    from floki.config import config_from_dict
    config = config_from_dict({"server": {
        "requirepass": "pw", "protected_mode": "no", "tls_port": 6380,
        "tls_auth_clients": "optional", "max_bulk_len": "1mb", "max_args": 100,
        "max_output_buffer": 0, "timeout": "5m"}})
    assert (config.requirepass, config.protected_mode, config.tls_port) == ("pw", False, 6380)
    assert config.tls_auth_clients == "optional" and config.max_bulk_len == 1024**2
    assert (config.max_args, config.max_output_buffer, config.timeout) == (100, 0, 300.0)
    for key, bad in (("protected_mode", "maybe"), ("tls_port", 70000), ("max_args", 7),
                     ("max_bulk_len", "100b"), ("tls_auth_clients", "sometimes"),
                     ("timeout", "-1s"), ("requirepass", 5)):
        with pytest.raises(ConfigError, match=key):
            config_from_dict({"server": {key: bad}})
