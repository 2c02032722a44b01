"""floki/frontend/handlers.py: the commands the frontend answers itself."""
import hiredis
import pytest

from floki import __version__
from floki import requests as rq
from floki.errors import (AuthNotConfigured, CommandSyntaxError, DbIndexOutOfRange, NoProto,
                          UnknownSubcommand, WrongArity)
from floki.frontend.handlers import Session, answer, client_info_line


def parsed(reply: bytes):
    reader = hiredis.Reader()
    reader.feed(reply)
    return reader.gets()


def test_hello_reply_fields_resp2_and_resp3():
    session = Session(client_id=7)
    flat = parsed(answer(rq.Hello(2, None, None), session))
    assert flat == [b"server", b"floki", b"version", __version__.encode(), b"proto", 2,
                    b"id", 7, b"mode", b"standalone", b"role", b"master", b"modules", []]
    reply = answer(rq.Hello(3, ("default", b"x"), "app"), session)
    assert reply.startswith(b"%7\r\n") and session.protover == 3 and session.name == "app"


@pytest.mark.parametrize("protover", [0, 1, 4])
def test_hello_unsupported_protocol_keeps_the_session(protover):
    session = Session(client_id=1)
    with pytest.raises(NoProto):
        answer(rq.Hello(protover, None, None), session)
    assert session.protover == 2


def test_hello_bad_name_changes_nothing():
    session = Session(client_id=1)
    with pytest.raises(CommandSyntaxError):
        answer(rq.Hello(3, None, "a b"), session)
    assert session.protover == 2 and session.name == ""


def test_ping_echo_select_auth_quit():
    session = Session(client_id=1)
    assert answer(rq.Ping(None), session) == b"+PONG\r\n"
    assert answer(rq.Ping(b"x y"), session) == b"$3\r\nx y\r\n"
    assert answer(rq.Echo(b""), session) == b"$0\r\n\r\n"
    assert answer(rq.Select(0), session) == b"+OK\r\n"
    with pytest.raises(DbIndexOutOfRange):
        answer(rq.Select(3), session)
    with pytest.raises(AuthNotConfigured):
        answer(rq.Auth("default", b"pw"), session)
    assert not session.quit
    assert answer(rq.Quit(), session) == b"+OK\r\n" and session.quit


def test_client_arity_and_options():
    session = Session(client_id=1)
    with pytest.raises(WrongArity, match="client\\|setname"):
        answer(rq.ClientCommand("SETNAME", ()), session)
    with pytest.raises(CommandSyntaxError, match="Unrecognized option 'lib-x'"):
        answer(rq.ClientCommand("SETINFO", (b"LIB-X", b"1")), session)
    with pytest.raises(CommandSyntaxError, match="lib-ver cannot contain"):
        answer(rq.ClientCommand("SETINFO", (b"LIB-VER", b"1 2")), session)
    with pytest.raises(UnknownSubcommand, match="Try CLIENT HELP"):
        answer(rq.ClientCommand("KILL", ()), session)
    assert parsed(answer(rq.ClientCommand("HELP", ()), session))[0].startswith(b"CLIENT")
    assert answer(rq.ClientCommand("SETNAME", (b"",)), session) == b"+OK\r\n"   # clears it
    assert answer(rq.ClientCommand("GETNAME", ()), session) == b"$-1\r\n"


def test_client_info_line():
    session = Session(client_id=4, peer="10.0.0.1:5", local="10.0.0.2:9797", created_s=100.0)
    session.name, session.protover = "w", 3
    assert client_info_line(session, now_s=112.5) == (
        "id=4 addr=10.0.0.1:5 laddr=10.0.0.2:9797 name=w age=12 db=0 resp=3 "
        "lib-name= lib-ver=\n")


def test_command_table_comes_from_the_command_table():
    from floki.commands import COMMANDS
    session = Session(client_id=1)
    names = parsed(answer(rq.CommandInfo("LIST"), session))
    assert sorted(names) == sorted(spec.name.lower().encode() for spec in COMMANDS.values())
    table = {entry[0]: entry[1] for entry in parsed(answer(rq.CommandInfo(""), session))}
    assert table[b"hmset"] == 5 and table[b"hmget"] == -4 and table[b"ping"] == -1
    assert parsed(answer(rq.CommandInfo("COUNT"), session)) == len(COMMANDS)


# --- passwords (issue 4) -----------------------------------------------------------------------

def test_auth_with_a_password_configured():
    from floki.errors import WrongPass
    from floki.frontend.access import Password
    session = Session(client_id=1, password=Password("s3cret"))
    assert session.authenticated is False
    for username, secret in (("default", b"nope"), ("default", b"s3cret "), ("admin", b"s3cret"),
                             ("default", b""), ("default", b"s3cre")):
        with pytest.raises(WrongPass) as exc:
            answer(rq.Auth(username, secret), session)
        assert exc.value.reply_line() == ("WRONGPASS invalid username-password pair or user is "
                                          "disabled.")
        assert session.authenticated is False
    assert answer(rq.Auth("default", b"s3cret"), session) == b"+OK\r\n"
    assert session.authenticated is True
    with pytest.raises(WrongPass):                      # a later failure keeps the session in
        answer(rq.Auth("default", b"x"), session)
    assert session.authenticated is True


def test_hello_authenticates_or_refuses():
    from floki.errors import NoAuth, WrongPass
    from floki.frontend.access import Password
    session = Session(client_id=1, password=Password("pw"))
    with pytest.raises(NoAuth) as exc:
        answer(rq.Hello(3, None, None), session)
    assert str(exc.value).startswith("HELLO must be called with the client already authenticated")
    with pytest.raises(WrongPass):
        answer(rq.Hello(3, ("default", b"bad"), "n"), session)
    assert session.protover == 2 and session.name == "" and not session.authenticated
    assert answer(rq.Hello(3, ("default", b"pw"), "n"), session).startswith(b"%7\r\n")
    assert session.authenticated and session.protover == 3 and session.name == "n"
    assert answer(rq.Hello(2, None, None), session).startswith(b"*14\r\n")   # now allowed


def test_without_a_password_hello_auth_accepts_only_the_default_user():
    from floki.errors import WrongPass
    session = Session(client_id=1)
    assert session.authenticated
    answer(rq.Hello(3, ("default", b"anything"), None), session)
    with pytest.raises(WrongPass):
        answer(rq.Hello(3, ("someone", b"anything"), None), session)
