"""RESP, sans-I/O: request bytes in, argv lists out; reply values in, bytes out.

Owns: framing of client requests (RESP2 arrays of bulk strings, and Redis's inline commands), the
caps on them (`FrameLimits`), and the encoding of every reply the frontend builds itself. No
asyncio, no zmq, no sockets.
Rules:
  1. hiredis builds the argv lists, but it would buffer anything it is fed (a `*4000000000` header
     allocates a list, a `$2000000000` header waits for 2 GB). So a scanner here reads every header
     first, checks it against the caps, and feeds hiredis only frames it has vetted; hiredis never
     sees inline commands, `*0`/`*-1`, or bytes after an error. hiredis is asked for a frame
     (`gets`) only once the scanner has seen all of it: asked to parse a bare `*1000000` header it
     would reserve a million list slots (8 MB), so a declared count commits nothing until its
     elements have arrived (as Redis grows argv as arguments arrive).
  2. The caps and error texts are Redis's (`processMultibulkBuffer`, `processInlineBuffer`):
     a bulk above `max_bulk_bytes` or not a plain integer -> "invalid bulk length"; a count above
     `max_multibulk_length` -> "invalid multibulk length"; an element that is not a bulk ->
     "expected '$', got 'X'"; no newline within 64 KiB -> "too big inline request" / "too big
     mbulk count string" / "too big bulk count string". A command whose declared size passes
     `max_request_bytes` is refused from its headers, before its bytes arrive (h11's cap on an
     incomplete event; Redis's client-query-buffer-limit, 1 GiB).
  3. A protocol error is final: the reader keeps it and ignores later bytes. The stream cannot be
     resynchronised (hiredis clears its buffer on error), so the connection replies and closes.
  4. A partial frame is not an error: the reader waits for more bytes.
  5. The scanner decides every frame boundary and feeds hiredis only array bytes, so the two can
     never disagree. It is never laxer than hiredis (integers as Redis's string2ll: optional '-',
     no '+', no leading zeros, no spaces) and stricter than Redis in one place: a bulk must be
     followed by CRLF (Redis skips two bytes unchecked, then parses a wrong length's leftovers as
     the next command).
  6. A bulk above the server's max_message_size (but at least MIN_DROPPED_ARG_BYTES, so names
     and numbers always pass) and within `max_bulk_bytes` is not a framing error: its body is
     dropped as it arrives (never held), and its command comes out as a MessageTooLarge to
     reply with; the connection lives on. Smaller oversized bodies are held and refused by
     commands.parse with the same error.
  7. Before AUTH the limits are Redis's unauthenticated ones (10 arguments, 16 KiB bulks). The
     commands of one read are scanned before any of them runs, so a limit broken by a command
     that follows an AUTH in the same read is held back (`deferred`): if the AUTH succeeds,
     `set_limits` rescans those bytes with the new limits; if not, the error is final.
  8. Speed never changes an outcome. A header seen before is one lookup among vetted headers,
     and a run of bulks with one header is vetted a byte column at a time, but every check of
     rules 1-7 is still made, in the same order. Fed byte by byte, where neither shortcut can
     apply to a bulk, a stream gives the same commands and the same error as fed whole.
"""

from __future__ import annotations

import re

import hiredis

from floki import reply
from floki.errors import FlokiError, MessageTooLarge, ProtocolError, to_reply

MAX_BULK_BYTES = 512 * 1024**2          # Redis's proto-max-bulk-len default
MAX_MULTIBULK_LENGTH = 1024 * 1024      # Redis's multibulk cap before 7.0
MAX_REQUEST_BYTES = 1024**3             # Redis's client-query-buffer-limit default
MAX_INLINE_BYTES = 64 * 1024            # Redis's PROTO_INLINE_MAX_SIZE

_CRLF = b"\r\n"
_BAD_BULK_END = "bulk data does not end with CRLF"
# Bytes that make an inline line need the quote-aware splitter instead of bytes.split().
_INLINE_SPECIAL = re.compile(rb"[\"'\x00\x0b\x0c]")
_HEX = b"0123456789abcdefABCDEF"
_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_INLINE_BREAK = b" \n\r\t\x00"          # what ends an unquoted inline argument (sdssplitargs)
_SPACE = b" \t\n\r\x0b\x0c"             # C isspace()


def _header_int(raw: bytes) -> int | None:
    """Returns the integer in a `*`/`$` header as Redis's string2ll reads it, or None."""
    if raw.isdigit():
        if (raw[0] == 48 and len(raw) > 1) or len(raw) > 19:
            return None
        return int(raw)
    if raw[:1] == b"-" and raw[1:].isdigit() and raw[1] != 48 and len(raw) <= 20:
        return -int(raw[1:])
    return None


def split_inline(line: bytes) -> list[bytes]:
    """Splits an inline command line as Redis's sdssplitargs does (quotes and escapes).

    Returns the arguments (empty for a blank line). Raises ProtocolError on unbalanced quotes.
    """
    if not _INLINE_SPECIAL.search(line):
        return line.split()
    args: list[bytes] = []
    n = len(line)
    p = 0
    while True:
        while p < n and line[p] in _SPACE:
            p += 1
        if p >= n or line[p] == 0:     # sdssplitargs stops at NUL: the line is a C string
            return args
        current = bytearray()
        in_double = in_single = False
        while True:
            c = line[p] if p < n else 0
            if in_double:
                nxt = line[p + 1] if p + 1 < n else 0
                if (c == 92 and nxt == 120 and p + 3 < n and line[p + 2] in _HEX
                        and line[p + 3] in _HEX):
                    current.append(int(line[p + 2:p + 4], 16))
                    p += 3
                elif c == 92 and nxt:
                    p += 1
                    current.append(_ESCAPES.get(nxt, nxt))
                elif c == 34:
                    after = line[p + 1] if p + 1 < n else 0
                    if after and after not in _SPACE:
                        raise ProtocolError("unbalanced quotes in request")
                    p += 1
                    break
                elif c == 0:
                    raise ProtocolError("unbalanced quotes in request")
                else:
                    current.append(c)
            elif in_single:
                nxt = line[p + 1] if p + 1 < n else 0
                if c == 92 and nxt == 39:
                    p += 1
                    current.append(39)
                elif c == 39:
                    after = line[p + 1] if p + 1 < n else 0
                    if after and after not in _SPACE:
                        raise ProtocolError("unbalanced quotes in request")
                    p += 1
                    break
                elif c == 0:
                    raise ProtocolError("unbalanced quotes in request")
                else:
                    current.append(c)
            elif c in _INLINE_BREAK:
                break
            elif c == 34:
                in_double = True
            elif c == 39:
                in_single = True
            else:
                current.append(c)
            p += 1
        args.append(bytes(current))


PRE_AUTH_MAX_ARGS = 10                  # Redis's limits before AUTH (networking.c)
PRE_AUTH_MAX_BULK_BYTES = 16 * 1024
PRE_AUTH_MAX_REQUEST_BYTES = 1024**2    # implied by the two above; kept as Redis states it
MIN_DROPPED_ARG_BYTES = 64 * 1024       # rule 6 never drops an argument this small
_EMPTY_BULK = b"$0\r\n\r\n"             # what hiredis gets in place of a dropped body (rule 6)

# Headers already vetted, by their exact bytes. A bulk header's key starts with the CRLF that
# ends the bulk before it (b"\r\n$12\r\n") and maps to its step: the bytes from its `$` to the
# end of its body's CRLF (18). A count header maps to the count and its size (b"*3\r\n" ->
# (3, 4)). A hit stands for every syntax check of those bytes, and since a header ends at its
# first CRLF, `data[pos:pos + k]` equal to a key *is* the header at `pos`, whatever k was
# tried (a slice cut short by the end of `data` included). Two tables, so that a count can
# never pass for a bulk header. Limits are checked on every hit, as on a miss: the tables are
# shared by every reader of the process, whatever its limits, and capped (clients choose the
# lengths).
_BULK_STEPS: dict[bytes, int] = {}
_COUNT_HEADERS: dict[bytes, tuple[int, int]] = {}
_MAX_CACHED_HEADERS = 4096
_MIN_RUN = 16              # shorter runs cost less through the general path than by column
_MAX_RUN = 4096            # rows compared per column slice (a longer run is taken in parts)
# A byte repeated, to compare a column of a run with in one call: a header is CRLF, $ and digits.
_COLUMNS_OF = {byte: bytes((byte,)) * _MAX_RUN for byte in b"\r\n$0123456789"}


def _same_bulks(data: bytes, at: int, pattern: bytes, step: int, count: int) -> int:
    """Returns how many of the `count` rows `data[at + i * step:]` (i = 0, 1, ...) start with
    `pattern`, counting from the first row up to the first that does not; at most _MAX_RUN.

    Every row must lie whole in `data` (at + count * step <= len(data)), and `pattern` be the
    start of a row as the scanner sees it: the CRLF ending a bulk, then the next bulk's header
    (`step`: that header, its body and CRLF). Byte j of every row is one strided slice, so a
    run costs len(pattern) slices however many bulks it holds.
    """
    count = min(count, _MAX_RUN)
    for byte in pattern:
        column = data[at:at + count * step:step]
        if not _COLUMNS_OF[byte].startswith(column):
            count = len(column) - len(column.lstrip(bytes((byte,))))   # the first that differs
        at += 1
    return count


class FrameLimits:
    """The caps a RequestReader enforces. One instance is shared by every connection of a
    frontend, so a runtime change (CONFIG SET server.max_message_size) holds from the next read.
    """

    __slots__ = ("max_bulk_bytes", "max_multibulk_length", "max_request_bytes",
                 "max_message_bytes", "max_arg_bytes", "before_auth", "outer")

    def __init__(self, max_bulk_bytes: int = MAX_BULK_BYTES,
                 max_multibulk_length: int = MAX_MULTIBULK_LENGTH,
                 max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_message_bytes: int | None = None):
        self.max_bulk_bytes = max_bulk_bytes
        self.max_multibulk_length = max_multibulk_length
        self.max_request_bytes = max_request_bytes
        self.max_message_bytes = max_bulk_bytes  # see set_max_message_bytes
        self.max_arg_bytes = max_bulk_bytes
        self.before_auth = False                 # rule 7: errors may be deferred
        self.outer: FrameLimits | None = None    # before auth: the limits after it (error texts)
        if max_message_bytes is not None:
            self.set_max_message_bytes(max_message_bytes)

    def set_max_message_bytes(self, max_message_bytes: int) -> None:
        """Sets the server's max_message_size, and from it the size above which an argument is
        dropped and its command refused (rule 6).

        That size is kept at most max_bulk_bytes, so the scanner makes one comparison per bulk.
        """
        self.max_message_bytes = max_message_bytes
        self.max_arg_bytes = min(max(max_message_bytes, MIN_DROPPED_ARG_BYTES),
                                 self.max_bulk_bytes)

    @classmethod
    def before_auth_of(cls, outer: "FrameLimits") -> "FrameLimits":
        """Returns Redis's unauthenticated limits for a connection that will have `outer` once
        authenticated (rule 7)."""
        limits = cls(min(PRE_AUTH_MAX_BULK_BYTES, outer.max_bulk_bytes),
                     min(PRE_AUTH_MAX_ARGS, outer.max_multibulk_length),
                     min(PRE_AUTH_MAX_REQUEST_BYTES, outer.max_request_bytes))
        # No bulk is dropped before auth (nothing but AUTH, HELLO and QUIT may run), so hiredis
        # never holds a byte of a frame that a deferred error may have to rescan.
        limits.before_auth = True
        limits.outer = outer
        return limits

    def bulk_error(self, length: int) -> ProtocolError:
        if self.outer is not None and length <= self.outer.max_bulk_bytes:
            return ProtocolError("unauthenticated bulk length")
        return ProtocolError("invalid bulk length")

    def multibulk_error(self, count: int | None) -> ProtocolError:
        if self.outer is not None and count is not None and \
                count <= self.outer.max_multibulk_length:
            return ProtocolError("unauthenticated multibulk length")
        return ProtocolError("invalid multibulk length")


class _Refused:
    """Ready-list marker of a command refused by rule 6: its hiredis array is read and dropped."""

    __slots__ = ("error",)

    def __init__(self, error: FlokiError):
        self.error = error


class RequestReader:
    """Turns a client's byte stream into argv lists (lists of bytes, argv[0] the command name).

    Use: `feed(data)` each time bytes arrive, then `commands()` until it returns [].
    """

    __slots__ = ("limits", "_hiredis", "_carry", "_elements", "_skip", "_last_byte",
                 "_frame_bytes", "_marker", "_discard", "_ready", "_error", "_deferred",
                 "_guesses")

    def __init__(self, limits: FrameLimits | None = None):
        self.limits = limits if limits is not None else FrameLimits()
        self._hiredis = hiredis.Reader()
        self._carry = b""        # an unterminated header or inline line, not yet fed to hiredis
        self._elements = 0       # bulk headers still expected in the current array (0: between)
        self._skip = 0           # body bytes (+ CRLF) of the current bulk still to come
        self._last_byte = 0      # last byte of a feed that ended inside a body (its CR, maybe)
        self._frame_bytes = 0    # declared size of the current array so far (headers + bodies)
        self._marker = None      # the current array's ready entry: None, or a _Refused
        self._discard = False    # the body being skipped is dropped, not fed (rule 6)
        self._ready: list = []   # complete commands not yet returned, in order
        self._error: ProtocolError | None = None
        self._deferred: ProtocolError | None = None   # rule 7; `_carry` holds its frame
        self._guesses = (4, 4)   # sizes of the last bulk and count headers (a speed hint only)

    @property
    def failed(self) -> bool:
        """True once a protocol error was found (it is raised after the commands before it)."""
        return self._error is not None

    def commands(self) -> list:
        """Returns the complete commands fed so far, in order; [] means "need more bytes".

        Each entry is an argv, or a FlokiError to reply with in that command's place (rule 6).
        Raises ProtocolError once every command before the broken bytes has been returned.
        """
        ready = self._ready
        if ready:
            self._ready = []
            return ready
        if self._error is not None:
            raise self._error
        if self._deferred is not None:      # rule 7: the commands before it did not lift it
            self._error, self._deferred, self._carry = self._deferred, None, b""
            raise self._error
        return ready

    def set_limits(self, limits: FrameLimits) -> None:
        """Applies `limits` to the bytes not scanned yet, and to a frame held back by rule 7."""
        self.limits = limits
        if self._deferred is not None:
            self._deferred = None
            data, self._carry = self._carry, b""
            self.feed(data)

    def feed(self, data: bytes) -> None:
        """Takes the next bytes of the stream. Never raises: errors surface in `commands()`."""
        if self._error is not None or not data:
            return
        if self._carry:
            data = self._carry + data
            self._carry = b""
        if self._deferred is not None:
            self._carry = data
            return
        try:
            self._scan(data)
        except ProtocolError as exc:
            self._error = exc
        # hiredis holds every vetted frame; fetch them where the scanner left their markers
        # (None: an array; a _Refused: an array to drop, rule 6; a list: an inline argv).
        ready = self._ready
        gets = self._hiredis.gets
        try:
            for i, item in enumerate(ready):
                if item is None:
                    ready[i] = gets()
                elif item.__class__ is _Refused:
                    gets()
                    ready[i] = item.error
        except hiredis.ProtocolError as exc:  # unreachable while rule 5 holds; never resync
            del ready[i:]
            self._error = ProtocolError(str(exc))

    def _scan(self, data: bytes) -> None:
        """Walks the headers of `data`, appending inline argvs and a marker per array to `_ready`.

        Feeds hiredis every byte of the arrays it vetted, up to the first broken header.
        Raises ProtocolError.
        """
        # The hot path. Bodies are skipped by arithmetic, never read. A bulk header seen before
        # is one dict lookup (_BULK_STEPS), and a run of bulks with one header is vetted a
        # column at a time (_same_bulks). Locals instead of attributes: every bytecode counts.
        n = len(data)
        start = 0          # first byte not yet fed to hiredis
        ready = self._ready
        limits = self.limits
        elements = self._elements
        frame_bytes = self._frame_bytes
        marker = self._marker
        max_arg = limits.max_arg_bytes           # <= max_bulk_bytes
        max_request = limits.max_request_bytes
        max_count = limits.max_multibulk_length
        frame_start = -1   # where the current command began in `data`; -1: in an earlier feed
        pos = self._skip   # finish the body a previous feed ended in
        if pos:
            if pos > n:
                self._skip = pos - n
                self._last_byte = data[-1]
                if not self._discard:
                    self._hiredis.feed(data)
                return
            self._skip = 0
            if data[pos - 1] != 10 or (data[pos - 2] if pos >= 2 else self._last_byte) != 13:
                raise ProtocolError(_BAD_BULK_END)
            if self._discard:
                self._discard = False
                start = pos
            if not elements:
                ready.append(marker)
        find = data.find
        startswith = data.startswith
        counts = _COUNT_HEADERS
        bulk_steps = _BULK_STEPS
        # The size of the last bulk header (most are as long as the one before), and of the
        # last count header. Hints for the lookups only: any size tried gives the same result.
        guess, count_guess = self._guesses
        last_step = 0      # the step of the last bulk (header, body, CRLF)
        runs = True        # whether runs of one header are worth looking for in this array
        try:
            while pos < n:
                if not elements:
                    frame_start = pos
                    if data[pos] != 42:             # b"*"
                        # An inline command: one line split on blanks (telnet's form).
                        if start < pos:
                            self._hiredis.feed(data, start, pos - start)
                        start = pos
                        eol = find(b"\n", pos)
                        if eol < 0:
                            if n - pos > MAX_INLINE_BYTES:
                                raise ProtocolError("too big inline request")
                            break
                        end = eol - 1 if eol > pos and data[eol - 1] == 13 else eol
                        argv = split_inline(data[pos:end])
                        if argv:
                            ready.append(argv)
                        pos = start = eol + 1
                        continue
                    known = counts.get(data[pos:pos + count_guess])
                    if known is None:                   # the checks, in Redis's order
                        eol = find(_CRLF, pos)
                        if eol < 0:
                            if n - pos > MAX_INLINE_BYTES:
                                raise ProtocolError("too big mbulk count string")
                            break
                        count = _header_int(data[pos + 1:eol])
                        if count is None or count > max_count:
                            raise limits.multibulk_error(count)
                        count_guess = eol + 2 - pos
                        if len(counts) < _MAX_CACHED_HEADERS:
                            counts[data[pos:eol + 2]] = (count, count_guess)
                    else:
                        count, size = known
                        if count > max_count:
                            raise limits.multibulk_error(count)
                        eol = pos + size - 2
                    if count <= 0:                        # ignored, as Redis does
                        if start < pos:
                            self._hiredis.feed(data, start, pos - start)
                        pos = start = eol + 2
                        continue
                    frame_bytes = eol - pos + 2
                    elements = count
                    marker = None
                    pos = eol + 2
                    last_step = 0
                    runs = True
                # Inside an array: `elements` bulk headers still expected. The CRLF ending a bulk
                # is checked with the next header (a key of _BULK_STEPS starts with it), or after
                # this loop when no header follows: so in the same order as one by one.
                while elements and pos < n:
                    step = bulk_steps.get(data[pos - 2:pos + guess])
                    if step is None:                    # the checks, in Redis's order
                        if pos >= 2 and (data[pos - 1] != 10 or data[pos - 2] != 13):
                            raise ProtocolError(_BAD_BULK_END)
                        if data[pos] != 36:             # b"$"
                            raise ProtocolError(f"expected '$', got '{chr(data[pos])}'")
                        eol = find(_CRLF, pos)
                        if eol < 0:
                            if n - pos > MAX_INLINE_BYTES:
                                raise ProtocolError("too big bulk count string")
                            break
                        if eol - pos > 20:                # 19 digits at most (int64)
                            raise ProtocolError("invalid bulk length")
                        raw = data[pos + 1:eol]
                        if not raw.isdigit() or (raw[0] == 48 and eol - pos > 2):
                            raise ProtocolError("invalid bulk length")   # also negative: `$-1`
                        guess = eol + 2 - pos
                        step = guess + int(raw) + 2
                        if len(bulk_steps) < _MAX_CACHED_HEADERS:
                            bulk_steps[_CRLF + data[pos:eol + 2]] = step
                    frame_bytes += step
                    if step > max_arg:                    # so maybe length > max_arg: rule 6
                        end = pos + step
                        length = end - find(_CRLF, pos) - 4
                        if length > max_arg:
                            if length > limits.max_bulk_bytes:
                                raise limits.bulk_error(length)
                            if frame_bytes > max_request:
                                raise ProtocolError("too big request")
                            # Hiredis gets an empty bulk instead; the body is never held.
                            if marker is None:
                                marker = _Refused(MessageTooLarge(
                                    f"message too large ({length} bytes, max_message_size is "
                                    f"{limits.max_message_bytes})"))
                            if start < pos:
                                self._hiredis.feed(data, start, pos - start)
                            self._hiredis.feed(_EMPTY_BULK)
                            elements -= 1
                            pos = start = end
                            if pos > n:
                                self._skip = pos - n
                                self._last_byte = data[-1]
                                self._discard = True
                                pos = n
                                break
                            continue                      # its CRLF: checked like any other
                    if frame_bytes > max_request:
                        raise ProtocolError("too big request")
                    elements -= 1
                    pos += step                           # past the body and its CRLF
                    if pos > n:
                        self._skip = pos - n
                        self._last_byte = data[-1]
                        pos = n
                        break
                    if step == last_step and runs and elements:
                        # Two bulks in a row with one header (so one length): take the next ones
                        # that have it by _same_bulks, as many as lie whole in `data` and fit
                        # the array and the request cap. Whatever ends the run (another header,
                        # a missing CRLF, a partial body, the cap) is then met by the general
                        # path, exactly as if every bulk had gone through it. A run that fails
                        # or is short (tickets of 18 and 19 digits) ends the tries in this array.
                        runs = False
                        count = min(elements, (n - pos) // step,
                                    (max_request - frame_bytes) // step)
                        header = pos - step           # this bulk's; the CRLF before it is checked
                        pattern = (data[header - 2:header + guess] if header >= 2
                                   else _CRLF + data[header:header + guess])
                        if count >= _MIN_RUN and startswith(pattern, pos - 2):
                            taken = _same_bulks(data, pos - 2, pattern, step, count)
                            pos += taken * step
                            frame_bytes += taken * step
                            elements -= taken
                            runs = taken >= _MIN_RUN
                    last_step = step
                else:
                    # No header follows the last bulk here (if any): check its CRLF now. When
                    # none ended here the two bytes are a CRLF already checked, or in an
                    # earlier feed (pos < 2).
                    if pos >= 2 and (data[pos - 1] != 10 or data[pos - 2] != 13):
                        raise ProtocolError(_BAD_BULK_END)
                    if not elements:
                        ready.append(marker)              # array complete: hiredis has it
                    continue
                break                                     # need more bytes
        except ProtocolError as exc:
            if frame_start < 0 or not limits.before_auth:
                raise
            # Rule 7: hold the frame back, unscanned and unfed, until the commands before it
            # have run. Before auth nothing of a frame reaches hiredis before its end (no body
            # is dropped, see before_auth_of), so the bytes can be rescanned.
            self._deferred = exc
            pos = frame_start
            elements = frame_bytes = 0
            marker = None
            self._skip = 0
        finally:
            self._elements = elements
            self._frame_bytes = frame_bytes
            self._marker = marker
            self._guesses = (guess, count_guess)
            # Bytes from `start` to `pos` are vetted array bytes; from `pos` on, an unfinished
            # line (kept for the next feed) or the broken bytes (dropped with the error).
            if pos > start:
                self._hiredis.feed(data, start, pos - start)
        if pos < n:
            self._carry = data[pos:]


# --- encoders: reply values -> RESP bytes ----------------------------------------------------
# Thin layers over floki/reply.py (the one place reply bytes are made) that take Python values.
# `protover` is the connection's protocol (2 or 3, switched by HELLO). Only nulls, maps and
# verbatim strings differ between the two; RESP2 gets the forms Redis itself sends.

OK = reply.OK
PONG = b"+PONG\r\n"
EMPTY_ARRAY = reply.EMPTY_ARRAY
encode_integer = reply.integer
encode_null = reply.null          # `$-1` in RESP2, `_` in RESP3


def encode_simple(text: str | bytes) -> bytes:
    """Returns a simple string (`+text`). `text` must not contain CR or LF."""
    return reply.simple(text if isinstance(text, str) else text.decode())


def encode_error(exc: BaseException) -> bytes:
    """Returns the error line for `exc`; errors.to_reply is the one map from errors to RESP."""
    return to_reply(exc)


def encode_bulk(value: str | bytes) -> bytes:
    return reply.bulk(value.encode() if isinstance(value, str) else value)


def encode_verbatim(text: str | bytes, protover: int) -> bytes:
    """Returns human-readable text (INFO): a RESP3 verbatim string `=…txt:`, a RESP2 bulk."""
    if isinstance(text, str):
        text = text.encode()
    if protover >= 3:
        return b"=%d\r\ntxt:%b\r\n" % (len(text) + 4, text)
    return reply.bulk(text)


def encode_array(items: list | tuple, protover: int = 2) -> bytes:
    """Returns an array of `items`, each encoded by `encode_value`."""
    return reply.array(encode_value(item, protover) for item in items)


def encode_map(mapping: dict, protover: int) -> bytes:
    """Returns a RESP3 map (`%`), or in RESP2 a flat array of keys and values, as Redis does."""
    return reply.map_(((encode_value(key, protover), encode_value(value, protover))
                       for key, value in mapping.items()), protover)


def encode_value(value, protover: int = 2) -> bytes:
    """Returns `value` as RESP: bytes/str -> bulk, bool/int -> integer, None -> null,
    list/tuple -> array, dict -> map. Raises TypeError for anything else (a bug)."""
    if isinstance(value, (bytes, str)):
        return encode_bulk(value)
    if isinstance(value, int):
        return encode_integer(int(value))
    if value is None:
        return encode_null(protover)
    if isinstance(value, (list, tuple)):
        return encode_array(value, protover)
    if isinstance(value, dict):
        return encode_map(value, protover)
    raise TypeError(f"cannot encode {type(value).__name__} as RESP")
