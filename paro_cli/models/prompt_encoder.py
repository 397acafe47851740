"""A deterministic offline prompt encoder for models run without their text encoder.

Each word maps to a fixed pseudo-random vector seeded by its SHA-256, plus one for its position
(the transformer's cross-attention has no positions of its own, and "a red circle and a blue
square" must differ from "a blue circle and a red square"). The same prompt gives the same
embedding on every machine, with no download, for any vocabulary. The empty prompt (the
unconditional branch of classifier-free guidance) is all zeros.
"""

from __future__ import annotations

import functools
import hashlib
import re

import torch


@functools.lru_cache(maxsize=4096)
def _hashed_vector(key: str, dim: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


class HashPromptEncoder:
    def __init__(self, dim: int, max_tokens: int = 24):
        self.dim = dim
        self.max_tokens = max_tokens

    def word_vector(self, word: str) -> torch.Tensor:
        return _hashed_vector(word, self.dim)

    def position_vector(self, index: int) -> torch.Tensor:
        return 0.5 * self.word_vector(f"#position {index}")  # '#' never survives word splitting

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_tokens, dim) float32 embeddings, zero-padded."""
        out = torch.zeros(len(prompts), self.max_tokens, self.dim)
        for b, prompt in enumerate(prompts):
            for i, word in enumerate(re.findall(r"[a-z0-9]+", prompt.lower())[: self.max_tokens]):
                out[b, i] = self.word_vector(word) + self.position_vector(i)
        return out
