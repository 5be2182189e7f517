"""Prompt-prefix reuse across generator calls, as llama.cpp keeps its context between prompts.

Every prompt starts with the same head (the chat template's system turn and "Background:", 37 positions for
SmolLM2), so a runtime answering one question after another can keep the previous prompt's KV cache and
prefill only from the first position where the new prompt differs. Positions are compared by their input
embeddings, so a memory slot matches only when the same memory fills it. One sequence at a time; the cache
is valid while the model's weights do not change, which is why the runtime owns one and training does not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PrefixCache:
    role: str | None = None
    embeds: torch.Tensor | None = None  # [T, H] inputs of the prompt whose KV is held
    kv: Any = None                      # the backend's KV for those T positions (its own type)

    def take(self, role: str | None, inputs_embeds: torch.Tensor) -> tuple[int, Any]:
        """(n, kv): the first n positions of the prompt `inputs_embeds` [1, T, H] match the held prompt and `kv`
        holds at least their KV (the caller cuts it to n). n < T, since the last position must run to give logits.

        The cache is emptied: the caller extends the KV in place and hands it back with `keep`.
        """
        if inputs_embeds.shape[0] != 1:
            raise ValueError(f"a prefix cache serves one sequence at a time, got a batch of {inputs_embeds.shape[0]}")
        embeds = inputs_embeds[0]
        held, kv, held_role = self.embeds, self.kv, self.role
        self.clear()
        if kv is None or held is None or held_role != role:
            return 0, None
        n = min(held.shape[0], embeds.shape[0] - 1)
        same = (held[:n] == embeds[:n].to(held)).all(-1)
        reuse = n if bool(same.all()) else int(same.logical_not().nonzero()[0, 0])
        return reuse, (kv if reuse else None)

    def keep(self, role: str | None, inputs_embeds: torch.Tensor, kv: Any) -> None:
        """Hold `kv`, the KV cache after `role` read the prompt `inputs_embeds` [1, T, H] (the answer's positions
        may follow the prompt's; `take` cuts them off)."""
        self.role, self.embeds, self.kv = role, inputs_embeds[0], kv

    def clear(self) -> None:
        self.role, self.embeds, self.kv = None, None, None
