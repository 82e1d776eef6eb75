"""examples/strassen: the verification framework on known rules, and the CLI end to end (tiny run)."""
from __future__ import annotations

import json

import pytest
import torch

from examples.strassen import train
from examples.strassen.__main__ import main
from examples.strassen.verify import (active_products, apply_rule, discretize, matmul_tensor, naive_rule,
                                      product_ranks, same_orbit_signature,
                                      normalize_gauge, recursive_matmul, rule_tensor, sparsify, strassen_rule,
                                      verify, zero_shot)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_strassen_products_by_hand():
    # Independent of the tensor check: the seven textbook products on one concrete pair.
    U, V, W = strassen_rule()
    A = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    B = torch.tensor([[5.0, 6.0], [7.0, 8.0]], dtype=torch.float64)
    C = apply_rule(U, V, W, A[None], B[None])[0]
    assert torch.equal(C, torch.tensor([[19.0, 22.0], [43.0, 50.0]], dtype=torch.float64))
    assert torch.equal(rule_tensor(U, V, W), matmul_tensor())
    assert torch.equal(rule_tensor(*naive_rule()), matmul_tensor())


def test_strassen_passes_everything_including_64x64():
    v = verify(*strassen_rule())
    assert v.passed and v.reasons == () and v.exact and v.active == 7 and v.delta == 0.0 and v.integer
    assert v.max_error_2x2 < 1e-5
    assert sorted(v.zero_shot) == [2, 4, 8, 16, 32, 64]
    assert v.zero_shot[64]["fp64"] < 1e-11 and v.zero_shot[64]["fp32"] < 2e-3
    # fp32 error grows with n, as in the seed's table
    assert v.zero_shot[64]["fp32"] > v.zero_shot[2]["fp32"]


def test_recursive_matmul_matches_matmul_for_every_size_and_batch():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 16, 16, generator=g, dtype=torch.float64)
    B = torch.randn(3, 16, 16, generator=g, dtype=torch.float64)
    for rule in (strassen_rule(), naive_rule()):
        torch.testing.assert_close(recursive_matmul(*rule, A, B), A @ B, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="power of 2"):
        recursive_matmul(*strassen_rule(), A[:, :6, :6], B[:, :6, :6])


@pytest.mark.parametrize("which", ["U", "V", "W"])
def test_perturbed_coefficient_fails(which):
    U, V, W = (x.clone() for x in strassen_rule())
    {"U": U, "V": V, "W": W}[which][2, 1] += 1e-3
    v = verify(U, V, W)
    assert not v.passed and not v.integer and abs(v.delta - 1e-3) < 1e-12
    assert v.max_error_2x2 > 1e-5 and not v.zero_shot_ok


def test_one_sign_flip_fails_though_integer():
    U, V, W = (x.clone() for x in strassen_rule())
    W[3, 0] = -W[3, 0]
    v = verify(U, V, W)
    assert v.integer and v.active == 7 and not v.exact and not v.passed
    assert v.max_error_2x2 > 1e-2 and not v.zero_shot_ok


def test_naive_rank8_fails_the_seven_products_check_only():
    v = verify(*naive_rule())
    assert v.active == 8 and not v.passed
    assert v.reasons == ("8 active products, not 7",)  # it is exact and integer: only the count fails
    assert v.exact and v.zero_shot_ok


def test_sparsify_keeps_exactly_seven_and_the_largest():
    g = torch.Generator().manual_seed(0)
    U, V, W = torch.randn(5, 8, 4, generator=g), torch.randn(5, 8, 4, generator=g), torch.randn(5, 4, 8, generator=g)
    U[:, 3] *= 1e-3  # slot 3 is the obviously smallest product in every rule
    (Us, Vs, Ws), mask = sparsify(U, V, W, k=7)
    assert mask.shape == (5, 8) and (mask.sum(-1) == 7).all() and not mask[:, 3].any()
    assert (active_products(Us, Vs, Ws) == 7).all()
    assert torch.equal(Us[mask], U[mask]) and (Us[~mask] == 0).all() and (Ws[:, :, 3] == 0).all()
    # Strassen plus a tiny 8th product: the 8th is the one dropped, the rule survives
    S = strassen_rule()
    small = 1e-2 * torch.ones(1, 4, dtype=torch.float64)
    U8, V8, W8 = torch.cat([S[0], small]), torch.cat([S[1], small]), torch.cat([S[2], small.T], dim=1)
    (U7, V7, W7), m8 = sparsify(U8, V8, W8)
    assert not m8[7] and torch.equal(rule_tensor(U7, V7, W7), matmul_tensor())
    with pytest.raises(ValueError, match="k must be"):
        sparsify(U, V, W, k=9)


def test_discretize_undoes_the_scale_gauge_and_reports_delta():
    U, V, W = strassen_rule()
    s = torch.linspace(0.5, 1.7, 7, dtype=torch.float64)  # an exact symmetry: same rule
    Ug, Vg, Wg = U * s[:, None], V * 2.0, W / (2.0 * s)
    assert torch.allclose(rule_tensor(Ug, Vg, Wg), matmul_tensor())
    (Ur, Vr, Wr), delta = discretize(Ug, Vg, Wg)
    assert delta.item() < 1e-12 and verify(Ur, Vr, Wr).passed
    (_, _, _), raw_delta = discretize(Ug, Vg, Wg, normalize=False)
    assert raw_delta.item() > 0.1  # without the gauge step rounding would break the rule
    Un, _, _ = normalize_gauge(U + 0.01, V, W)
    assert Un.abs().amax(-1).sub(1).abs().max() < 1e-12


def test_bad_shapes_are_named():
    U, V, W = strassen_rule()
    with pytest.raises(ValueError, match="U must have shape"):
        verify(U[:, :3], V, W)
    with pytest.raises(ValueError, match="W must have shape"):
        verify(U, V, W.T)


def test_crystallize_from_a_noisy_strassen_basin_passes():
    # Phase 2 on a point near Strassen (plus a small 8th product): the pipeline must crystallize it.
    torch.manual_seed(0)
    U, V, W = strassen_rule()
    rule = (torch.cat([U, 0.05 * torch.randn(1, 4, dtype=U.dtype)])[None] + 0.02 * torch.randn(1, 8, 4, dtype=U.dtype),
            torch.cat([V, 0.05 * torch.randn(1, 4, dtype=U.dtype)])[None] + 0.02 * torch.randn(1, 8, 4, dtype=U.dtype),
            torch.cat([W, 0.05 * torch.randn(4, 1, dtype=U.dtype)], 1)[None] + 0.02 * torch.randn(1, 4, 8, dtype=U.dtype))
    res = train.crystallize(rule, train.Config(steps2=150, lr=1e-2, checkpoints=8), torch.Generator().manual_seed(0))
    assert res["passed"] == [True], res["reasons"]
    assert res["loss2"][0] < 1e-4 and res["delta"][0] < 0.1  # near, not yet exact: rounding finishes it
    found = res["rules"][0]
    assert verify(*(torch.tensor(found[k], dtype=torch.float64) for k in "UVW")).passed


def test_straightness_uses_stp_loss_dense():
    t = torch.linspace(0, 1, 10, dtype=torch.float64)[None, :, None]
    line = t * torch.ones(1, 1, 5, dtype=torch.float64)
    zigzag = line.clone()
    zigzag[0, 1::2] += 0.5
    s = train.straightness(torch.cat([line, zigzag]))
    assert s.shape == (2,) and s[0].abs() < 1e-12 and s[1] > 1.0


def test_cli_end_to_end_tiny(tmp_path, capsys):
    doc = main(["--seeds", "2", "--steps", "60", "--steps2", "30", "--batches", "8", "32", "--noise", "0.01",
                "--weight-decays", "1e-2", "--out", str(tmp_path)])
    names = [r["name"] for r in doc["runs"]]
    assert names == ["batch 8", "batch 32", "noise 0.01", "wd 0.01"]
    for r in doc["runs"]:
        res = r["result"]
        assert len(res["passed"]) == len(res["delta"]) == len(res["straight1"]) == 2
        assert 0 <= r["summary"]["success_rate"] <= 1
    assert doc["known"]["strassen"]["passed"] and not doc["known"]["naive (8 products)"]["passed"]
    on_disk = json.loads((tmp_path / "strassen.json").read_text())
    assert on_disk["n_seeds"] == 2 and len(on_disk["runs"]) == 4
    md = (tmp_path / "strassen.md").read_text()
    assert "| batch 32 | 32 |" in md and "Rounding basin" in md
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--seeds", "0", "--out", str(tmp_path)])


def _strassen_in_another_basis(seed: int = 0):
    """Strassen after A -> P A Q^-1, B -> Q B S^-1, C -> P C S^-1 (random P, Q, S): exact, not integer."""
    g = torch.Generator().manual_seed(seed)
    P, Q, S = (torch.randn(2, 2, generator=g, dtype=torch.float64) + 2 * torch.eye(2, dtype=torch.float64)
               for _ in range(3))
    inv = torch.linalg.inv
    U, V, W = strassen_rule()
    # row-major vec(X M Y) = (X kron Y^T) vec(M)
    return U @ torch.kron(inv(P), Q.T), V @ torch.kron(inv(Q), S.T), torch.kron(P, inv(S).T) @ W


def test_strassen_in_another_basis_is_exact_but_does_not_round():
    U, V, W = _strassen_in_another_basis()
    assert torch.allclose(rule_tensor(U, V, W), matmul_tensor(), atol=1e-12)
    assert same_orbit_signature(U, V, W) and same_orbit_signature(*strassen_rule())
    assert not same_orbit_signature(*naive_rule())
    assert not verify(U, V, W).passed
    (Ur, Vr, Wr), delta = discretize(U, V, W)
    assert delta.item() > 0.05 and not verify(Ur, Vr, Wr).passed
    assert product_ranks(*strassen_rule()).sort(-1).values.tolist() == [[1] * 6 + [2]] * 3
