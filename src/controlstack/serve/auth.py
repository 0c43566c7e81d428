"""``--token`` for API clients and for browsers.

API clients send ``Authorization: Bearer <token>``. A browser cannot add that header to the web
UI's own requests (the page, its scripts, gradio's API and uploads), so ``/login`` takes the token
once in a form and sets an HttpOnly, SameSite=Strict session cookie that the server accepts besides
the header. The cookie holds an HMAC of the token, not the token: a leaked cookie does not give the
Bearer token to use elsewhere, and it stops working when the server's token changes. Both are
compared in constant time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs

from fastapi import Request  # at module level: FastAPI resolves the handler's (string) annotation here
from fastapi.responses import HTMLResponse, RedirectResponse

COOKIE = "controlstack_session"
LOGIN = "/login"
MAX_FORM = 4096  # the login form's body: one token field

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>controlstack: log in</title>
<style>body{{font-family:sans-serif;max-width:26em;margin:4em auto}}input{{width:100%;margin:.4em 0;padding:.4em}}
.error{{color:#b00}}</style></head>
<body><h1>controlstack</h1><p>This server needs its token (<code>controlstack serve --token</code>).</p>
{error}<form method="post" action="/login"><label>Token <input type="password" name="token" autofocus
autocomplete="current-password"></label><input type="submit" value="Log in"></form></body></html>
"""


def session_value(token: str) -> str:
    """The cookie's value for ``token``."""
    return hmac.new(token.encode(), b"controlstack web UI session", hashlib.sha256).hexdigest()


def authorized(request, token: str) -> bool:
    """The request carries the Bearer token or the session cookie (both checked: no early answer
    that would tell which one was close)."""
    bearer = hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {token}".encode())
    cookie = hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), session_value(token).encode())
    return bearer or cookie


def wants_page(request) -> bool:
    """A browser navigating (answered with the login page) rather than an API client (a 401)."""
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")


def add_login(app, token: str) -> None:
    """``GET /login``: the form; ``POST /login``: the token -> the session cookie and back to ``/``."""
    @app.get(LOGIN, include_in_schema=False)
    def login_page():
        return HTMLResponse(PAGE.format(error=""))

    @app.post(LOGIN, include_in_schema=False)
    async def login(request: Request):
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return HTMLResponse(PAGE.format(error='<p class="error">the form is too large</p>'), 413)
        try:
            given = parse_qs(body.decode(), max_num_fields=4).get("token", [""])[0]
        except (UnicodeDecodeError, ValueError):
            given = ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            return HTMLResponse(PAGE.format(error='<p class="error">wrong token</p>'), 401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, session_value(token), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response
