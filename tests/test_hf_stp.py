"""trajops.hf_stp: STP through forward hooks on chosen decoder layers of a transformers model."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from conftest import load_smollm2  # noqa: E402
from trajops import stp_loss  # noqa: E402
from trajops.hf_stp import LayerCapture, STPHooks, lengths_from_mask  # noqa: E402
from trajops.nn import STPLoss  # noqa: E402

N_LAYERS, VOCAB = 3, 64


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).train()


def _ids(B: int = 3, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _grads(model) -> list:
    return [p.grad.clone() for p in model.parameters()]


def _hooked_step(model, stp, ids, mask=None, seed=7):
    model.zero_grad()
    with STPHooks(model, stp, generator=torch.Generator().manual_seed(seed)) as hooks:
        out = model(ids, attention_mask=mask, labels=ids)
        term = hooks.pop_term()
    (out.loss + term).backward()
    return term.detach(), _grads(model)


def _assert_grads_close(a, b) -> None:
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_hooks_match_output_hidden_states(model):
    """Layers 0 and 1 through hooks == stp_loss on hidden_states[1], [2] with the same triples, value and grads."""
    ids = _ids()
    term, grads = _hooked_step(model, STPLoss(weight=0.5, n_spans=3, layers=(0, 1)), ids)
    model.zero_grad()
    out = model(ids, labels=ids, output_hidden_states=True)
    ref = 0.5 * stp_loss([out.hidden_states[1], out.hidden_states[2]], 3, generator=torch.Generator().manual_seed(7))
    (out.loss + ref).backward()
    torch.testing.assert_close(term, ref.detach())
    assert term > 0
    _assert_grads_close(grads, _grads(model))


def test_last_layer_is_pre_norm(model):
    """Layer -1 is the last decoder layer's own output, not output_hidden_states' last (post-norm) entry."""
    ids = _ids()
    term, grads = _hooked_step(model, STPLoss(weight=1.0, n_spans=4, layers=(-1,)), ids)
    model.zero_grad()
    seen = {}
    h = model.model.norm.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    out = model(ids, labels=ids, output_hidden_states=True)
    h.remove()
    ref = stp_loss(seen["x"], 4, generator=torch.Generator().manual_seed(7))
    post = stp_loss(out.hidden_states[-1], 4, generator=torch.Generator().manual_seed(7))
    (out.loss + ref).backward()
    torch.testing.assert_close(term, ref.detach())
    assert not torch.allclose(term, post.detach()), "the hook must see the pre-norm output"
    _assert_grads_close(grads, _grads(model))


def test_only_chosen_layers_hooked_and_remove(model):
    ids = _ids()
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    plain = _grads(model)
    # transformers installs its own output-capturing hooks: count ours as the difference.
    def counts():
        return [len(m._forward_hooks) for m in model.model.layers] + [
            len(model.model._forward_hooks), len(model.model._forward_pre_hooks)
        ]

    before = counts()
    hooks = STPHooks(model, STPLoss(weight=1.0, layers=(1,)))
    assert [a - b for a, b in zip(counts(), before)] == [0, 1, 0, 1, 1]
    assert hooks.layers == [1]
    hooks.remove()
    assert counts() == before
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    assert hooks.last_term is None
    _assert_grads_close(plain, _grads(model))


def test_right_padding_gives_lengths(model):
    """Right padding -> lengths: the term equals stp_loss with lengths, and the padded tokens do not change it."""
    ids = _ids(B=3, T=10)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 2:] = 0  # a row shorter than 3: it contributes nothing
    assert lengths_from_mask(mask).tolist() == [6, 10, 2]
    stp = STPLoss(weight=1.0, n_spans=5, layers=(0, 2))
    term, _ = _hooked_step(model, stp, ids, mask)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        seen = {}
        h = model.model.norm.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
        model(ids, attention_mask=mask)
        h.remove()
    ref = stp_loss([out.hidden_states[1], seen["x"]], 5, lengths=mask.sum(-1), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(term, ref)
    other = torch.where(mask.bool(), ids, (ids + 17) % VOCAB)  # different tokens in the padding only
    term2, _ = _hooked_step(model, stp, other, mask)
    torch.testing.assert_close(term2, term)


def test_left_padding_and_bad_mask_raise(model):
    ids = _ids(B=2, T=8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with STPHooks(model, STPLoss(layers=(0,))):
        with pytest.raises(ValueError, match="right-padded"):
            model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        lengths_from_mask(torch.ones(2, 1, 8, 8))


def test_eval_and_no_grad_compute_nothing_unless_asked(model):
    ids = _ids()
    stp = STPLoss(weight=1.0, layers=(0,))
    with STPHooks(model, stp) as hooks:
        with torch.no_grad():
            model(ids)
        assert hooks.last_term is None and stp.step == 0
        model.eval()
        try:
            model(ids)
            assert hooks.last_term is None and stp.step == 0
            with pytest.raises(RuntimeError, match="no STP term"):
                hooks.pop_term()
        finally:
            model.train()
    with STPHooks(model, stp, compute_in_eval=True) as hooks:
        with torch.no_grad():
            model(ids)
        assert hooks.last_value is not None and hooks.last_value > 0 and stp.step == 0


def test_delayed_start_and_counter(model):
    ids = _ids()
    stp = STPLoss(weight=1.0, layers=(1,), start_step=2)
    values = []
    with STPHooks(model, stp) as hooks:
        for _ in range(3):
            model(ids, labels=ids)
            term = hooks.pop_term()
            assert term.requires_grad  # connected to the graph even while off
            values.append(float(term.detach()))
    assert values[:2] == [0.0, 0.0] and values[2] > 0 and stp.step == 3


def test_errors(model):
    with pytest.raises(IndexError, match="out of range"):
        LayerCapture(model, [N_LAYERS])
    with pytest.raises(TypeError, match="Llama-like"):
        LayerCapture(torch.nn.Linear(2, 2), [0])
    with pytest.raises(TypeError, match="STPLoss"):
        STPHooks(model, object())


def test_trainer_adds_and_logs_stp(model, tmp_path):
    from torch.utils.data import Dataset

    from trajops.hf_stp import STPTrainer

    class Tokens(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            ids = _ids(B=1, T=12, seed=i)[0]
            return {"input_ids": ids, "labels": ids}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-3,
    )
    stp = STPLoss(weight=0.5, n_spans=2, layers=(0, 1))
    hooks = STPHooks(model, stp)
    try:
        trainer = STPTrainer(model=model, args=args, train_dataset=Tokens(), stp_hooks=hooks)
        trainer.train()
    finally:
        hooks.remove()
        model.train()
    logs = [e for e in trainer.state.log_history if "stp" in e]
    assert len(logs) == 2
    for e in logs:
        assert e["stp"] > 0 and e["lm_loss"] > 0
        assert e["loss"] == pytest.approx(e["lm_loss"] + e["stp"], rel=1e-3)


@pytest.mark.slow
def test_real_smollm2_layers_20_25_29():
    m = load_smollm2().train()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    stp = STPLoss(weight=1.0, n_spans=3, layers=(20, 25, 29))
    g = torch.Generator().manual_seed(3)
    with STPHooks(m, stp, generator=g) as hooks:
        m(ids)
        term = hooks.pop_term()
        assert hooks.layers == [20, 25, 29] and len(m.model.layers) == 30
    with torch.no_grad():
        hs = m(ids, output_hidden_states=True).hidden_states
    ref = stp_loss([hs[21], hs[26]], 3, generator=torch.Generator().manual_seed(3))
    # Layer 29 is the last: its hidden_states entry is post-norm, so compare layers 20 and 25 on their own.
    with STPHooks(m, STPLoss(weight=1.0, n_spans=3, layers=(20, 25)), generator=torch.Generator().manual_seed(3)) as h2:
        m(ids)
        torch.testing.assert_close(h2.pop_term().detach(), ref)
    assert 0 < float(term.detach()) < 2
    term.backward()
    assert m.model.layers[20].mlp.down_proj.weight.grad.abs().sum() > 0


def test_position_ids_packing_gives_documents(model):
    """position_ids that restart at 0 (DataCollatorWithFlattening) -> the packed STP loss on the documents."""
    lengths = [5, 2, 7]
    ids = _ids(B=1, T=sum(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    stp = STPLoss(weight=1.0, n_spans=4, layers=(1,))
    model.zero_grad()
    with STPHooks(model, stp, generator=torch.Generator().manual_seed(7)) as hooks:
        model(ids, position_ids=pos, labels=ids)
        term = hooks.pop_term().detach()
    cu = torch.tensor([0, 5, 7, 14])
    with torch.no_grad():
        h = model(ids, position_ids=pos, output_hidden_states=True).hidden_states[2]
    ref = stp_loss(h, 4, cu_seqlens=cu, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(term, ref)
    whole = stp_loss(h, 4, generator=torch.Generator().manual_seed(7))  # one 14-token row: other triples
    assert not torch.allclose(term, whole)
    # plain arange position ids: each row one document, the unpacked loss with lengths = T (same draws)
    ids2 = _ids(B=2, T=8)
    with STPHooks(model, stp, generator=torch.Generator().manual_seed(3)) as hooks:
        model(ids2, position_ids=torch.arange(8).expand(2, 8), labels=ids2)
        t2 = hooks.pop_term().detach()
    with STPHooks(model, stp, generator=torch.Generator().manual_seed(3)) as hooks:
        model(ids2, attention_mask=torch.ones_like(ids2), labels=ids2)
        t3 = hooks.pop_term().detach()
    torch.testing.assert_close(t2, t3)
