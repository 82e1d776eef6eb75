"""Token-by-token decoding of a TrajectoryCharLM with a trajops.PagedTrajectoryKVCache.

Each decoded token runs the model's math for that one position:

* positions: the token's displacement ``pos.compute_trajectory_displacements`` of (previous, new)
  embedding, appended to the row's displacement history, and ``trajops.adaptive_positional_encoding``
  of the history (its last row is the new token's encoding; the history is a scalar per token, so
  re-scanning it is cheap and gives the full forward's fp64 cumulative sum exactly);
* attention, per layer: q, k, v from the module's own projections, the per-query temperature from
  the module's scale predictor applied to (ln1 input of this token - that of the previous token),
  the token's k, v appended to the cache, then ``trajops.temperature_attention`` of the query over
  every logical slot of the cache, masked to the live ones (``cache.live_slots()``), scale 1.0 as
  in the module; keys are a set, so their slot order does not matter;
* MoE: the router on the last 9 ln2 inputs (its trajectory window reaches back 8 steps, so the
  newest position of that slice routes as it does in the whole sequence), then the experts.

With a capacity >= the number of tokens nothing is evicted and the logits equal a full forward of
the whole sequence (up to fp32 rounding). With a smaller capacity the cache evicts by relevance.

The trajectory given to the cache for each token is the difference of the layer-0 hidden state (the
first block's input: token embedding + adaptive position) between this token and the previous one
(zero for the first token). It must be known before layer 0's K/V are appended (layer 0 decides the
evictions), which rules out any deeper layer's state; and a difference, not the state itself, is
what "trajectory" means in every other trajops module (router, temperatures, positions). Relevance
of an entry = alpha * cos(newest token's step, entry's step) + (1 - alpha) * recency.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from trajops import PagedTrajectoryKVCache, adaptive_positional_encoding, temperature_attention

from .model import TrajectoryCharLM

__all__ = ["CachedDecoder", "generate"]

# TrajectoryGuidedMoERouter looks back over this many previous steps (its WINDOW).
ROUTER_LOOKBACK = 8


class CachedDecoder:
    """Feeds tokens one position at a time through ``model`` with a paged trajectory KV cache.

    Args:
        model: a TrajectoryCharLM (its parameters' dtype and device are used).
        batch: rows decoded together.
        capacity: live tokens per row kept in the cache; older / less relevant ones are evicted.
        page_size: slots per cache page.
        alpha, decay: the cache's relevance mix (see PagedTrajectoryKVCache).

    ``step(tokens (B,) int64) -> logits (B, V)`` of the next token after ``tokens``. ``cache`` is the
    PagedTrajectoryKVCache (``cache.stats()`` for live counts and evictions). No host sync per step.
    """

    def __init__(self, model: TrajectoryCharLM, batch: int = 1, capacity: int = 128, page_size: int = 16,
                 alpha: float = 0.7, decay: float = 0.1) -> None:
        if not isinstance(model, TrajectoryCharLM):
            raise TypeError(f"CachedDecoder: model must be a TrajectoryCharLM, got {type(model).__name__}")
        p = next(model.parameters())
        E, H = model.embedding_dim, model.num_heads
        pages = -(-capacity // page_size) if isinstance(capacity, int) and isinstance(page_size, int) else 1
        self.model = model
        self.batch = batch
        self.cache = PagedTrajectoryKVCache(
            num_layers=model.num_layers, num_pages=max(1, batch * pages), page_size=page_size, num_kv_heads=H,
            head_dim=E // H, traj_dim=E, max_batch=batch, capacity=capacity, alpha=alpha, decay=decay,
            dtype=p.dtype, device=p.device,
        )
        # Every logical slot, read each step and masked to the live ones: a fixed shape, no sync.
        self._slots = torch.arange(self.cache.max_slots, device=p.device).expand(batch, -1)
        self.length = 0  # tokens fed so far (a Python count of calls, not a tensor value)
        self._prev_emb: Optional[Tensor] = None  # (B, 1, E) previous token embedding
        self._prev_x0: Optional[Tensor] = None  # (B, 1, E) previous layer-0 hidden state
        self._displacements = torch.zeros(batch, 0, dtype=model.pos.pe_table.dtype, device=p.device)
        self._prev_attn_in = [None] * model.num_layers  # per layer (B, 1, E): previous ln1 output
        self._router_in = [torch.zeros(batch, 0, E, dtype=p.dtype, device=p.device)
                           for _ in range(model.num_layers)]  # per layer (B, <= 9, E): recent ln2 outputs

    @staticmethod
    def _step_of(new: Tensor, prev: Optional[Tensor]) -> Tensor:
        return torch.zeros_like(new) if prev is None else new - prev

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dtype != torch.long or tuple(tokens.shape) != (self.batch,):
            got = f"{tokens.dtype} {list(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"CachedDecoder.step: tokens must be int64 of shape ({self.batch},), got {got}")
        m, cache = self.model, self.cache
        B, E, H = self.batch, m.embedding_dim, m.num_heads
        D = E // H

        emb = m.tok_emb(tokens).unsqueeze(1)  # (B, 1, E)
        if self._prev_emb is None:
            delta = torch.zeros(B, 1, dtype=self._displacements.dtype, device=emb.device)
        else:
            delta = m.pos.compute_trajectory_displacements(torch.cat([self._prev_emb, emb], 1))[:, 1:]
        self._displacements = torch.cat([self._displacements, delta.to(self._displacements.dtype)], 1)
        x = emb + adaptive_positional_encoding(self._displacements, m.pos.pe_table)[:, -1:]
        cache_traj = self._step_of(x, self._prev_x0)[:, 0]  # (B, E): see the module doc
        self._prev_emb, self._prev_x0 = emb, x

        live = None
        for layer, block in enumerate(m.blocks):
            attn = block.attn
            h = block.ln1(x)
            q, k, v = (proj(h).view(B, 1, H, D).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            tau = attn._scales(self._step_of(h, self._prev_attn_in[layer]))  # (B, H, 1), the module's own math
            self._prev_attn_in[layer] = h
            cache.append(layer, k, v, cache_traj)
            if live is None:  # layer 0 decided the live set; every layer shares it
                live = cache.live_slots()[:B, None, None, :]  # (B, 1, 1, max_slots)
            keys, values = cache.gather(layer, self._slots)
            o = temperature_attention(q, keys, values, tau, attn_mask=live, scale=1.0)
            x = x + attn.out_proj(o.transpose(1, 2).reshape(B, 1, E))

            h2 = block.ln2(x)
            window = torch.cat([self._router_in[layer], h2], 1)[:, -(ROUTER_LOOKBACK + 1):]
            self._router_in[layer] = window
            probs = block.moe.router(window)[:, -1:]
            x = x + block.moe(h2, probs=probs)
        cache.step()
        self.length += 1
        return m.head(m.ln_f(x))[:, 0]


@torch.no_grad()
def generate(
    model: TrajectoryCharLM,
    prompt_ids: Tensor,
    max_new_tokens: int,
    cache_capacity: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    page_size: int = 16,
    alpha: float = 0.7,
    decay: float = 0.1,
) -> Tuple[Tensor, PagedTrajectoryKVCache]:
    """Continue ``prompt_ids`` by ``max_new_tokens`` sampled tokens, decoding through the KV cache.

    Args:
        model: the TrajectoryCharLM (put in eval mode for the call, then restored).
        prompt_ids: (T0,) or (B, T0) int64, T0 >= 1. The prompt is fed token by token too, so the
            cache (and its evictions) covers it like the generated text.
        max_new_tokens: tokens to sample (>= 0).
        cache_capacity: live tokens per row in the cache.
        temperature: softmax temperature of the sampling; 0 = greedy (argmax).
        top_k: sample among the k most likely tokens only (None = all).
        generator: torch.Generator for the sampling.
        page_size, alpha, decay: passed to the cache.

    Decoding is a sequence of tiny per-token ops: on CPU, ``torch.set_num_threads(1)`` is usually
    the fastest setting for it (``python -m demo.train`` does that around this call).

    Returns:
        (ids, cache): ids (B, T0 + max_new_tokens) (or (T0 + max_new_tokens,) for a 1-D prompt), and
        the PagedTrajectoryKVCache after the last token (``cache.stats()``).
    """
    if not isinstance(prompt_ids, Tensor) or prompt_ids.dtype != torch.long or prompt_ids.dim() not in (1, 2) \
            or prompt_ids.shape[-1] < 1:
        got = f"{prompt_ids.dtype} {list(prompt_ids.shape)}" if isinstance(prompt_ids, Tensor) else type(prompt_ids)
        raise ValueError(f"generate: prompt_ids must be int64 of shape (T0,) or (B, T0) with T0 >= 1, got {got}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    squeeze = prompt_ids.dim() == 1
    ids = prompt_ids.unsqueeze(0) if squeeze else prompt_ids
    was_training = model.training
    model.eval()
    try:
        dec = CachedDecoder(model, ids.shape[0], cache_capacity, page_size, alpha, decay)
        for t in range(ids.shape[1]):
            logits = dec.step(ids[:, t])
        out = [ids]
        for _ in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                scaled = logits / temperature
                if top_k is not None and top_k < scaled.shape[-1]:
                    kth = scaled.topk(top_k, dim=-1).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator)[:, 0]
            out.append(nxt[:, None])
            logits = dec.step(nxt)
    finally:
        model.train(was_training)
    result = torch.cat(out, 1)
    return (result[0] if squeeze else result), dec.cache
