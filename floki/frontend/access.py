"""Who may talk to the frontend: the password, protected mode and the TLS listener's context.

Owns: the checks a client passes before its commands run. The shards trust the frontend, so
these are the only gate.
Rules:
  1. The password is compared in constant time: both sides are hashed (SHA-256, as Redis's ACL
     does) and the digests compared with hmac.compare_digest, so neither the content nor the
     length of the configured password shows in the time an AUTH takes.
  2. Protected mode is Redis's: with protected_mode on and no password, a client that is not on
     the loopback interface gets `-DENIED ...` and is closed. When the listener is bound to a
     loopback address no such client can connect, so no check is made at all.
  3. TLS is the standard library's ssl module; a setting that cannot make a context (missing
     files, a key that does not match, client certificates without a CA) raises ConfigError,
     which stops the frontend with a boot error rather than serving without TLS.
  4. Nothing here runs per command: the password once per AUTH, the rest once per connection.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import ssl

from floki.config import ConfigError, ServerConfig

DEFAULT_USER = "default"            # the only user there is (Redis's name for it)
_LOOPBACK_NAMES = ("localhost",)


class Password:
    """The configured `requirepass`, kept as its digest (rule 1)."""

    __slots__ = ("_digest",)

    def __init__(self, secret: str):
        self._digest = hashlib.sha256(secret.encode()).digest()

    def matches(self, username: str, candidate: bytes) -> bool:
        """True when `username` is the default user and `candidate` is the password."""
        ok = hmac.compare_digest(hashlib.sha256(candidate).digest(), self._digest)
        return ok and username == DEFAULT_USER


def bind_host(bind: str) -> str | None:
    """Returns the host of a `HOST:PORT` bind address (None: every interface)."""
    host = bind.rpartition(":")[0].strip("[]")
    return None if host in ("", "*") else host


def is_loopback(host: str | None) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1, ::ffff:127.x.y.z, "localhost").

    None (every interface) and host names other than localhost are not loopback.
    """
    if not host:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def peer_is_loopback(peername: object) -> bool:
    """True when a transport's `peername` is a loopback address (a UNIX socket counts too)."""
    if isinstance(peername, tuple) and peername:
        return is_loopback(str(peername[0]))
    return isinstance(peername, (str, bytes))     # AF_UNIX: a local client by definition


def protected_mode_applies(config: ServerConfig, bind_host: str | None) -> bool:
    """True when clients must be checked for a loopback address (rule 2)."""
    return config.protected_mode and not config.requirepass and not is_loopback(bind_host)


def tls_context(config: ServerConfig) -> ssl.SSLContext:
    """Returns the server-side context for the TLS listener (rule 3). Raises ConfigError."""
    if not config.tls_cert_file or not config.tls_key_file:
        raise ConfigError("tls_cert_file", config.tls_cert_file,
                          "a certificate file and tls_key_file when tls_port is set")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2      # Redis's default: TLSv1.2 and 1.3
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls_cert_file", config.tls_cert_file,
                          f"a readable PEM certificate matching tls_key_file ({exc})") from None
    if config.tls_ca_cert_file:
        try:
            context.load_verify_locations(cafile=config.tls_ca_cert_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls_ca_cert_file", config.tls_ca_cert_file,
                              f"a readable PEM CA certificate ({exc})") from None
    if config.tls_auth_clients != "no":
        if not config.tls_ca_cert_file:
            raise ConfigError("tls_auth_clients", config.tls_auth_clients,
                              "\"no\" unless tls_ca_cert_file names the CA of the clients")
        context.verify_mode = (ssl.CERT_REQUIRED if config.tls_auth_clients == "yes"
                               else ssl.CERT_OPTIONAL)
    return context
