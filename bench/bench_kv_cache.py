"""Benchmarks of ``trajops.PagedTrajectoryKVCache`` (ops trajops::kv_evict_append_, kv_topk).

Cases (forward only: the cache has no backward):

  insert  B=1, one layer, at capacity 256 and 4096 (page_size 16, traj_dim 64, 1 KV head of 64):
          the cache is pre-filled to capacity outside the timed region; each timed call appends ONE
          token and advances the clock (``append(0, k, v, traj)`` + ``step()``), i.e. one eviction
          (score every live entry, pick the lowest) and one write. The cache object lives in the
          provider's closure and is mutated by every call (warm-up, sizing, samples, peak memory):
          the steady state at capacity is kept, and the query trajectories cycle through a fixed
          bank shared by both providers. The issue's bar: naive/trajops >= 1000x at capacity 4096.
  topk    B=8 sequences of N=32768 live slots (2048 pages of 16 each, num_pages = 8*2048),
          traj_dim 64: score every slot and take the k best, k=1 (the cost of the eviction's
          bottom-1 pick: score all + one arg-extremum; kv_topk has no bottom-k, so top-1 is timed)
          and k=64 (top-k retrieval). The cache is filled through append in 4 chunks of 8192 tokens
          (random per-token trajectories, timestamps 0..3). The issue's bar: trajops/eager <= 0.8.

Memory per cached token (paged pools + metadata vs a dense (B, H, capacity, D) K/V cache) is not a
time, so it is computed from the caches' tensors at set-up and reported in the trajops provider's
note (the markdown's provider list; Case.info holds it too, but only the JSON shows Case.info).

Providers (roles in harness.py):
  naive     insert only: the seed's TrajectoryAwareKVCache (Python lists of tensors, per-entry
            torch.cosine_similarity(...).item() and math.exp, torch.argmin over torch.tensor(list),
            del from the lists, append), also pre-filled to capacity;
  eager     topk: vectorized PyTorch (gather the trajectories through the page table, one einsum
            for the cosines, exp recency, torch.topk);
  compiled  torch.compile of that eager function;
  target    trajops (``cache.append`` + ``cache.step()`` / ``cache.topk``), labelled "reference" while
            no kernel of the device is registered for the kv ops (they then run the reference);
  roofline  topk: ``traj_pool.sum()``, one read of the trajectory pool.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

import trajops
from harness import Case, Context, Provider

OP = "kv_cache"
ALPHA, DECAY, EPS = 0.7, 0.1, 1e-8


# ---------------------------------------------------------------------------------------------
# naive: the seed's list cache (seed 001, class TrajectoryAwareKVCache), verbatim but for the
# return value of update_cache (None in the seed) and comments.


class SeedTrajectoryAwareKVCache:
    """KV-Cache with trajectory-guided eviction, as the seed writes it (lists of tensors)."""

    def __init__(self, max_cache_size, embedding_dim):
        self.max_cache_size = max_cache_size
        self.embedding_dim = embedding_dim
        self.cached_keys = []
        self.cached_values = []
        self.cache_trajectories = []
        self.cache_timestamps = []
        self.current_time = 0

    def compute_cache_relevance(self, current_trajectory):
        if len(self.cached_keys) == 0:
            return torch.tensor([])
        relevance_scores = []
        for i, (cached_trajectory, timestamp) in enumerate(zip(self.cache_trajectories, self.cache_timestamps)):
            traj_similarity = torch.cosine_similarity(current_trajectory.unsqueeze(0),
                                                      cached_trajectory.unsqueeze(0)).item()
            recency = math.exp(-0.1 * (self.current_time - timestamp))
            relevance = 0.7 * traj_similarity + 0.3 * recency
            relevance_scores.append(relevance)
        return torch.tensor(relevance_scores)

    def update_cache(self, new_keys, new_values, current_trajectory):
        batch_size, seq_len, _ = new_keys.shape
        for b in range(batch_size):
            for s in range(seq_len):
                if len(self.cached_keys) >= self.max_cache_size:
                    relevance_scores = self.compute_cache_relevance(current_trajectory)
                    if len(relevance_scores) > 0:
                        min_idx = torch.argmin(relevance_scores).item()
                        del self.cached_keys[min_idx]
                        del self.cached_values[min_idx]
                        del self.cache_trajectories[min_idx]
                        del self.cache_timestamps[min_idx]
                self.cached_keys.append(new_keys[b, s])
                self.cached_values.append(new_values[b, s])
                self.cache_trajectories.append(current_trajectory.clone())
                self.cache_timestamps.append(self.current_time)
        self.current_time += 1


# ---------------------------------------------------------------------------------------------
# eager: vectorized scoring + top-k over the paged layout


def eager_topk(traj_pool: Tensor, ts_pool: Tensor, live_pool: Tensor, page_table: Tensor, query: Tensor,
               now: Tensor, k: int, alpha: float = ALPHA, decay: float = DECAY):
    """(slots (B, k), scores (B, k)): relevance of every logical slot, then torch.topk.

    Gathers whole pages through the page table ((B, MP) page ids -> (B, MP*S, Dt) trajectories);
    the stored trajectories are unit vectors, so the cosine is a dot product with the unit query.
    Ties are left to torch.topk (trajops breaks them by age then slot; with random trajectories
    there are none).
    """
    P, S, Dt = traj_pool.shape
    B = query.shape[0]
    pt = page_table[:B]
    has = pt >= 0
    pages = pt.clamp_min(0)
    traj = traj_pool[pages].reshape(B, -1, Dt)  # (B, L, Dt)
    present = (live_pool[pages] & has[..., None]).reshape(B, -1)
    ts = ts_pool[pages].reshape(B, -1)
    q = query.float() / query.float().norm(dim=-1, keepdim=True).clamp_min(EPS)
    cos = torch.einsum("bld,bd->bl", traj, q)
    score = alpha * cos + (1.0 - alpha) * torch.exp(-decay * (now - ts).float())
    score = score.masked_fill(~present, -math.inf)
    top = torch.topk(score, k, dim=1)
    slots = torch.where(top.values > -math.inf, top.indices, -1)
    return slots, top.values


# ---------------------------------------------------------------------------------------------
# set-up helpers


def _unfused_topk(traj_pool: Tensor, ts_pool: Tensor, live_pool: Tensor, page_table: Tensor, query: Tensor,
                  now: Tensor, k: int):
    """kv_topk as the CUDA backend ran it before the fused kernels (GPU provider only)."""
    from trajops import reference
    from trajops.triton_kernels import kv_cache as kernels

    return reference.kv_topk(traj_pool, ts_pool, live_pool, page_table, query, now, ALPHA, DECAY, k,
                             scorer=kernels.kv_scores)


def _paged_bytes(cache) -> dict:
    """Bytes of every state tensor the paged cache holds, split K/V vs metadata, per live token (the
    private _written/_evicted, the last append's (B, n) outputs kept for the other layers, are not
    state and are left out)."""
    tensors = {name: t for name, t in vars(cache).items() if isinstance(t, Tensor) and not name.startswith("_")}
    kv = cache.k_pool.nbytes + cache.v_pool.nbytes
    total = sum(t.nbytes for t in tensors.values())
    live = int(cache.live_count.sum())
    return {"live_tokens": live, "total_bytes": total, "kv_bytes": kv,
            "bytes_per_token": total / live, "kv_bytes_per_token": kv / live,
            "meta_bytes_per_token": (total - kv) / live,
            "traj_bytes_per_token": cache.traj_pool.nbytes / live}


def _mem_line(tag: str, cache, B: int, cap: int) -> tuple:
    """(info dict, one-line summary) of the paged cache vs a dense (B, H, cap, D) K/V cache (same dtype,
    both at the paged cache's current fill)."""
    pb = _paged_bytes(cache)
    esize = torch.finfo(cache.dtype).bits // 8
    dense = 2 * B * cache.num_kv_heads * cap * cache.head_dim * esize * cache.num_layers
    info = {**pb, "dense_kv_bytes": dense, "dense_bytes_per_token": dense / pb["live_tokens"],
            "paged_over_dense": pb["total_bytes"] / dense}
    line = (f"{tag}: paged {pb['bytes_per_token']:.1f} B/token (K+V {pb['kv_bytes_per_token']:.0f}, metadata "
            f"{pb['meta_bytes_per_token']:.1f} of which trajectory {pb['traj_bytes_per_token']:.0f}) vs dense "
            f"{info['dense_bytes_per_token']:.0f} B/token = {info['paged_over_dense']:.3g}x, at "
            f"{pb['live_tokens']} live tokens of {B * cap}")
    return info, line


def _fill(cache, B: int, n_tokens: int, chunk: int, gen: torch.Generator, device) -> None:
    """Append n_tokens per sequence in chunks (one step() after each, so timestamps differ), with a
    random trajectory per token and random K/V."""
    H, D, Dt = cache.num_kv_heads, cache.head_dim, cache.traj_dim
    done = 0
    while done < n_tokens:
        n = min(chunk, n_tokens - done)
        k = torch.randn(B, H, n, D, generator=gen).to(device=device, dtype=cache.dtype)
        v = torch.randn(B, H, n, D, generator=gen).to(device=device, dtype=cache.dtype)
        tr = torch.randn(B, n, Dt, generator=gen).to(device)
        for layer in range(cache.num_layers):
            cache.append(layer, k, v, tr)
        cache.step()
        done += n


def _insert_setup(cap: int, S: int, Dt: int, H: int, D: int, device, gen: torch.Generator, n_bank: int = 257):
    """A paged cache and a seed list cache, both pre-filled to capacity; a shared bank of query
    trajectories and one token's K/V."""
    cache = trajops.PagedTrajectoryKVCache(1, -(-cap // S), S, H, D, Dt, 1, cap, alpha=ALPHA, decay=DECAY,
                                           device=device)
    _fill(cache, 1, cap, 256, gen, device)
    assert int(cache.live_count[0]) == cap, cache.stats()
    seed = SeedTrajectoryAwareKVCache(cap, Dt)
    pre = torch.randn(cap, 3, Dt, generator=gen).to(device)
    for i in range(cap):  # one token per call: distinct trajectories and timestamps, no eviction yet
        seed.update_cache(pre[i, 0].view(1, 1, Dt), pre[i, 1].view(1, 1, Dt), pre[i, 2])
    assert len(seed.cached_keys) == cap
    bank = torch.randn(n_bank, Dt, generator=gen).to(device)
    k_tok = torch.randn(1, H, 1, D, generator=gen).to(device)
    v_tok = torch.randn(1, H, 1, D, generator=gen).to(device)
    return cache, seed, bank, k_tok, v_tok


def _backend(device) -> str:
    """What the cache's ops run on `device`: trajops.backends()' name when a kernel for that device is
    registered for them, else "reference" (until the kernels land, every device falls back to the
    CompositeExplicitAutograd reference, whatever backends() says for the other ops)."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        has = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"trajops::{op}", key)
                  for op in ("kv_topk", "kv_evict_append_"))
    except Exception:  # noqa: BLE001 -- private API moved: fall back to the package's own word
        has = True
    return trajops.backends()[device.type] if has else "reference"


def benchmarks(ctx: Context):
    """List of (Case, [Provider]) for this op on ctx.device."""
    dev = ctx.device
    S, Dt, H, D = 16, 64, 1, 64
    if ctx.quick:
        caps, (Bt, Nt), ks, fill_chunk = (32, 128), (2, 256), (1, 64), 64
    else:
        caps, (Bt, Nt), ks, fill_chunk = (256, 4096), (8, 32768), (1, 64), 8192
    dtype = torch.float32
    backend = _backend(dev)
    gen = torch.Generator().manual_seed(0)

    # ---- set-up of every cache first: the memory summary goes into the (shared) trajops note
    inserts = []
    mem_lines = []
    for cap in caps:
        setup = _insert_setup(cap, S, Dt, H, D, dev, gen)
        info, line = _mem_line(f"B=1 cap={cap}", setup[0], 1, cap)
        inserts.append((cap, setup, info))
        mem_lines.append(line)
    MP = -(-Nt // S)
    big = trajops.PagedTrajectoryKVCache(1, Bt * MP, S, H, D, Dt, Bt, Nt, alpha=ALPHA, decay=DECAY, device=dev)
    _fill(big, Bt, Nt, fill_chunk, gen, dev)
    assert bool((big.live_count == Nt).all()), big.stats()
    big_info, line = _mem_line(f"B={Bt} cap={Nt}", big, Bt, Nt)
    mem_lines.append(line)
    query = torch.randn(Bt, Dt, generator=gen).to(dev)

    target_note = (
        "insert: cache.append(0, k, v, traj) of one token + cache.step() on a cache kept at capacity "
        "(one eviction + one write per call; returns the evicted slot); topk: cache.topk(query, k). "
        "Memory per live token (all tensors of the paged cache: K/V pools, fp32 unit trajectories, int64 "
        "timestamps, live/pinned flags, page table, free-page stack, counters) vs a dense (B, H, capacity, D) "
        f"fp32 K/V cache holding K and V only: {'; '.join(mem_lines)}. Both are preallocated, so at a fill f "
        "both divide by f; the paged pool can be smaller than B full sequences (overcommitted), a dense cache "
        "cannot. The seed's list cache holds 3 fp32 rows per token (key, value, trajectory: "
        f"{3 * Dt * 4} B) plus 3 Python tensor objects, and its key/value rows are views that keep each "
        "appended (B, S, E) input alive.")

    items = []
    # ---- insert: one token at capacity
    for cap, (cache, seed, bank, k_tok, v_tok), mem_info in inserts:
        state = {"paged": 0, "seed": 0}

        def paged_insert(*_, cache=cache, bank=bank, k=k_tok, v=v_tok, state=state):
            i = state["paged"]
            state["paged"] = (i + 1) % bank.shape[0]
            evicted = cache.append(0, k, v, bank[i:i + 1])
            cache.step()
            return evicted

        def seed_insert(*_, seed=seed, bank=bank, k=k_tok, v=v_tok, state=state):
            i = state["seed"]
            state["seed"] = (i + 1) % bank.shape[0]
            # the seed's K/V rows are (E,) = (H*D,) of (B, S, E); its trajectory is (E,)
            seed.update_cache(k.reshape(1, 1, H * D), v.reshape(1, 1, H * D), bank[i])
            return seed.cached_keys[-1]

        esize = torch.finfo(dtype).bits // 8
        mp = -(-cap // S)
        # an ideal insert reads every live entry's trajectory, timestamp and flags (to score them),
        # the page table, and writes one slot's K, V and metadata
        nbytes = cap * (4 * Dt + 8 + 2) + 8 * mp + 2 * H * D * esize + (4 * Dt + 8 + 2)
        case = Case(OP, f"insert n=1 at capacity B=1 cap={cap} page={S} Dt={Dt} H={H} D={D}", dtype,
                    lambda: (), modes=("fwd",), bytes={"fwd": nbytes},
                    info={"B": 1, "capacity": cap, "page_size": S, "traj_dim": Dt, "num_kv_heads": H,
                          "head_dim": D, "num_layers": 1, "n_new": 1, "alpha": ALPHA, "decay": DECAY,
                          "memory": mem_info})
        provs = [
            Provider("naive", "seed list cache (TrajectoryAwareKVCache)", seed_insert, role="naive",
                     note=("the seed's update_cache of one token on a list cache at capacity (E = traj dim = "
                           f"{Dt} = H*D): per entry torch.cosine_similarity(...).item() and math.exp, then "
                           "torch.argmin(torch.tensor(list)).item(), del from the 4 lists, append; pre-filled "
                           "with one token per call (distinct trajectories and timestamps); full calls, no "
                           "extrapolation")),
            Provider("trajops", f"trajops ({backend})", paged_insert, role="target", note=target_note),
        ]
        items.append((case, provs))

    # ---- topk: score every slot of B sequences, k best
    compiled = torch.compile(eager_topk, dynamic=False) if ctx.compile else None
    inputs = (big.traj_pool, big.ts_pool, big.live_pool, big.page_table, query, big.now)
    L = MP * S
    # set-up check: eager and trajops agree (slots exactly, scores to fp32 rounding); one line for
    # every k in the eager note (the markdown shows one note per provider name)
    checks = {}
    for k in ks:
        with torch.no_grad():
            s_ref, v_ref = big.topk(query, k)
            s_eag, v_eag = eager_topk(*inputs, k)
        mism = int((s_ref != s_eag).sum())
        diff = torch.where(v_ref == v_eag, 0.0, (v_ref - v_eag).abs())  # equal -inf pads -> 0, not nan
        err = float(diff.max())
        checks[k] = f"k={k}: {mism} of {Bt * k} slots differ, max |score diff| {err:.2g}"
        if mism or not err <= 1e-5:
            print(f"    [{OP}] topk eager vs trajops at set-up: {checks[k]}", flush=True)
    check_note = "eager vs trajops at set-up: " + "; ".join(checks.values())
    for k in ks:
        check = checks[k]
        nbytes = (Bt * L * (4 * Dt + 8 + 1)  # trajectories, timestamps, live flags
                  + Bt * MP * 8 + Bt * Dt * 4 + Bt * k * 12)  # page table, queries, outputs
        case = Case(OP, f"topk k={k}{' (bottom-1 cost)' if k == 1 else ''} B={Bt} N={Nt} page={S} Dt={Dt}",
                    dtype, lambda: inputs, modes=("fwd",), bytes={"fwd": nbytes},
                    info={"B": Bt, "slots_per_seq": Nt, "page_size": S, "num_pages": Bt * MP, "traj_dim": Dt,
                          "k": k, "alpha": ALPHA, "decay": DECAY, "filled_in_chunks_of": fill_chunk,
                          "check": check, "memory": big_info})
        provs = [Provider("eager", "eager vectorized (page gather, einsum, exp, topk)",
                          lambda *inp, k=k: eager_topk(*inp, k), role="eager",
                          note=("traj_pool[page_table] -> (B, N, Dt), einsum with the unit query, "
                                "alpha*cos + (1-alpha)*exp(-decay*age), -inf on dead slots, torch.topk; "
                                "k=1 is the cost of the eviction's bottom-1 (same scoring, one arg-extremum). "
                                + check_note))]
        if compiled is not None:
            provs.append(Provider("compile", "torch.compile(eager)", lambda *inp, k=k: compiled(*inp, k),
                                  role="compiled", warmup=2,
                                  note="dynamic=False (one graph per k); compile time excluded"))
        provs += [
            Provider("trajops", f"trajops ({backend})", lambda *inp, k=k: big.topk(inp[4], k), role="target",
                     note=target_note),
        ]
        if dev.type == "cuda" and backend == "triton":
            # the path the fused kernels replaced (reference ranking around the Triton scorer): the
            # fused-vs-unfused ratio on the same GPU, same inputs
            provs.append(Provider("unfused", "trajops unfused (reference ranking + Triton scorer)",
                                  lambda *inp, k=k: _unfused_topk(*inp, k), role="other",
                                  note="trajops.reference.kv_topk(scorer=triton kv_scores): ~20 launches"))
        provs += [
            Provider("roofline", "roofline (traj_pool.sum())", lambda *inp: inp[0].sum(), role="roofline",
                     note=(f"one read of the fp32 trajectory pool (B*N*Dt*4 = {Bt * L * Dt * 4 / 2**20:.3g} MiB, "
                           f"{100 * Bt * L * Dt * 4 / nbytes:.0f}% of the ideal bytes, the rest being timestamps, "
                           "live flags and the page table): a sum, not a clone, because the op reads the pool and "
                           "writes only B*k outputs; a clone would add a write of the same size and double the "
                           "floor")),
        ]
        items.append((case, provs))
    return items
