"""Shared fixtures: tiny random Llama checkpoints, made by the tests themselves."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hexswarm.model.tiny import TinySpec, make_tiny_llama

REPO = Path(__file__).resolve().parents[1]

# Checkpoint variants the engine must match transformers on.
TINY_SPECS = {
    # GQA: 4 query heads over 2 KV heads, one safetensors file
    "gqa": TinySpec(layers=4, hidden=64, heads=4, kv_heads=2, seed=1),
    # Llama-3 style: rope scaling, tied embeddings, a single KV head (replicated at TP 2),
    # explicit head_dim, weights sharded over files with an index
    "llama3": TinySpec(layers=4, hidden=64, heads=4, kv_heads=1, head_dim=16, llama3_rope=True,
                       tie_embeddings=True, rope_theta=500000.0, shards=3, seed=2),
    # MHA with attention and MLP biases, pytorch_model.bin fallback
    "bias_bin": TinySpec(layers=3, hidden=64, heads=4, kv_heads=4, attention_bias=True, mlp_bias=True,
                         bin_format=True, seed=3),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: make_tiny_llama(root / name, spec) for name, spec in TINY_SPECS.items()}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    return tiny_models["gqa"]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m hexswarm ARGS` as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hexswarm", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO,
    )


def load_tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
