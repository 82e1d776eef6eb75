"""trajops.hf.TrajectoryEvictionCache: transformers generate() with an evicting, trajectory-guided KV cache."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from conftest import left_padded_prompt  # noqa: E402

from trajops.hf import TrajectoryEvictionCache  # noqa: E402

PROMPT = [7, 4]  # real tokens per row; row 1 is left padded to 7
CAP = 8


def tiny_config(attn: str = "sdpa", **kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                       attn_implementation=attn, pad_token_id=0, **kw)


def tiny_model(attn: str):
    cfg = tiny_config(attn)
    torch.manual_seed(0)
    return cfg, LlamaForCausalLM(cfg).eval()


def padded_prompt():
    return left_padded_prompt(PROMPT)


def greedy(model, ids, mask, new, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **kw)


# ---------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_equals_dynamic_cache_when_nothing_is_evicted(attn):
    cfg, model = tiny_model(attn)
    ids, mask = padded_prompt()
    new = 4 * CAP
    ref = greedy(model, ids, mask, new, past_key_values=DynamicCache(config=cfg))
    cache = TrajectoryEvictionCache(cfg, ids.shape[1] + new).mark_padding(mask)
    out = greedy(model, ids, mask, new, past_key_values=cache)
    assert torch.equal(out, ref)
    assert int(cache.stats()["evicted_total"].sum()) == 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_eviction_memory_and_positions(attn):
    cfg, model = tiny_model(attn)
    ids, mask = padded_prompt()
    T, new = ids.shape[1], 4 * CAP  # capacity 8 of 39 tokens (~20%)
    ref = greedy(model, ids, mask, new)
    cache = TrajectoryEvictionCache(cfg, CAP, page_size=4).mark_padding(mask)
    seen_log, bytes_log, pos_log = [], [], []

    def pre_hook(module, args, kwargs):
        seen_log.append((cache.get_seq_length(), kwargs["input_ids"].shape[1]))
        bytes_log.append(cache.kv_bytes())
        pos_log.append(kwargs["position_ids"][:, -1].clone())

    h = model.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        out = greedy(model, ids, mask, new, past_key_values=cache)
    finally:
        h.remove()
    assert out.shape == (2, T + new)
    # exact until the first forward that misses an evicted entry: prefill, seen=7 and seen=8 (its old set is whole)
    assert torch.equal(out[:, : T + 3], ref[:, : T + 3])
    # memory: the pools are allocated once, sized for capacity, never grow
    H, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    expected = 2 * cfg.num_hidden_layers * cache.max_batch_size * 2 * 4 * H * D * 4  # 2 pages of 4 slots per row
    assert bytes_log[0] == 0 and set(bytes_log[1:]) == {expected} and cache.kv_bytes() == expected
    st = cache.stats()
    assert st["live"].tolist() == [CAP, CAP]
    assert int(st["pages_in_use"]) == 4
    # logical length: every forward starts at the tokens seen so far; the last forward saw T + new - 1 tokens
    consumed = 0
    for seen, n in seen_log:
        assert seen == consumed
        consumed += n
    assert cache.get_seq_length() == consumed == T + new - 1
    # positions keep counting past the capacity (RoPE positions are not capped), per row after its padding
    last = torch.stack(pos_log)  # (forwards, B)
    pad = torch.tensor([T - n for n in PROMPT])
    assert torch.equal(last[0], T - 1 - pad)
    assert torch.equal(last[1:] - last[:-1], torch.ones_like(last[1:]))
    assert torch.equal(last[-1], T + new - 2 - pad)
    # the padding is pinned: row 1 still holds its 3 padding tokens, first
    kept = cache.kept_positions()
    assert kept[1, :3].tolist() == [0, 1, 2]
    assert kept.shape == (2, CAP) and bool((kept[:, 1:] > kept[:, :-1]).all())


def test_beam_search_equals_dynamic_cache():
    cfg, model = tiny_model("sdpa")
    ids, mask = padded_prompt()
    ref = greedy(model, ids, mask, 12, num_beams=2)
    cache = TrajectoryEvictionCache(cfg, ids.shape[1] + 12).mark_padding(mask)
    out = greedy(model, ids, mask, 12, num_beams=2, past_key_values=cache)
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_beam_search_with_eviction_runs():
    cfg, model = tiny_model("eager")
    ids, mask = padded_prompt()
    cache = TrajectoryEvictionCache(cfg, CAP).mark_padding(mask)
    out = greedy(model, ids, mask, 3 * CAP, num_beams=2, past_key_values=cache)
    assert out.shape == (2, ids.shape[1] + 3 * CAP)
    assert cache.stats()["live"].tolist() == [CAP] * 4
    assert cache.kept_positions()[2:, :3].tolist() == [[0, 1, 2]] * 2  # row 1's beams kept its padding


# ---------------------------------------------------------------------------------------------- update() by hand
def _kv(B, n, start, layer, H=2, D=16, feat=None):
    """Keys/values whose channel 0 encodes 1000 * layer + position; channel 1..: the designed feature."""
    k = torch.zeros(B, H, n, D)
    k[..., 0] = (1000 * layer + start + torch.arange(n, dtype=torch.float32))
    v = k.clone()
    if feat is not None:  # (B, n, D - 1): the values carry only the feature
        v[..., 0] = 0.0
        v[..., 1:] = feat[:, None]
    return k, v


def _forward(cache, n, layers=2, B=1, feat=None, traj=None):
    """One forward of n tokens through every layer; returns each layer's returned keys' channel 0."""
    start = cache.get_seq_length()
    if traj is not None:
        cache.set_trajectory(traj)
    got = []
    for layer in range(layers):
        k, v = _kv(B, n, start, layer, feat=feat)
        rk, rv = cache.update(k, v, layer)
        assert rk.shape == rv.shape == (B, 2, cache._live_before + n, 16)
        assert torch.equal(rk[:, :, -n:], k) and torch.equal(rv[:, :, -n:], v)  # the new tokens, as given
        got.append(rk[:, 0, :, 0] - 1000 * layer)
    return got


@pytest.fixture
def unit_cache(monkeypatch):
    def make(capacity, **kw):
        cache = TrajectoryEvictionCache(tiny_config(), capacity, page_size=2, **kw)
        orig = cache.update

        def update(k, v, layer_idx, *a, **kw2):  # remember the live count the forward started with
            if layer_idx == 0:
                cache._live_before = cache._live
            return orig(k, v, layer_idx, *a, **kw2)

        monkeypatch.setattr(cache, "update", update)
        return cache
    return make


def _onehot(*idx, D=16):
    t = torch.zeros(1, len(idx), D)
    t[0, torch.arange(len(idx)), torch.tensor(idx)] = 1.0
    return t


def test_update_returns_sorted_old_then_new_and_mask_sizes(unit_cache):
    cache = unit_cache(4, alpha=1.0)
    assert cache.get_mask_sizes(5, 0) == (5, 0) and cache.get_query_offset(0) == 0
    got = _forward(cache, 4, traj=_onehot(0, 1, 0, 1))
    assert all(g.tolist() == [[0, 1, 2, 3]] for g in got)
    assert (cache.get_seq_length(), cache.get_query_offset(0), cache.get_mask_sizes(1, 1)) == (4, 4, (5, 0))
    # newest trajectory e0: the entries under e1 score cos 0; ties -> the older / lower slot: position 1 goes
    got = _forward(cache, 1, traj=_onehot(0))
    assert all(g.tolist() == [[0, 1, 2, 3, 4]] for g in got)  # this forward still saw everything
    assert cache.kept_positions().tolist() == [[0, 2, 3, 4]]
    # position 4 took the freed slot 1, so slot order is [0, 4, 2, 3]: the returned old part must be sorted
    assert cache.store.page_table[0, 0] >= 0
    got = _forward(cache, 1, traj=_onehot(1))
    assert all(g.tolist() == [[0, 2, 3, 4, 5]] for g in got)
    assert cache.kept_positions().tolist() == [[2, 3, 4, 5]]  # e1 newest: position 3 matches, 0 is the oldest e0
    assert (cache.get_seq_length(), cache.get_query_offset(0), cache.get_mask_sizes(1, 0)) == (6, 4, (5, 0))
    got = _forward(cache, 1, traj=_onehot(1))
    assert all(g.tolist() == [[2, 3, 4, 5, 6]] for g in got)


def test_long_forward_sees_everything_and_keeps_the_last_capacity(unit_cache):
    cache = unit_cache(4)
    _forward(cache, 3)
    got = _forward(cache, 6)  # n > capacity
    assert all(g.tolist() == [list(range(9))] for g in got)
    assert cache.kept_positions().tolist() == [[5, 6, 7, 8]]
    assert cache.get_seq_length() == 9 and cache.get_query_offset(0) == 4
    assert cache.stats()["live"].tolist() == [4]


def test_default_trajectory_is_the_step_of_mean_values_and_overrides_change_the_kept_set(unit_cache):
    # values' channels 1.. carry a feature f_t; default trajectory = f_t - f_{t-1}
    f = torch.zeros(1, 5, 15)
    f[0, 0, 0] = 1.0          # step e0
    f[0, 1] = f[0, 0]; f[0, 1, 1] = 1.0   # step e1
    f[0, 2] = f[0, 1]; f[0, 2, 0] += 1.0  # step e0
    f[0, 3] = f[0, 2]; f[0, 3, 1] += 1.0  # step e1
    f[0, 4] = f[0, 3]; f[0, 4, 0] += 1.0  # step e0 (the newest)
    feat = f

    def run(**kw):
        cache = unit_cache(4, alpha=1.0, **kw)
        _forward(cache, 4, feat=feat[:, :4])
        _forward(cache, 1, feat=feat[:, 4:])
        return cache.kept_positions().tolist()[0]

    # default: steps of the values' head mean: e0 e1 e0 e1 | e0 -> the e1 steps (positions 1, 3) score cos 0,
    # the older of the two goes
    assert run() == [0, 2, 3, 4]
    # a caller's feature of the values (here a permutation of the channels) follows the same steps
    assert run(trajectory_fn=lambda k, v: v.float().mean(1).flip(-1)) == [0, 2, 3, 4]
    # a feature of the keys' position code: the first step is zero (cos 0), all later ones are equal (cos 1)
    assert run(trajectory_fn=lambda k, v: k[..., :1].float().mean(1), traj_dim=1) == [1, 2, 3, 4]


def test_set_trajectory_is_used_for_one_forward_only(unit_cache):
    cache = unit_cache(2, alpha=1.0, trajectory_fn=lambda k, v: torch.zeros(k.shape[0], k.shape[2], 16))
    _forward(cache, 2, traj=_onehot(3, 5))
    _forward(cache, 1, traj=_onehot(5))  # evict the e3 token (position 0)
    assert cache.kept_positions().tolist() == [[1, 2]]
    assert cache._pending_traj is None
    _forward(cache, 1)  # zero trajectories: recency -> the oldest (position 1) goes
    assert cache.kept_positions().tolist() == [[2, 3]]
    with pytest.raises(ValueError, match="set_trajectory"):
        cache.set_trajectory(torch.zeros(1, 2, 16))
        _forward(cache, 1)


def test_sinks_with_alpha_zero_is_a_sliding_window(unit_cache):
    cache = unit_cache(6, alpha=0.0, sinks=2)
    _forward(cache, 5)
    for _ in range(7):
        _forward(cache, 1)
    assert cache.kept_positions().tolist() == [[0, 1, 8, 9, 10, 11]]


# ---------------------------------------------------------------------------------------------- batch surgery
def _drive(cache, data, steps):
    """Prefill then decode with per-row random data; returns the keys every forward returned (layer 1)."""
    outs = []
    for n, (k0, k1) in zip(steps, data):
        for layer, k in enumerate((k0, k1)):
            rk, _ = cache.update(k, k * 2, layer)
        outs.append(rk)
    return outs


def _random_steps(B, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(B, 2, n, 16, generator=g) for _ in range(2)) for n in steps]


@pytest.mark.parametrize("select", ["reorder", "select", "repeat"])
def test_row_selection_equals_running_the_selected_rows(select):
    cfg = tiny_config()
    before, after = [5, 1, 1, 1], [1, 1, 3, 1]
    data = _random_steps(3, before + after, seed=3)
    idx = {"reorder": torch.tensor([2, 0, 2]), "select": torch.tensor([True, False, True]),
           "repeat": torch.tensor([0, 0, 1, 1, 2, 2])}[select]
    rows = idx.nonzero().flatten() if idx.dtype == torch.bool else idx
    cache = TrajectoryEvictionCache(cfg, 6, page_size=2)
    _drive(cache, data[:4], before)
    if select == "reorder":
        cache.reorder_cache(idx)
    elif select == "select":
        cache.batch_select_indices(idx)
    else:
        cache.batch_repeat_interleave(2)
    ref = TrajectoryEvictionCache(cfg, 6, page_size=2)
    _drive(ref, [(a[rows], b[rows]) for a, b in data[:4]], before)
    assert torch.equal(cache.kept_positions(), ref.kept_positions())
    for key in ("live", "evicted_total"):
        assert torch.equal(cache.stats()[key], ref.stats()[key])
    got = _drive(cache, [(a[rows], b[rows]) for a, b in data[4:]], after)
    want = _drive(ref, [(a[rows], b[rows]) for a, b in data[4:]], after)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert torch.equal(cache.kept_positions(), ref.kept_positions())
    assert int(cache.stats()["pages_in_use"]) == int(ref.stats()["pages_in_use"])


# ---------------------------------------------------------------------------------------------- errors
def test_mark_padding_errors():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="left padding"):
        TrajectoryEvictionCache(cfg, 8).mark_padding(torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        TrajectoryEvictionCache(cfg, 8).mark_padding(torch.tensor([[0, 2, 1]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        TrajectoryEvictionCache(cfg, 8).mark_padding(torch.ones(3))
    cache = TrajectoryEvictionCache(cfg, 4).mark_padding(torch.tensor([[0, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="longer than capacity"):
        cache.update(*_kv(1, 5, 0, 0), 0)
    cache = TrajectoryEvictionCache(cfg, 8).mark_padding(torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="length 3"):
        cache.update(*_kv(1, 4, 0, 0), 0)
    cache = TrajectoryEvictionCache(cfg, 8)
    cache.update(*_kv(1, 2, 0, 0), 0)
    cache.update(*_kv(1, 2, 0, 1), 1)
    with pytest.raises(ValueError, match="before the first forward"):
        cache.mark_padding(torch.ones(1, 2))


def test_padded_generate_rejects_a_prompt_longer_than_capacity():
    cfg, model = tiny_model("sdpa")
    ids, mask = padded_prompt()
    with pytest.raises(ValueError, match="longer than capacity"):
        greedy(model, ids, mask, 2, past_key_values=TrajectoryEvictionCache(cfg, 5).mark_padding(mask))


@pytest.mark.parametrize("kw", [dict(capacity=0), dict(capacity=4.0), dict(max_batch_size=0), dict(page_size=0),
                                dict(alpha=1.5), dict(decay=-1.0), dict(sinks=9), dict(traj_dim=0),
                                dict(dtype=torch.long), dict(trajectory_fn=3)])
def test_bad_constructor_args(kw):
    args = dict(capacity=8)
    args.update(kw)
    with pytest.raises((ValueError, TypeError)):
        TrajectoryEvictionCache(tiny_config(), **args)


def test_bad_configs_and_calls():
    with pytest.raises(ValueError, match="full-attention"):
        TrajectoryEvictionCache(tiny_config(layer_types=["full_attention", "sliding_attention"]), 8)
    cache = TrajectoryEvictionCache(tiny_config(), 8, max_batch_size=2)
    with pytest.raises(ValueError, match="max_batch_size"):
        cache.update(*_kv(3, 1, 0, 0), 0)
    with pytest.raises(RuntimeError, match="expected layer 0"):
        cache.update(*_kv(1, 1, 0, 1), 1)
    with pytest.raises(NotImplementedError, match="assisted"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="trajectory_fn must return"):
        TrajectoryEvictionCache(tiny_config(), 8, trajectory_fn=lambda k, v: k).update(*_kv(1, 1, 0, 0), 0)
    cache.update(*_kv(1, 2, 0, 0), 0)
    cache.update(*_kv(1, 2, 0, 1), 1)
    with pytest.raises(ValueError, match="batch size changed"):
        cache.update(*_kv(2, 1, 2, 0), 0)


def test_cache_api_surface():
    cfg = tiny_config()
    cache = TrajectoryEvictionCache(cfg, 8)
    assert len(cache) == 2 and not cache.is_initialized and not cache.is_compileable and not cache.is_croppable
    assert cache.get_max_length() == -1 and cache.get_max_cache_shape() == -1 and cache.kv_bytes() == 0
    assert cache.get_mask_sizes(torch.arange(3), 0) == (3, 0)  # older signature: cache_position
    cache.update(*_kv(1, 2, 0, 0), 0)
    cache.update(*_kv(1, 2, 0, 1), 1)
    assert cache.is_initialized and cache.get_seq_length() == 2 and cache.kv_bytes() > 0
    cache.reset()
    assert not cache.is_initialized and cache.get_seq_length() == 0 and cache.kv_bytes() == 0


def test_import_trajops_does_not_import_transformers_and_hf_says_how_to_install():
    env = dict(os.environ)
    code = ("import sys, trajops; assert 'transformers' not in sys.modules, 'transformers imported';"
            "sys.modules['transformers'] = None\n"
            "try:\n    import trajops.hf\nexcept ImportError as e:\n    assert 'pip install trajops[hf]' in str(e), e\n"
            "else:\n    raise SystemExit('no ImportError')")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout


# ---------------------------------------------------------------------------------------------- supported versions
def _fresh_import_hf(monkeypatch, version):
    """Import trajops.hf anew with importlib.metadata reporting `version` for transformers (None: not installed)."""
    import importlib
    import importlib.metadata
    import trajops
    import trajops.hf

    real = importlib.metadata.version

    def fake(name):
        if name != "transformers":
            return real(name)
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(importlib.metadata, "version", fake)
    monkeypatch.delitem(sys.modules, "trajops.hf")
    monkeypatch.setattr(trajops, "hf", trajops.hf)  # restored afterwards, like sys.modules
    return importlib.import_module("trajops.hf")


@pytest.mark.parametrize("version", ["5.24.0", "6.0.0", "5.16.2", "4.57.1", "not-a-version", None])
def test_import_outside_the_supported_range_names_it(monkeypatch, version):
    from trajops.hf import SUPPORTED_TRANSFORMERS
    with pytest.raises(ImportError) as err:
        _fresh_import_hf(monkeypatch, version)
    msg = str(err.value)
    assert SUPPORTED_TRANSFORMERS in msg and "pip install trajops[hf]" in msg
    assert f"found: {version or 'none'}" in msg


@pytest.mark.parametrize("version", ["5.17.0", "5.23.0", "5.23.9.dev0"])
def test_import_inside_the_supported_range(monkeypatch, version):
    assert hasattr(_fresh_import_hf(monkeypatch, version), "TrajectoryEvictionCache")


def test_supported_range_equals_the_hf_extra():
    import pathlib
    import tomllib
    from trajops.hf import SUPPORTED_TRANSFORMERS
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("no pyproject.toml next to the tests (installed package)")
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["hf"]
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in extra
    assert [e for e in extra if e.startswith("transformers")] == [f"transformers{SUPPORTED_TRANSFORMERS}"]
