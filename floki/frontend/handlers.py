"""The commands the frontend answers itself: PING, ECHO, QUIT, SELECT, AUTH, HELLO, CLIENT, COMMAND.

Owns: each client's connection-level state (`Session`: id, name, protocol version, library info)
and the replies to the requests in floki.requests.FRONTEND_REQUESTS.
Rules:
  1. These are what Redis clients send on connect (redis-py 8 sends `HELLO 3` and drops the
     connection if it fails; redis-cli sends COMMAND DOCS), so each one answers exactly as Redis
     does, down to the error text. No shard is ever asked.
  2. A handler returns the reply bytes or raises a FlokiError; it never writes to a socket.
  3. HELLO switches the protocol of the replies that follow it, its own included.
  4. With a password configured a session starts unauthenticated; AUTH and HELLO ... AUTH
     authenticate it (access.Password: constant time). The connection keeps every other command
     from running until then; HELLO itself refuses to run unauthenticated without its AUTH.
"""
from __future__ import annotations

import time
from typing import Callable

from floki import __version__
from floki import requests as rq
from floki.commands import COMMANDS
from floki.errors import (AuthNotConfigured, CommandSyntaxError, DbIndexOutOfRange, NoAuth,
                          NoProto, UnknownSubcommand, WrongArity, WrongPass)
from floki.frontend.access import DEFAULT_USER, Password
from floki.frontend.resp import (OK, PONG, encode_array, encode_bulk, encode_integer, encode_map,
                                 encode_null, encode_verbatim)

SERVER_NAME = "floki"
SUPPORTED_PROTOCOLS = (2, 3)
HELLO_NOAUTH = ("HELLO must be called with the client already authenticated, otherwise the "
                "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client "
                "and select the RESP protocol version at the same time")

CLIENT_HELP = (
    "CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "GETNAME", "    Return the name of the current connection.",
    "ID", "    Return the ID of the current connection.",
    "INFO", "    Return information about the current client connection.",
    "SETINFO <LIB-NAME|LIB-VER> <value>", "    Set client library name or version.",
    "SETNAME <name>", "    Assign the name <name> to the current connection.",
    "HELP", "    Print this help.",
)
COMMAND_HELP = (
    "COMMAND <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "(no subcommand)", "    Return details about all Floki commands.",
    "COUNT", "    Return the total number of commands in this Floki server.",
    "LIST", "    Return a list of all commands in this Floki server.",
    "INFO", "    Return details about all Floki commands.",
    "DOCS", "    Return documentation details about commands (none: an empty map).",
    "HELP", "    Print this help.",
)


class Session:
    """One client connection's state, as CLIENT and HELLO read and change it."""

    __slots__ = ("client_id", "protover", "name", "lib_name", "lib_ver", "peer", "local",
                 "created_s", "quit", "password", "authenticated")

    def __init__(self, client_id: int, peer: str = "", local: str = "",
                 created_s: float | None = None, password: Password | None = None):
        self.client_id = client_id
        self.protover = 2            # RESP2 until HELLO 3
        self.name = ""               # CLIENT SETNAME / HELLO SETNAME; "" = none
        self.lib_name = ""           # CLIENT SETINFO LIB-NAME
        self.lib_ver = ""            # CLIENT SETINFO LIB-VER
        self.peer = peer             # "ip:port" of the client
        self.local = local           # "ip:port" it connected to
        self.created_s = time.monotonic() if created_s is None else created_s
        self.quit = False            # QUIT seen: close after its +OK
        self.password = password     # the server's requirepass; None: no password (rule 4)
        self.authenticated = password is None


def answer(request: object, session: Session) -> bytes:
    """Returns the reply to a frontend request, in the session's protocol.

    Raises FlokiError (NoProto, DbIndexOutOfRange, AuthNotConfigured, UnknownSubcommand, ...).
    """
    return _HANDLERS[type(request)](request, session)


def _ping(request: rq.Ping, session: Session) -> bytes:
    return PONG if request.message is None else encode_bulk(request.message)


def _echo(request: rq.Echo, session: Session) -> bytes:
    return encode_bulk(request.message)


def _quit(request: rq.Quit, session: Session) -> bytes:
    session.quit = True
    return OK


def _select(request: rq.Select, session: Session) -> bytes:
    if request.db != 0:
        raise DbIndexOutOfRange()
    return OK


def _auth(request: rq.Auth, session: Session) -> bytes:
    if session.password is None:
        raise AuthNotConfigured()
    if not session.password.matches(request.username, request.password):
        raise WrongPass()
    session.authenticated = True
    return OK


def _hello(request: rq.Hello, session: Session) -> bytes:
    protover = session.protover if request.protover is None else request.protover
    if protover not in SUPPORTED_PROTOCOLS:
        raise NoProto()
    if request.auth is not None:
        username, secret = request.auth
        if session.password is not None:
            if not session.password.matches(username, secret):
                raise WrongPass()
            session.authenticated = True
        elif username != DEFAULT_USER:
            raise WrongPass()           # no password: any password of the default user passes
    elif not session.authenticated:
        raise NoAuth(HELLO_NOAUTH)
    if request.setname is not None:
        session.name = _checked_name(request.setname, "Client names")
    session.protover = protover
    return encode_map({
        "server": SERVER_NAME, "version": __version__, "proto": protover,
        "id": session.client_id, "mode": "standalone", "role": "master", "modules": [],
    }, protover)


def _checked_name(value: str | bytes, what: str) -> str:
    """Returns `value` as a client name or library field (printable ASCII, no spaces, as Redis).

    Raises CommandSyntaxError.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if any(not "!" <= ch <= "~" for ch in value):
        raise CommandSyntaxError(f"{what} cannot contain spaces, newlines or special characters.")
    return value


def _client(request: rq.ClientCommand, session: Session) -> bytes:
    sub, args = request.subcommand, request.args
    if sub == "SETNAME":
        if len(args) != 1:
            raise WrongArity("client|setname")
        session.name = _checked_name(args[0], "Client names")
        return OK
    if sub == "GETNAME":
        if args:
            raise WrongArity("client|getname")
        return encode_bulk(session.name) if session.name else encode_null(session.protover)
    if sub == "SETINFO":
        if len(args) != 2:
            raise WrongArity("client|setinfo")
        attr = args[0].decode("utf-8", "replace").lower()
        if attr == "lib-name":
            session.lib_name = _checked_name(args[1], attr)
        elif attr == "lib-ver":
            session.lib_ver = _checked_name(args[1], attr)
        else:
            raise CommandSyntaxError(f"Unrecognized option '{attr}'")
        return OK
    if sub == "ID":
        if args:
            raise WrongArity("client|id")
        return encode_integer(session.client_id)
    if sub == "INFO":
        if args:
            raise WrongArity("client|info")
        return encode_verbatim(client_info_line(session), session.protover)
    if sub == "HELP":
        return _help(CLIENT_HELP)
    raise UnknownSubcommand("CLIENT", sub)


def client_info_line(session: Session, now_s: float | None = None) -> str:
    """Returns the session as one CLIENT INFO / CLIENT LIST line (Redis's field names)."""
    age_s = int((time.monotonic() if now_s is None else now_s) - session.created_s)
    return (f"id={session.client_id} addr={session.peer} laddr={session.local} "
            f"name={session.name} age={age_s} db=0 resp={session.protover} "
            f"lib-name={session.lib_name} lib-ver={session.lib_ver}\n")


def _help(lines: tuple[str, ...]) -> bytes:
    return b"*%d\r\n" % len(lines) + b"".join(b"+%s\r\n" % line.encode() for line in lines)


def _command_entry(name: str) -> bytes:
    """Returns one COMMAND reply entry: name, arity (negative = at least), then empty fields."""
    spec = COMMANDS[name.encode()]
    arity = spec.min_args if spec.max_args == spec.min_args else -spec.min_args
    # [name, arity, flags, first key, last key, step, acl categories, tips, key specs, subcommands]
    return (b"*10\r\n" + encode_bulk(name.lower()) + encode_integer(arity) + b"*0\r\n"
            + b":0\r\n:0\r\n:0\r\n" + b"*0\r\n*0\r\n*0\r\n*0\r\n")


def _command(request: rq.CommandInfo, session: Session) -> bytes:
    sub = request.subcommand
    names = sorted(spec.name for spec in COMMANDS.values())
    if sub in ("", "INFO"):
        # COMMAND INFO answers for every command: the request does not carry the names asked.
        return b"*%d\r\n" % len(names) + b"".join(_command_entry(n) for n in names)
    if sub == "COUNT":
        return encode_integer(len(names))
    if sub == "LIST":
        return encode_array([n.lower() for n in names])
    if sub == "DOCS":
        # An empty map: redis-cli then starts without command hints, and without falling back
        # to `INFO SERVER`.
        return encode_map({}, session.protover)
    if sub == "HELP":
        return _help(COMMAND_HELP)
    raise UnknownSubcommand("COMMAND", sub)


_HANDLERS: dict[type, Callable[[object, Session], bytes]] = {
    rq.Ping: _ping, rq.Echo: _echo, rq.Quit: _quit, rq.Select: _select, rq.Auth: _auth,
    rq.Hello: _hello, rq.ClientCommand: _client, rq.CommandInfo: _command,
}
