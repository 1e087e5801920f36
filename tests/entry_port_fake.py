"""A test's fake serving node seen through `EntryPort`'s names (serve/submit.py), read when used: tests build
fakes shaped like the node's serving layer and swap their methods mid-test."""

from __future__ import annotations


class _ServerAsPort:
    def __init__(self, server):
        self._server = server

    me = property(lambda self: self._server.me)
    node = property(lambda self: self._server.node)
    cfg = property(lambda self: self._server.cfg)
    tokenizer = property(lambda self: self._server.tokenizer)
    # as serving.py builds it: the model's context or the node's bound, the smaller
    max_seq_len = property(lambda self: min(self._server.cfg.max_position_embeddings,
                                            self._server.settings.max_seq_len))
    dispatch_wait_s = property(lambda self: self._server.head_settings.dispatch_wait_s)
    entries = property(lambda self: self._server.entries)

    def head_order(self) -> list[str]:
        return self._server.head_order()

    async def dispatch(self, msg: dict) -> dict:
        return await self._server.dispatch(msg)

    async def ask_head(self, head: str, msg: dict, timeout: float) -> dict:
        return await self._server.placement.ask(head, msg, timeout=timeout)

    def send(self, peer: str, msg: dict) -> None:
        self._server.pipe.send(peer, msg)

    def local_spans(self, wire: str) -> list:
        return self._server.stages.spans(wire)

    def tokens_out(self) -> int:
        return self._server.stages.tokens_out

    def committed(self):
        return getattr(self._server, "committed", None)

    def failed_replicas(self, layout) -> set:
        return self._server.failed_replicas(layout)

    def refusal(self, new_tokens: int, deadline_s: float) -> str | None:
        from hexswarm.serve import backlog

        return backlog.refusal(self._server, new_tokens, deadline_s)


def port_of(server) -> _ServerAsPort:
    return _ServerAsPort(server)
