"""Helpers for end-to-end serving tests: a local swarm on a tiny model, submissions, references."""

from __future__ import annotations

import trio

from hexswarm.runtime.offline import GenerateJob, generate
from hexswarm.runtime.sampling import SamplingParams
from hexswarm.api.client import submit_to

PROMPTS = ["Hello, world!", "Once upon a time", "The quick brown fox", "0123456789", "Pipeline stages pass",
           "hexswarm serves", "I am fine, thank you", "Tensor parallel ranks"]


def submit_many(addrs_and_requests: list[tuple[str, dict]], timeout: float = 120.0) -> list[dict]:
    """Submit all at once (concurrently) from one client process; final frames in order."""
    results: list[dict | None] = [None] * len(addrs_and_requests)

    async def main():
        async def one(i, addr, req):
            results[i] = await submit_to(addr, req, timeout=timeout)

        async with trio.open_nursery() as nursery:
            for i, (addr, req) in enumerate(addrs_and_requests):
                nursery.start_soon(one, i, addr, req)

    trio.run(main)
    return results


def reference(model_dir, prompt: str, max_new_tokens: int, sampling: SamplingParams = SamplingParams()) -> dict:
    return generate(GenerateJob(model_dir=str(model_dir), prompt=prompt, max_new_tokens=max_new_tokens,
                                sampling=sampling))
