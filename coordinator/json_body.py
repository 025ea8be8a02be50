"""A request's JSON body: an object, or a 400 that says what is wrong with it.

Bodies nested deeper than ``MAX_JSON_DEPTH`` arrays/objects are refused: Python's parser would
recurse into a 5,000-deep body until a RecursionError (a 500), and anything that walks the
parsed value later (msgpack, the schema compiler) would hit its own limit.
"""

from __future__ import annotations

import json

from aiohttp import web

from coordinator.api_errors import bad_request

MAX_JSON_DEPTH = 64  # nested arrays/objects; a deep JSON schema needs a dozen or two


async def json_body(request: web.Request) -> dict:
    raw = await request.read()
    too_deep = bad_request(f"the body is not valid JSON: nested deeper than {MAX_JSON_DEPTH}")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: also ints over 4300 digits
        raise bad_request(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    # fewer brackets than the limit cannot nest past it (counting is C speed; walking is not)
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(body) > MAX_JSON_DEPTH:
        raise too_deep
    return body


def _depth(value: object) -> int:
    """Nesting depth of arrays/objects, without recursion (a hostile body could be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest
