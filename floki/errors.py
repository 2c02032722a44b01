"""The FlokiError tree and the only map from errors to RESP replies.

Owns: every error a client can see, its RESP prefix (Floki's codes QNF/CNF/QAE/CAE/IPA/MPA, or
Redis's ERR/NOAUTH/WRONGPASS) and whether it closes the connection (`fatal`).
Rules:
  1. Code that detects a problem raises a FlokiError subclass; nobody formats `-ERR` by hand.
  2. `to_reply()` is the one place an exception becomes bytes. Anything that is not a FlokiError
     is a bug: the caller logs its traceback and the client gets `-ERR internal error`.
  3. A reply line never contains CR or LF (they would break RESP framing).
"""
from __future__ import annotations


class FlokiError(Exception):
    """Base of every client-visible error. `prefix` is the first word of the RESP error."""
    prefix = "ERR"
    default = "error"
    fatal = False  # True: reply, then close the connection

    def __init__(self, message: str | None = None):
        super().__init__(message or self.default)
        self.message = message or self.default

    def reply_line(self) -> str:
        return f"{self.prefix} {self.message}"


class QueueNotFound(FlokiError):
    prefix, default = "QNF", "Queue Not Found"


class ChannelNotFound(FlokiError):
    prefix, default = "CNF", "Channel Not Found"


class QueueAlreadyExists(FlokiError):
    prefix, default = "QAE", "Queue Already Exists"


class ChannelAlreadyExists(FlokiError):
    prefix, default = "CAE", "Channel Already Exists"


class InvalidParameter(FlokiError):
    prefix, default = "IPA", "Invalid Parameter"


class MissingParameter(FlokiError):
    prefix, default = "MPA", "Missing Parameter"


class UnknownCommand(FlokiError):
    def __init__(self, name: str, args: list[bytes] | tuple = ()):
        shown = " ".join(f"'{_printable(a)}'" for a in args[:8])
        text = f"unknown command '{_printable(name)}', with args beginning with: {shown}"
        super().__init__(text.rstrip() + (" " if args else ""))


class WrongArity(FlokiError):
    def __init__(self, name: str):
        super().__init__(f"wrong number of arguments for '{_printable(name.lower())}' command")


class ProtocolError(FlokiError):
    """Broken framing: the stream cannot be resynchronised, so the connection closes."""
    fatal = True

    def __init__(self, detail: str):
        super().__init__(f"Protocol error: {detail}")


class MessageTooLarge(FlokiError):
    default = "message too large"


class DiskFull(FlokiError):
    default = "disk full"


class StorageIOError(FlokiError):
    default = "I/O error"


class ShardUnavailable(FlokiError):
    default = "shard unavailable, try again"


class ConfigDisagreement(FlokiError):
    """CONFIG GET server found shards running different values (a CONFIG SET that failed on
    some shard after others had applied it)."""
    default = "shards disagree on the server configuration"


class WrongShard(FlokiError):
    default = "queue routed to the wrong shard (frontend and shards disagree on the shard count)"


class NoAuth(FlokiError):
    prefix, default = "NOAUTH", "Authentication required."


class WrongPass(FlokiError):
    prefix, default = "WRONGPASS", "invalid username-password pair or user is disabled."


class TooManyClients(FlokiError):
    fatal = True
    default = "max number of clients reached"


class Denied(FlokiError):
    """Protected mode: no password is set and the client is not on the loopback interface."""
    prefix = "DENIED"
    fatal = True
    default = (
        "Floki is running in protected mode because protected mode is enabled and no password "
        "is set for the default user. In this mode connections are only accepted from the "
        "loopback interface. If you want to connect from external computers to Floki you may "
        "adopt one of the following solutions: 1) Set a password: requirepass = \"...\" in the "
        "[server] table of floki.toml, then restart the server. 2) Disable protected mode: "
        "protected_mode = false in floki.toml, then restart the server; MAKE SURE Floki is not "
        "publicly accessible from internet if you do so. 3) Bind to a loopback address only "
        "(bind = \"127.0.0.1:9797\"). NOTE: You only need to do one of the above things in "
        "order for the server to start accepting connections from the outside.")


class NoProto(FlokiError):
    prefix, default = "NOPROTO", "unsupported protocol version"


class InternalError(FlokiError):
    default = "internal error"


class UnknownSubcommand(FlokiError):
    def __init__(self, command: str, subcommand: str | bytes):
        super().__init__(f"unknown subcommand '{_printable(subcommand)}'. "
                         f"Try {command.upper()} HELP.")


class DbIndexOutOfRange(FlokiError):
    default = "DB index is out of range"


class AuthNotConfigured(FlokiError):
    default = ("AUTH <password> called without any password configured for the default user. "
               "Are you sure your configuration is correct?")


class CommandSyntaxError(FlokiError):
    """Redis's plain `-ERR` for a bad option of a Redis-compatible command (CLIENT, HELLO)."""
    default = "syntax error"


def _printable(value: str | bytes, limit: int = 128) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value[:limit].replace("\r", " ").replace("\n", " ")


def to_reply(exc: BaseException) -> bytes:
    """Returns the RESP error line for `exc` (`-ERR internal error` for non-Floki errors)."""
    if not isinstance(exc, FlokiError):
        exc = InternalError()
    return b"-" + _printable(exc.reply_line(), 4096).encode() + b"\r\n"


def is_fatal(exc: BaseException) -> bool:
    """True when the connection must close after the reply."""
    return isinstance(exc, FlokiError) and exc.fatal
