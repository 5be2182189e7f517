"""Losses of CLaRa training and the differentiable top-k of stage 3.

    answer CE        next-token CE on the target tokens only (prompt labels are IGNORE)
    memory MSE       (mean MEM state - mean document state)^2, the compressor's side loss
    KL (option)      token-level KL(teacher || student) on the target tokens, teacher = base LM on full text
    straight-through top-k   hard top-k forward; backward through a sequential softmax over the candidates not
                     yet chosen, at temperature 0.02 (CLaRa; no Gumbel noise)
    bank InfoNCE     the retrieval stage: -log of the softmax mass (cosine / tau over every document of the
                     memory bank) on a question's gold documents; optionally plus the same over the
                     question's own candidates alone (its hard negatives: the distractors an eval row offers)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE = -100


def left_pad_labels(seqs: Sequence[Sequence[int]], n_prompt: Sequence[int], device) -> torch.Tensor:
    """Labels [B, T] aligned with ClaraModel.pad_left(seqs): IGNORE on padding and prompt positions."""
    width = max(len(s) for s in seqs)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for row, (seq, n) in enumerate(zip(seqs, n_prompt)):
        if len(seq) > n:
            labels[row, width - len(seq) + n:] = torch.tensor(seq[n:])
    return labels.to(device)


def target_logits(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [n, V] (fp32) at the positions that predict a target token, and those tokens [n].

    Only these rows go through the LM head: a full [B, T, V] logits tensor is never built.
    """
    nxt = labels[:, 1:]
    keep = nxt != IGNORE
    head = model.lm.get_base_model().get_output_embeddings()
    return head(hidden[:, :-1][keep]).float(), nxt[keep]


def memory_mse(hidden: torch.Tensor, mask: torch.Tensor, n_mem: int) -> torch.Tensor:
    """Compressor states [B, T, H] (MEM slots last) -> mean over the batch of |mean MEM - mean document|^2 / H."""
    mem = hidden[:, -n_mem:].float().mean(1)
    doc_mask = mask[:, :-n_mem].unsqueeze(-1).to(torch.float32)
    doc = (hidden[:, :-n_mem].float() * doc_mask).sum(1) / doc_mask.sum(1).clamp(min=1.0)
    return F.mse_loss(mem, doc)


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher/T) || softmax(student/T)) * T^2; both [n, V]."""
    t = temperature
    log_s = F.log_softmax(student / t, dim=-1)
    log_t = F.log_softmax(teacher / t, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * t * t


def _unit(x: torch.Tensor, centre: torch.Tensor | None, dims: int) -> torch.Tensor:
    """Flatten the last two dims (M, H) of x, subtract the flattened centre [M, H] if any, L2-normalise."""
    flat = x.flatten(dims).float()
    if centre is not None:
        flat = flat - centre.to(flat.device, torch.float32).flatten()
    return F.normalize(flat, dim=-1)


def cosine_scores(query: torch.Tensor, cands: torch.Tensor, valid: torch.Tensor,
                  centre: torch.Tensor | None = None) -> torch.Tensor:
    """Query memories [B, M, H] vs candidate memories [B, N, M, H] (flattened, slot i with slot i, minus the
    retrieval centre [M, H] if any) -> [B, N]; -inf where `valid` [B, N] is False."""
    q, c = _unit(query, centre, 1), _unit(cands, centre, 2)
    return torch.einsum("bd,bnd->bn", q, c).masked_fill(~valid, float("-inf"))


def straight_through_topk(scores: torch.Tensor, k: int, temperature: float = 0.02) -> torch.Tensor:
    """Selection weights [B, k, N] from scores [B, N]: row i of the forward value is exactly the one-hot of the
    i-th best candidate; its gradient is that of softmax(scores / temperature) over the candidates not chosen
    in rows < i."""
    finite = torch.isfinite(scores).sum(-1)
    if bool((finite < k).any()):
        raise ValueError(f"top-{k} needs at least {k} valid candidates per row, got {int(finite.min())}")
    hard = F.one_hot(scores.detach().topk(k, dim=-1).indices, scores.shape[-1]).to(scores.dtype)
    chosen_before = (hard.cumsum(1) - hard).bool()
    soft = (scores.unsqueeze(1) / temperature).masked_fill(chosen_before, float("-inf")).softmax(-1)
    return hard + (soft - soft.detach())


def bank_nce(query: torch.Tensor, bank: torch.Tensor, gold: Sequence[Sequence[int]], tau: float,
             centre: torch.Tensor | None = None, candidates: Sequence[Sequence[int]] | None = None,
             candidate_weight: float = 0.0) -> torch.Tensor:
    """Query memories [B, M, H] vs the whole bank [N, M, H] (flattened cosine minus the retrieval centre, as
    retrieval scores them): mean over the batch of logsumexp(all / tau) - logsumexp(gold / tau); several gold
    rows share the mass. With `candidate_weight`, plus that weight x the same loss over each question's
    `candidates` (bank rows, gold ones included) alone."""
    logits = _unit(query, centre, 1) @ _unit(bank, centre, 1).T / tau  # [B, N]
    positive = _rows_mask(logits, gold)
    if not bool(positive.any(-1).all()):
        raise ValueError("every question needs at least one gold document in the bank")
    loss = _nce(logits, positive)
    if candidate_weight:
        inside = _rows_mask(logits, candidates)
        if bool((positive & ~inside).any()):
            raise ValueError("a question's gold documents must be among its candidates")
        loss = loss + candidate_weight * _nce(logits.masked_fill(~inside, float("-inf")), positive)
    return loss


def _rows_mask(logits: torch.Tensor, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    mask = torch.zeros_like(logits, dtype=torch.bool)
    for row, cols in enumerate(rows):
        mask[row, list(cols)] = True
    return mask


def _nce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    return (logits.logsumexp(-1) - logits.masked_fill(~positive, float("-inf")).logsumexp(-1)).mean()
