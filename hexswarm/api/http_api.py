"""OpenAI-compatible HTTP API of a node, served on trio (hypercorn's trio worker) in the node's process,
or with `http_workers: N` in N worker processes (api/http_worker.py) that reach the node over a channel.

Routes (docs/http.md):
  GET  /v1/models             the model this node serves
  POST /v1/completions        text completion (`stream: true`: server-sent events)
  POST /v1/chat/completions   chat, rendered with the checkpoint's chat template (sandboxed jinja2)
  GET  /metrics               Prometheus text format (hexswarm/api/metrics.py)
  GET  /health                200 "ok" (no token needed)

Every request runs through `SubmitService.serve` (the same path as `/hexswarm/submit/1`), wrapped by
`EntryMetrics.serve` for the metrics (`LocalBackend`, in the node's process either way).  With `api_token`
set, every route but /health needs `Authorization: Bearer <token>`.  Errors have OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import secrets
import time
import uuid
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from hexswarm.errors import UserError, first_leaf
from hexswarm.net.error_codes import ErrorCode, meaning
from hexswarm.net.submit_request import FieldError, SubmitRequest, is_int, is_number
from hexswarm.runtime.chat import ChatTemplate
from hexswarm.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from hexswarm.api.metrics import EntryMetrics

log = logging.getLogger("hexswarm.http")

MAX_BODY = 4 << 20
BODY_TIMEOUT_S = 30.0
ROLES = ("system", "developer", "user", "assistant", "tool")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/metrics", "/health")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or []

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, "invalid_value")


def swarm_error(err: dict) -> ApiError:
    """A submit error frame's {"code", "message"} as an HTTP error."""
    code, message = str(err.get("code")), str(err.get("message"))
    known = meaning(code)
    status, type_ = known.http_status, known.http_type
    headers = []
    m = re.search(r"retry after (\d+(?:\.\d+)?) s", message)
    if m:
        headers.append((b"retry-after", str(max(1, math.ceil(float(m.group(1))))).encode()))
    elif status == 503:
        headers.append((b"retry-after", b"5"))
    param = "prompt" if status == 400 and "prompt" in message else None
    return ApiError(status, message, type_, param, code, headers)


# --- request bodies ------------------------------------------------------------------------------------


def parse_options(body: dict) -> dict:
    """The fields only this API has: checked, and the response options among them."""
    n = body.get("n")
    if n is not None and (not is_int(n) or n != 1):
        raise bad("n", f"'n' must be 1 (this server returns one choice per request), got {n!r}")
    best_of = body.get("best_of")
    if best_of is not None and (not is_int(best_of) or best_of != 1):
        raise bad("best_of", "'best_of' must be 1")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "'stream_options' must be an object")
    include_usage = bool((options or {}).get("include_usage", False))
    for key in ("presence_penalty", "frequency_penalty"):
        v = body.get(key)
        if v is not None and (not is_number(v) or v != 0):
            raise bad(key, f"'{key}' is not supported (only 0)")
    if body.get("logit_bias"):
        raise bad("logit_bias", "'logit_bias' is not supported")
    return_ids = body.get("return_token_ids")
    return_ids = False if return_ids is None else return_ids
    if not isinstance(return_ids, bool):
        raise bad("return_token_ids", "'return_token_ids' must be true or false")
    return {"include_usage": include_usage, "return_token_ids": return_ids}


def parse_request(body: dict, prompt: Any, rid: str, *, max_tokens_keys: tuple[str, ...],
                  default_max: int) -> SubmitRequest:
    """The fields every front end shares, from OpenAI's names and defaults, checked as a submit request is."""
    msg = {"prompt": prompt, "request_id": rid, "max_new_tokens": default_max, "temperature": 1.0}
    max_key = "max_tokens"
    for key in max_tokens_keys:  # the first one given counts (chat: max_completion_tokens, then max_tokens)
        if body.get(key) is not None:
            msg["max_new_tokens"], max_key = body[key], key
            break
    for key in ("temperature", "top_k", "top_p", "seed", "stream", "ignore_eos"):  # ignore_eos, top_k: vLLM's
        if body.get(key) is not None:
            msg[key] = body[key]
    stop = body.get("stop")
    msg["stop"] = [stop] if isinstance(stop, str) else stop  # OpenAI's one stop string
    try:
        req = SubmitRequest.from_map(msg)
    except FieldError as e:
        e = e.renamed(max_key) if e.field == "max_new_tokens" else e
        raise bad(e.field, str(e)) from None
    if body.get("seed") is None and req.temperature > 0:  # OpenAI's: a sampled answer differs each time
        req = replace(req, seed=secrets.randbits(62))
    return req


def message_text(content: Any, where: str) -> str:
    """A chat message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}[{j}]", f"'{where}[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}} "
                          "(this server serves text only)")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(where, f"'{where}' must be a string or a list of text parts")


def parse_messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"'messages[{i}]' must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"'messages[{i}].role' must be one of {', '.join(ROLES)}, got {role!r}")
        msg = {"role": role, "content": message_text(m.get("content"), f"messages[{i}].content")}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


# --- chat template ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


# --- the ASGI application ----------------------------------------------------------------------------------


class TextStream:
    """Text deltas of a growing output, holding back what may still turn into a stop string, cut at the
    first stop string.  It takes the text each submit frame carries (the submit service's incremental
    detokenizer already holds back incomplete UTF-8 characters), and looks only at the new text plus
    the longest stop string's length before it: constant work per token."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.sent = 0  # characters of `text` sent
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped or not delta:
            return ""
        start = max(0, len(self.text) - self.longest + 1)  # a stop string ending in the new text starts here
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(min(hits))
        safe = len(self.text)
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return self._take(safe)

    def _take(self, safe: int) -> str:
        if safe <= self.sent:
            return ""
        new = self.text[self.sent:safe]
        self.sent = safe
        return new

    def finish(self, final_text: str) -> str:
        """What is left to send, given the request's final text (already cut at a stop string)."""
        if self.sent >= len(final_text) or not final_text.startswith(self.text[:self.sent]):
            return ""
        rest = final_text[self.sent:]
        self.sent = len(final_text)
        return rest


FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class LocalBackend:
    """What HttpApi needs of the swarm, in the node's process: the model's static facts, `serve` (a request
    through `SubmitService.serve`, measured by `EntryMetrics.serve`), `cancel` (of an abandoned request),
    the metrics text and the HTTP response counter.  `server` is the node's Server (None on a node that
    serves no model: /v1 answers 503).  HTTP worker processes (api/http_worker.py) reach the same
    object over their channel; their `RemoteBackend` has the same interface."""

    def __init__(self, server, metrics: EntryMetrics):
        self.server = server
        self.metrics = metrics
        self.created = int(time.time())
        self.model_name = Path(server.settings.model_dir).name if server is not None else None
        self.model_id = server.model_id if server is not None else None
        self.max_seq_len = server.submit_service.port.max_seq_len if server is not None else 0
        # a HF folder's or a GGUF's template, in jinja2's sandbox (hexswarm.runtime.chat)
        self.chat = ChatTemplate.for_model(server.settings.model_dir) if server is not None else None
        # SubmitService.serve itself (the HTTP requests are measured here; the p2p ones by the service: measure_with)
        self._serve = server.submit_service.serve if server is not None else None
        self._strip_bos: bool | None = None

    @property
    def strip_bos(self) -> bool:
        """The chat template may write the BOS token itself; the tokenizer adds one too: strip the template's."""
        if self._strip_bos is None:
            tok = self.server.tokenizer
            self._strip_bos = bool(tok.add_bos or tok.encode("a")[:1] == [tok.bos_id])
        return self._strip_bos

    def info(self) -> dict:
        """The static facts a worker process's RemoteBackend is built from (its channel's hello)."""
        chat = self.chat
        return {"created": self.created, "model_name": self.model_name, "model_id": self.model_id,
                "max_seq_len": self.max_seq_len, "chat": None if chat is None else [chat.source, chat.bos, chat.eos],
                "strip_bos": self.strip_bos if chat is not None and chat.bos else False}

    async def serve(self, msg: dict, emit, kind: str, put=None) -> dict:
        return await self.metrics.serve(self._serve, msg, emit, kind, put)

    def cancel(self, rid: str) -> None:
        """The client went away mid-request: stop the pipeline computing its tokens (best effort)."""
        try:
            self.server.submit_service.cancel(rid)
        except Exception as e:
            log.debug("cancel of %s: %s", rid, e)
        log.info("request %s: the HTTP client went away; cancelled", rid)

    async def metrics_text(self) -> str:
        return self.metrics.render()

    def count_http(self, route: str, status: int) -> None:
        self.metrics.http.labels(route=route, status=status).inc()


class HttpApi:
    """The ASGI app, over a backend: LocalBackend in the node's process, or api/http_worker.py's
    RemoteBackend in an HTTP worker process."""

    def __init__(self, backend, token: str | None):
        self.backend = backend
        self.token = token

    # -- ASGI plumbing
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"].rstrip("/") or "/"
        route = path if path in ROUTES else "other"
        status = [500]

        async def send_tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._route(scope, receive, send_tracked, path)
        except ApiError as e:
            await self._json(send_tracked, e.status, e.body(), e.headers)
        except Exception:
            log.exception("HTTP %s %s failed", scope["method"], scope["path"])
            err = ApiError(500, "internal error (see the node's log)", "server_error", None, ErrorCode.INTERNAL)
            try:
                await self._json(send_tracked, 500, err.body())
            except Exception:
                pass
        finally:
            self.backend.count_http(route, status[0])

    @staticmethod
    async def _json(send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] = ()) -> None:
        body = json.dumps(obj).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _read_body(receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes", "invalid_request_error", None,
                               "body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _check_token(self, scope) -> None:
        if not self.token:
            return
        header = dict(scope["headers"]).get(b"authorization")
        if header is None:
            raise ApiError(401, "You didn't provide an API key: send 'Authorization: Bearer <token>'.",
                           "invalid_request_error", None, "missing_api_key", [(b"www-authenticate", b"Bearer")])
        scheme, _, given = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key",
                           [(b"www-authenticate", b"Bearer")])

    async def _route(self, scope, receive, send, path: str) -> None:
        method = scope["method"]
        if path == "/health":
            body = b"ok\n"
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"3")]})
            await send({"type": "http.response.body", "body": body})
            return
        if path not in ROUTES:
            raise ApiError(404, f"no route {path}; this server has {', '.join(ROUTES)}", "invalid_request_error",
                           None, "unknown_url")
        self._check_token(scope)
        wants = "POST" if path in ("/v1/completions", "/v1/chat/completions") else "GET"
        if method != wants:
            raise ApiError(405, f"{path} takes {wants}, not {method}", "invalid_request_error", None,
                           "method_not_allowed", [(b"allow", wants.encode())])
        if path == "/metrics":
            body = (await self.backend.metrics_text()).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", METRICS_CONTENT_TYPE.encode()),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if self.backend.model_name is None:
            raise ApiError(503, "this node serves no model (its config has no 'model')", "service_unavailable_error",
                           None, "no_model")
        if path == "/v1/models":
            await self._json(send, 200, {"object": "list", "data": [self._model_card()]})
            return
        with trio.move_on_after(BODY_TIMEOUT_S) as timer:  # a slow body must not hold a connection forever
            body = await self._read_body(receive)
        if timer.cancelled_caught:
            raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", "invalid_request_error",
                           None, "body_timeout")
        try:
            req = json.loads(body)
            # a lone surrogate ("\ud800") parses but is no text: it would fail in the tokenizer and on the wire
            json.dumps(req, ensure_ascii=False).encode("utf-8")
        except (ValueError, UnicodeError, RecursionError) as e:  # RecursionError: nesting too deep to parse
            raise ApiError(400, f"the request body is not valid JSON text: {type(e).__name__}: {str(e)[:200]}",
                           "invalid_request_error", None, "invalid_json") from None
        if not isinstance(req, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_request_error", None, "invalid_json")
        chat = path == "/v1/chat/completions"
        await self._completion(req, chat, receive, send)

    def _model_card(self) -> dict:
        b = self.backend
        return {"id": b.model_name, "object": "model", "created": b.created, "owned_by": "hexswarm",
                "root": b.model_id, "max_model_len": b.max_seq_len}

    def _check_model(self, req: dict) -> str:
        model = req.get("model")
        if model is None:
            raise bad("model", "'model' is required (see GET /v1/models)")
        if not isinstance(model, str):
            raise bad("model", f"'model' must be a string, got {model!r}")
        name = self.backend.model_name
        if model not in (name, self.backend.model_id):
            raise ApiError(404, f"The model '{model}' does not exist; this swarm serves '{name}'",
                           "invalid_request_error", "model", "model_not_found")
        return name

    def _prompt(self, req: dict, chat: bool) -> Any:
        """The prompt: the chat rendered, or the completion's (checked with the other shared fields)."""
        if chat:
            try:
                text = self.backend.chat.render(parse_messages(req.get("messages")))
            except UserError as e:
                raise bad("messages", str(e)) from None
            # The template may write the BOS token itself; the tokenizer adds one too: keep one.
            bos = self.backend.chat.bos
            if bos and text.startswith(bos) and self.backend.strip_bos:
                text = text[len(bos):]
            if not text:
                raise bad("messages", "the chat template rendered an empty prompt")
            for key in ("tools", "functions"):
                if req.get(key):
                    raise bad(key, f"'{key}' is not supported")
            logprobs = req.get("logprobs")
            if logprobs not in (None, False):
                raise bad("logprobs", "'logprobs' is not supported")
            return text
        prompt = req.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
            raise bad("prompt", "'prompt' as token ids is not supported; send text")
        for key, ok in (("echo", (None, False)), ("suffix", (None, "")), ("logprobs", (None, 0))):
            if req.get(key) not in ok:
                raise bad(key, f"'{key}' is not supported")
        return prompt

    async def _completion(self, req: dict, chat: bool, receive, send) -> None:
        model = self._check_model(req)
        prompt = self._prompt(req, chat)
        limit = self.backend.max_seq_len
        keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
        options = parse_options(req)
        rid = uuid.uuid4().hex
        submit = parse_request(req, prompt, rid, max_tokens_keys=keys,
                               default_max=limit if chat else DEFAULT_COMPLETION_TOKENS)
        # token frames only for a streamed answer: a whole one is built from `done` (its text and ids), and
        # EntryMetrics still times every token (it asks the relay for them and keeps them from the responder)
        msg = submit.to_map()
        resp = Responder(self, send, rid, model, chat, {**options, "stream": submit.stream, "stop": list(submit.stop)})
        cancelled = True
        final: dict | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            final = await self.backend.serve(msg, resp.on_frame, "chat" if chat else "completions")
            cancelled = False
            nursery.cancel_scope.cancel()
        if cancelled or final is None:
            self.backend.cancel(rid)
            return
        if "error" in final:
            err = swarm_error(final["error"])
            if resp.started:
                await resp.stream_error(err)
                return
            raise err
        await resp.finish(final["done"])


async def _cancel_on_disconnect(receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


class Responder:
    """Turns submit frames into one OpenAI response: JSON, or server-sent events when streaming."""

    def __init__(self, api: HttpApi, send, rid: str, model: str, chat: bool, opts: dict):
        self.api, self.send, self.model, self.chat, self.opts = api, send, model, chat, opts
        self.id = ("chatcmpl-" if chat else "cmpl-") + rid
        self.rid = rid
        self.created = int(time.time())
        self.stream = opts["stream"]
        self.text = TextStream(opts["stop"])
        self.started = False
        # a token chunk's fixed part, formatted once: json.dumps of the whole chunk per token was a
        # measurable share of the entry's event loop at 32 streams (docs/BENCHMARKS.md)
        head = json.dumps({"id": self.id, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": self.created, "model": model})
        self._token_head = "data: " + head[:-1] + ', "choices": [{"index": 0, ' + \
            ('"delta": {"content": ' if chat else '"text": ')
        self._token_tail = ('}' if chat else '') + ', "logprobs": null, "finish_reason": null'

    def _chunk(self, delta: str | None, finish: str | None = None, token_ids: list[int] | None = None,
               role: bool = False) -> dict:
        if self.chat:
            d: dict[str, Any] = {}
            if role:
                d["role"] = "assistant"
            if delta is not None:
                d["content"] = delta
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    async def _event(self, obj: dict | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        await self.send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

    async def _start(self) -> None:
        if self.started:
            return
        self.started = True
        await self.send({"type": "http.response.start", "status": 200,
                         "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                     (b"cache-control", b"no-cache"), (b"x-request-id", self.rid.encode())]})
        if self.chat:
            await self._event(self._chunk(None, role=True) if not self.opts["return_token_ids"]
                              else self._chunk(None, role=True, token_ids=[]))

    async def on_frame(self, frame: dict) -> None:
        if "accepted" in frame:
            if self.stream:
                await self._start()
            return
        frames = frame.get("batch") or [frame]  # tokens queued together: one chunk, one write
        if "token" not in frames[0] or not self.stream:
            return
        delta = "".join(self.text.push(f.get("text") or "") for f in frames)
        ids = [int(f["token"]) for f in frames] if self.opts["return_token_ids"] else None
        if delta or ids is not None:
            await self.send({"type": "http.response.body", "body": self._token_event(delta, ids), "more_body": True})

    def _token_event(self, delta: str, ids: list[int] | None) -> bytes:
        """`data: json.dumps(self._chunk(delta, token_ids=ids))` as SSE bytes, the same characters."""
        ids_part = "" if ids is None else ', "token_ids": [' + ", ".join(map(str, ids)) + "]"
        return (self._token_head + json.dumps(delta) + self._token_tail + ids_part + "}]}\n\n").encode()

    def _usage(self, done: dict) -> dict:
        p = done.get("prompt_tokens")
        prompt = len(p) if isinstance(p, list) else int(p or 0)
        completion = len(done.get("tokens") or [])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def finish(self, done: dict) -> None:
        finish = FINISH.get(done.get("finish_reason"), "stop")
        usage = self._usage(done)
        if not self.stream:
            text = done.get("text", "")
            if self.chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                          "finish_reason": finish}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            if self.opts["return_token_ids"]:
                choice["token_ids"] = list(done.get("tokens") or [])
            await self.api._json(self.send, 200, {
                "id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage, "system_fingerprint": f"hexswarm-epoch-{done.get('epoch')}",
            }, [(b"x-request-id", self.rid.encode())])
            return
        await self._start()
        rest = self.text.finish(done.get("text", ""))
        last = self._chunk(rest if (rest or not self.chat) else None, finish,
                           [] if self.opts["return_token_ids"] else None)
        await self._event(last)
        if self.opts["include_usage"]:
            chunk = self._chunk(None)
            chunk["choices"] = []
            chunk["usage"] = usage
            await self._event(chunk)
        await self._event("[DONE]")
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def stream_error(self, err: ApiError) -> None:
        await self._event(err.body())
        await self._event("[DONE]")
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


# --- running it ------------------------------------------------------------------------------------------


def hypercorn_config(bind: str):
    from hypercorn.config import Config

    cfg = Config()
    cfg.bind = [bind]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hexswarm.http")
    cfg.graceful_timeout = 1.0
    return cfg


AUTO_HTTP_WORKERS = 2  # on a CUDA node: measured against in-process HTTP in docs/DECISIONS.md


def http_workers(configured: int | None, server) -> int:
    """The HTTP worker processes to run: as configured, or for `auto` (None) AUTO_HTTP_WORKERS on a node whose
    stages serve on CUDA (its event loop, serving HTTP itself, was 72-88% busy at 32 streams on an H100, against
    22-62% with workers) and 0 elsewhere (a CPU node, where they measured no better, and a node without a model)."""
    if configured is not None:
        return configured
    return AUTO_HTTP_WORKERS if server is not None and server.settings.device == "cuda" else 0


async def serve_http(node, server, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the HTTP API on `node.config.http` until cancelled, here or (`http_workers`) from worker
    processes (api/http_worker.py); started() with the bound URLs."""
    from hypercorn.trio import serve

    metrics = EntryMetrics(node, server)
    backend = LocalBackend(server, metrics)
    token, workers = node.config.api_token, http_workers(node.config.http_workers, server)
    async with trio.open_nursery() as nursery:
        metrics.start(nursery)
        if server is not None:
            server.submit_service.measure_with(metrics)
        try:
            if workers:
                from hexswarm.api.http_worker import serve_workers

                binds = await nursery.start(serve_workers, backend, token, node.config.http, workers,
                                            lambda: node.stopping)
            else:
                binds = await nursery.start(partial(serve, HttpApi(backend, token), hypercorn_config(node.config.http),
                                                    mode="asgi"))
        except BaseException as e:  # a bind failure comes wrapped in exception groups
            leaf = first_leaf(e)
            if isinstance(leaf, OSError):
                raise UserError(f"cannot listen on http {node.config.http}: {leaf.strerror or leaf}") from None
            raise
        log.info("HTTP API listening on %s%s%s", ", ".join(binds), f" ({workers} worker processes)" if workers else "",
                 " (API token required)" if token else "")
        task_status.started(binds)
