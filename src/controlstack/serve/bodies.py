"""Reading a client's JSON safely: size, nesting and number checks *before* it becomes Python objects.

``json.loads`` recurses once per nesting level (100000 ``[`` raise ``RecursionError``, a 500), keeps
every element of a 64 MiB list of ``{}`` (gigabytes of dicts), turns ``1e999`` into ``inf`` and
``NaN`` into ``nan``, and turns a 100000-digit integer into a ``ValueError``. So the raw text is
scanned first, in linear time and at C speed (regular expressions and numpy, never a loop over the
characters): its nesting depth and its number of values (commas and colons outside strings) are
capped; then it is parsed with non-finite numbers, over-long integers and lone-surrogate escapes
refused. Every refusal is a :class:`ClientError` (a 4xx with one line naming the problem).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from controlstack.errors import ControlstackError

MAX_DEPTH = 32          # the deepest legitimate body (sd-webui units, /v1 schedules, a pose JSON) nests ~7
MAX_VALUES = 200_000    # commas + colons: a 100-person pose JSON has ~40000 numbers; images are strings
MAX_DIGITS = 40         # an integer literal's digits (seeds need 19)

_ESCAPE = re.compile(r"\\.", re.DOTALL)  # escapes first, so an escaped quote cannot end a string
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]")


class ClientError(ControlstackError):
    """A request the client must change: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_shape(text: str, what: str) -> None:
    """Refuse JSON text nesting deeper than :data:`MAX_DEPTH` or holding more than :data:`MAX_VALUES`
    values, without parsing it. Strings are cut out first (escapes, then quoted runs: both linear), so
    brackets and commas inside them do not count; what is left of a 64 MiB body of images is tiny."""
    bare = _STRING.sub('""', _ESCAPE.sub("", text)) if '"' in text else text
    if bare.count(",") + bare.count(":") > MAX_VALUES:
        raise ClientError(f"{what} has more than {MAX_VALUES} JSON values", 413)
    brackets = _NOT_BRACKET.sub("", bare)
    if len(brackets) > 2 * MAX_VALUES + 2 * MAX_DEPTH:
        raise ClientError(f"{what} has more than {MAX_VALUES} JSON values", 413)
    if brackets:
        a = np.frombuffer(brackets.encode("ascii"), np.uint8)
        depth = int(np.cumsum(np.where((a == 91) | (a == 123), 1, -1), dtype=np.int64).max())
        if depth > MAX_DEPTH:
            raise ClientError(f"{what} nests deeper than {MAX_DEPTH} levels")


def _constant(name: str):
    raise ClientError(f"JSON numbers must be finite; {name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ClientError(f"the number {text[:20]} is out of range (JSON numbers here must be finite, below 1e308)")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ClientError(f"an integer with more than {MAX_DIGITS} digits is out of range")
    return int(text)


def _check_text(value, what: str) -> None:
    """Refuse strings holding a lone surrogate (``"\\ud800"``): valid JSON, but not text, and the
    PNG infotext (UTF-8) would fail on it mid-run. Iterative: the depth is capped but need not recurse."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            texts = list(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            texts = [item] if isinstance(item, str) else []
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ClientError(f"{what} has a string with a lone surrogate escape (\\ud800-\\udfff): not "
                                  "Unicode text") from None


def parse_json(raw: bytes | str, what: str = "the request body"):
    """JSON text (UTF-8 bytes or str) -> Python values, under the caps above; ``ClientError`` otherwise."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ClientError(f"{what} is not UTF-8 text") from None
    check_shape(raw, what)
    try:
        value = json.loads(raw, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except ClientError as exc:
        raise ClientError(f"{what}: {exc}", exc.status) from None
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise ClientError(f"{what} is not valid JSON") from None
    if "\\u" in raw:  # only an escape can make a lone surrogate: UTF-8 input cannot hold one
        _check_text(value, what)
    return value


async def read_json(request, max_bytes: int) -> dict:
    """The request's body as a JSON object: ``application/json`` (or no content type, as FastAPI
    accepts), read in chunks and refused (413) as soon as it passes ``max_bytes`` -- a chunked body
    has no Content-Length for the middleware to check. An empty body is ``{}``."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise ClientError(f"send the body as application/json, not {media[:60]}", 415)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ClientError(f"request body larger than {max_bytes // 2**20} MiB", 413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    value = parse_json(raw)
    if not isinstance(value, dict):
        raise ClientError("the request body must be a JSON object")
    return value
