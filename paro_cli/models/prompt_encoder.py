"""A deterministic offline prompt encoder for models run without their text encoder.

Each word maps to a fixed pseudo-random vector seeded by its SHA-256, so the same prompt gives
the same embedding on every machine, with no download. The empty prompt (the unconditional
branch of classifier-free guidance) is all zeros.
"""

from __future__ import annotations

import hashlib
import re

import torch


class HashPromptEncoder:
    def __init__(self, dim: int, max_tokens: int = 16):
        self.dim = dim
        self.max_tokens = max_tokens

    def word_vector(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_tokens, dim) float32 embeddings, zero-padded."""
        out = torch.zeros(len(prompts), self.max_tokens, self.dim)
        for b, prompt in enumerate(prompts):
            for i, word in enumerate(re.findall(r"[a-z0-9]+", prompt.lower())[: self.max_tokens]):
                out[b, i] = self.word_vector(word)
        return out
