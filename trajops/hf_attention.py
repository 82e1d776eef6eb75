"""The transformers attention ``"trajops_paged"``: attention that reads a ``TrajectoryEvictionCache``'s page pools.

Use: ``import trajops.hf`` (it registers the name, see below), then load or configure the model with
``attn_implementation="trajops_paged"`` (or ``model.set_attn_implementation("trajops_paged")``) and pass a
``TrajectoryEvictionCache(model.config, capacity)`` as ``past_key_values``. Registration happens at import of
``trajops.hf`` (``register_paged_attention()``, idempotent, is called there; call it again only after something
else replaced the names).

How it avoids the gather. With the gather path, the cache's ``update`` returns cat([old live entries, new]) for
every layer of every forward: a dense copy of the whole kept context per layer per token. Here the cache is told
by the config (``config._attn_implementation == "trajops_paged"``, read at each forward) to use the paged protocol
of :class:`~trajops.kv_forward.ForwardKVCache`: ``update`` only *stages* the layer's new K/V and returns them
(tagged with the cache); the attention function then calls ``cache.attend(query, layer, scale, mask)``, which
computes the old part with ``trajops::paged_temperature_attention`` (tau = 1, the module's scale, GQA) straight
from the pools and the new tokens causally among themselves -- in the same call (the op's k_new / v_new) for a
decode step or a short causal chunk, else ``trajops.temperature_attention`` merged by log-sum-exp
(trajops/kv_attention.py) -- and only then writes the layer into the store. Writing after attending is what keeps the semantics of the gather path: an entry evicted at layer 0 of a
forward (its slot reused by a new token) is still in layer l's pool when layer l attends, and the page table /
live flags the forward reads are copies taken before layer 0's write.

Masks: the name is registered in ``AttentionMaskInterface`` with transformers' ``sdpa_mask`` (a bool mask over
[old in position order ++ new], the same as the gather path's, None when it is plain causal). The new tokens take
it as given; the old entries per key (a key-padding mask: left padding, pinned by ``mark_padding``). A mask that
differs between the queries of a row over the old entries (a custom 4-D mask) raises NotImplementedError;
float masks raise TypeError.

Fallback: when the key states are not tagged (``past_key_values`` is a ``DynamicCache``, None, or a
``TrajectoryEvictionCache`` built with ``paged_attention=False``), the call goes to transformers' SDPA attention
unchanged. Inference only: the paged op has no backward (a forward with grad raises, naming no_grad).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["PAGED_ATTENTION", "register_paged_attention", "paged_attention_forward"]

PAGED_ATTENTION = "trajops_paged"
_TAG = "_trajops_paged_cache"


def tag_keys(cache, key_states: Tensor) -> Tensor:
    """A view of the staged keys that carries the cache to the attention function (transformers passes only
    ``module, query, key, value, mask`` through; the cache object itself does not reach the attention)."""
    tagged = key_states.detach()  # a new tensor object on the same data (5x cheaper than a view by shape); the
    setattr(tagged, _TAG, cache)  # paged path is inference only, so dropping the (absent) autograd edge changes nothing
    return tagged


def paged_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                            **kwargs) -> Tuple[Tensor, None]:
    """transformers attention function: (attn_output (B, n, Hq, Dv), None).

    query (B, Hq, n, D); key, value (B, Hkv, n, D): this forward's tokens staged by a ``TrajectoryEvictionCache``
    (tagged), or anything else (then SDPA runs on them as given). attention_mask: None or bool
    (B, 1, n, live + n) from ``sdpa_mask``. scaling: the module's logit scale.
    """
    cache = getattr(key, _TAG, None)
    if cache is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    for name in ("softcap", "sliding_window", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{PAGED_ATTENTION}: `{name}` is not supported (the paged path is plain "
                                      "causal softmax attention)")
    if kwargs.get("is_causal") is False:
        raise NotImplementedError(f"{PAGED_ATTENTION}: is_causal=False is not supported")
    if dropout and module.training:
        raise NotImplementedError(f"{PAGED_ATTENTION}: attention dropout is not supported (inference only)")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise TypeError(f"{PAGED_ATTENTION}: attention_mask must be bool (True = attend), got {attention_mask.dtype}; "
                        "the mask function registered for this implementation builds one")
    out = cache.attend(query, module.layer_idx, scale=scaling, attn_mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None


def register_paged_attention() -> None:
    """Register ``"trajops_paged"`` in transformers' attention and mask interfaces (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(PAGED_ATTENTION, paged_attention_forward)
    AttentionMaskInterface.register(PAGED_ATTENTION, sdpa_mask)
