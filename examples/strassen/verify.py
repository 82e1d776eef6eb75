"""Verification framework for bilinear 2x2 matrix-multiplication rules (sparsify / discretize / verify).

A rule with R products is three factor matrices acting on row-major vectorized 2x2 matrices
``vec(A) = [a11, a12, a21, a22]``:

    U: (R, 4), V: (R, 4), W: (4, R)        vec(C) = W @ ((U @ vec(A)) * (V @ vec(B)))

Every function here is pure (never mutates its inputs) and accepts any leading batch dims
(``(..., R, 4)`` etc.), so one call checks every seed of a batched training run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

Rule = Tuple[Tensor, Tensor, Tensor]
ZERO_SHOT_SIZES = (2, 4, 8, 16, 32, 64)


def _check_rule(U: Tensor, V: Tensor, W: Tensor) -> int:
    if U.dim() < 2 or U.shape[-1] != 4:
        raise ValueError(f"U must have shape (..., R, 4), got {tuple(U.shape)}")
    if V.shape != U.shape:
        raise ValueError(f"V must have the shape of U {tuple(U.shape)}, got {tuple(V.shape)}")
    R = U.shape[-2]
    if W.shape != U.shape[:-2] + (4, R):
        raise ValueError(f"W must have shape {tuple(U.shape[:-2]) + (4, R)}, got {tuple(W.shape)}")
    return R


def matmul_tensor(dtype: torch.dtype = torch.float64) -> Tensor:
    """The 2x2 matrix-multiplication tensor T, (4, 4, 4): T[i, j, k] = 1 iff c_k += a_i * b_j."""
    T = torch.zeros(4, 4, 4, dtype=dtype)
    for r in range(2):
        for c in range(2):
            for m in range(2):
                T[2 * r + m, 2 * m + c, 2 * r + c] = 1
    return T


def rule_tensor(U: Tensor, V: Tensor, W: Tensor) -> Tensor:
    """sum_r U[r, i] V[r, j] W[k, r] -> (..., 4, 4, 4); equals :func:`matmul_tensor` iff the rule is exact."""
    _check_rule(U, V, W)
    return torch.einsum("...ri,...rj,...kr->...ijk", U, V, W)


def strassen_rule(dtype: torch.dtype = torch.float64) -> Rule:
    """Strassen (1969), written from the textbook products M1..M7 (A = [[a11, a12], [a21, a22]]):

    M1 = (a11 + a22)(b11 + b22)   M2 = (a21 + a22) b11   M3 = a11 (b12 - b22)   M4 = a22 (b21 - b11)
    M5 = (a11 + a12) b22          M6 = (a21 - a11)(b11 + b12)   M7 = (a12 - a22)(b21 + b22)
    c11 = M1 + M4 - M5 + M7   c12 = M3 + M5   c21 = M2 + M4   c22 = M1 - M2 + M3 + M6
    Returns U, V (7, 4) and W (4, 7).
    """
    U = [[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0], [-1, 0, 1, 0], [0, 1, 0, -1]]
    V = [[1, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, -1], [-1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]]
    W = [[1, 0, 0, 1, -1, 0, 1], [0, 0, 1, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0, 0], [1, -1, 1, 0, 0, 1, 0]]
    return tuple(torch.tensor(x, dtype=dtype) for x in (U, V, W))  # type: ignore[return-value]


def naive_rule(dtype: torch.dtype = torch.float64) -> Rule:
    """The schoolbook rule: 8 products a_i * b_j, each summed into one c_k. U, V (8, 4), W (4, 8)."""
    T = matmul_tensor(dtype)
    idx = T.nonzero()  # (8, 3) rows (i, j, k)
    eye = torch.eye(4, dtype=dtype)
    return eye[idx[:, 0]], eye[idx[:, 1]], eye[idx[:, 2]].T.contiguous()


def apply_rule(U: Tensor, V: Tensor, W: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """One level on 2x2 inputs. A, B: (..., N, 2, 2) with the rule's batch dims first -> C (..., N, 2, 2)."""
    _check_rule(U, V, W)
    a, b = A.flatten(-2), B.flatten(-2)  # (..., N, 4)
    p = (a @ U.transpose(-1, -2)) * (b @ V.transpose(-1, -2))  # (..., N, R)
    return (p @ W.transpose(-1, -2)).unflatten(-1, (2, 2))


def slot_importance(U: Tensor, V: Tensor, W: Tensor) -> Tensor:
    """Frobenius norm of each product's rank-1 term u_r (x) v_r (x) w_r -> (..., R).

    It is invariant to the per-product rescaling (u, v, w) -> (s u, t v, w / (s t)) that leaves the
    rule unchanged, so it ranks products by what they contribute, not by how the gauge landed.
    """
    _check_rule(U, V, W)
    return U.norm(dim=-1) * V.norm(dim=-1) * W.norm(dim=-2)


def sparsify(U: Tensor, V: Tensor, W: Tensor, k: int = 7) -> Tuple[Rule, Tensor]:
    """Keep the ``k`` most important products (:func:`slot_importance`), zero the others.

    Returns ((U, V, W) with the dropped slots zeroed, same shapes), mask (..., R) bool with exactly
    ``k`` True per rule.
    """
    R = _check_rule(U, V, W)
    if not 1 <= k <= R:
        raise ValueError(f"k must be in [1, R={R}], got {k}")
    keep = slot_importance(U, V, W).topk(k, dim=-1).indices
    mask = torch.zeros(U.shape[:-1], dtype=torch.bool, device=U.device).scatter(-1, keep, True)
    m = mask.to(U.dtype)
    return (U * m[..., :, None], V * m[..., :, None], W * m[..., None, :]), mask


def normalize_gauge(U: Tensor, V: Tensor, W: Tensor) -> Rule:
    """Rescale each product so max|u_r| = max|v_r| = 1, moving the scales into w_r (an exact symmetry).

    Training with weight decay balances ||u_r||, ||v_r||, ||w_r||, which turns e.g. Strassen's
    (a21 + a22) b11 into non-integers; this undoes that before rounding. Zero slots stay zero.
    """
    _check_rule(U, V, W)
    su = U.abs().amax(dim=-1)
    sv = V.abs().amax(dim=-1)
    su = torch.where(su > 0, su, torch.ones_like(su))
    sv = torch.where(sv > 0, sv, torch.ones_like(sv))
    return U / su[..., :, None], V / sv[..., :, None], W * (su * sv)[..., None, :]


def discretize(U: Tensor, V: Tensor, W: Tensor, normalize: bool = True) -> Tuple[Rule, Tensor]:
    """Round every coefficient to the nearest integer (after :func:`normalize_gauge` if ``normalize``).

    Returns (rounded U, V, W; same shapes and dtype, exactly integer), delta (...,): the largest
    distance max|x - round(x)| of any coefficient before rounding (0 means already integer).
    """
    _check_rule(U, V, W)
    if normalize:
        U, V, W = normalize_gauge(U, V, W)
    flat = torch.cat([U.flatten(-2), V.flatten(-2), W.flatten(-2)], dim=-1)
    delta = (flat - flat.round()).abs().amax(dim=-1)
    return (U.round(), V.round(), W.round()), delta


def active_products(U: Tensor, V: Tensor, W: Tensor) -> Tensor:
    """Number of products that contribute (u_r, v_r and w_r all nonzero) -> (...,) int64."""
    _check_rule(U, V, W)
    return ((U != 0).any(-1) & (V != 0).any(-1) & (W != 0).any(-2)).sum(-1)


def product_ranks(U: Tensor, V: Tensor, W: Tensor, tol: float = 1e-3) -> Tensor:
    """Rank (0, 1 or 2) of each product's u_r, v_r and w_r read as a 2x2 matrix -> (..., 3, R) int64.

    A change of basis A -> P A Q^-1, B -> Q B S^-1, C -> P C S^-1 maps one exact rule to another and
    preserves these ranks, so the sorted ranks are a fingerprint of a rule's orbit (Strassen: one
    rank-2 and six rank-1 matrices in each factor). rank 2 iff |det| > tol * ||x||^2 / 2 (scale-free).
    """
    _check_rule(U, V, W)
    x = torch.stack([U, V, W.transpose(-1, -2)], dim=-3)  # (..., 3, R, 4)
    sq = (x * x).sum(-1)
    det = (x[..., 0] * x[..., 3] - x[..., 1] * x[..., 2]).abs()
    nonzero = sq > tol * tol * sq.amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(det > tol * sq / 2, 2, nonzero.long())


def same_orbit_signature(U: Tensor, V: Tensor, W: Tensor, ref: Optional[Rule] = None) -> Tensor:
    """Whether the sorted :func:`product_ranks` of each rule equal those of ``ref`` (default Strassen)
    -> (...,) bool. Necessary (not sufficient) for being ``ref`` in another basis."""
    ref = strassen_rule(U.dtype) if ref is None else ref
    mine = product_ranks(U, V, W).sort(-1).values
    theirs = product_ranks(*ref).sort(-1).values
    if mine.shape[-1] != theirs.shape[-1]:
        return torch.zeros(mine.shape[:-2], dtype=torch.bool)
    return (mine == theirs).all(-1).all(-1)


def recursive_matmul(U: Tensor, V: Tensor, W: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """Apply a 2x2 rule recursively to n x n matrices (n a power of 2): the blocks of A and B take the
    place of the scalars a_i, b_j, level after level, down to 1 x 1.

    U, V: (R, 4), W: (4, R) (no batch dims); A, B: (..., n, n) -> C (..., n, n) in A's dtype.
    Each level is batched over all R**level subproblems, so 64 x 64 (R**6 leaves) is a few einsums.
    """
    _check_rule(U, V, W)
    if U.dim() != 2:
        raise ValueError(f"recursive_matmul takes one rule, U of shape (R, 4); got {tuple(U.shape)}")
    n = A.shape[-1]
    if A.shape[-2:] != (n, n) or B.shape != A.shape or n < 1 or n & (n - 1):
        raise ValueError(f"A and B must both be (..., n, n) with n a power of 2; got {tuple(A.shape)}, {tuple(B.shape)}")
    U, V, W = (x.to(A.dtype) for x in (U, V, W))

    def blocks(X: Tensor) -> Tensor:  # (..., m, m) -> (..., 4, m/2, m/2), row-major block order
        m = X.shape[-1] // 2
        return X.unflatten(-2, (2, m)).unflatten(-1, (2, m)).transpose(-3, -2).flatten(-4, -3)

    def rec(X: Tensor, Y: Tensor) -> Tensor:
        if X.shape[-1] == 1:
            return X * Y
        m = X.shape[-1] // 2
        P = rec(torch.einsum("ri,...ijk->...rjk", U, blocks(X)), torch.einsum("ri,...ijk->...rjk", V, blocks(Y)))
        Cb = torch.einsum("cr,...rjk->...cjk", W, P)  # (..., 4, m, m)
        return Cb.unflatten(-3, (2, 2)).transpose(-3, -2).reshape(*Cb.shape[:-3], 2 * m, 2 * m)

    return rec(A, B)


def zero_shot(U: Tensor, V: Tensor, W: Tensor, sizes: Sequence[int] = ZERO_SHOT_SIZES, *, trials: int = 4,
              seed: int = 0) -> Dict[int, Dict[str, float]]:
    """Max abs error of :func:`recursive_matmul` vs the fp64 product A @ B on standard-normal inputs.

    Returns {n: {"fp32": err, "fp64": err}}: the rule run in fp32 (the seed's table) and in fp64.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in sizes:
        A = torch.randn(trials, n, n, generator=g, dtype=torch.float64)
        B = torch.randn(trials, n, n, generator=g, dtype=torch.float64)
        ref = A @ B
        e32 = (recursive_matmul(U, V, W, A.float(), B.float()).double() - ref).abs().max().item()
        e64 = (recursive_matmul(U, V, W, A, B) - ref).abs().max().item()
        out[n] = {"fp32": e32, "fp64": e64}
    return out


@dataclass
class Verification:
    """What :func:`verify` found for one rule; ``passed`` is the seed's S(theta) = 1."""
    active: int
    integer: bool            # every coefficient in {-1, 0, 1}
    delta: float             # max |x - round(x)| of the coefficients as given
    max_error_2x2: float     # fp32, random standard-normal 2x2 products
    exact: bool              # the rule's tensor equals the matmul tensor (fp64)
    zero_shot: Dict[int, Dict[str, float]] = field(default_factory=dict)
    zero_shot_ok: bool = False
    passed: bool = False
    reasons: Tuple[str, ...] = ()

    def as_dict(self) -> dict:
        d = asdict(self)
        d["zero_shot"] = {str(k): v for k, v in self.zero_shot.items()}
        return d


def verify(U: Tensor, V: Tensor, W: Tensor, *, rank: int = 7, tol: float = 1e-5, zero_shot_tol: float = 1e-8,
           sizes: Optional[Sequence[int]] = ZERO_SHOT_SIZES, samples: int = 4096, seed: int = 0) -> Verification:
    """Check one rule U, V (R, 4), W (4, R) against the seed's criteria.

    Passes iff: exactly ``rank`` active products; every coefficient in {-1, 0, 1} (delta = 0);
    max error < ``tol`` on ``samples`` random fp32 2x2 products; and recursive application to every n in
    ``sizes`` matches A @ B within ``zero_shot_tol`` in fp64 (fp32 errors are reported, not judged: they
    grow with n for any correct rule). ``sizes=None`` skips the zero-shot step (and does not pass).
    """
    _check_rule(U, V, W)
    if U.dim() != 2:
        raise ValueError(f"verify takes one rule, U of shape (R, 4); got {tuple(U.shape)}; loop over the batch")
    U, V, W = (x.detach().to(torch.float64) for x in (U, V, W))
    reasons = []
    active = int(active_products(U, V, W))
    if active != rank:
        reasons.append(f"{active} active products, not {rank}")
    coeffs = torch.cat([U.flatten(), V.flatten(), W.flatten()])
    delta = float((coeffs - coeffs.round()).abs().max())
    integer = bool(((coeffs == 0) | (coeffs == 1) | (coeffs == -1)).all())
    if not integer:
        reasons.append(f"coefficients not all in {{-1, 0, 1}} (delta={delta:.3g})")
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(samples, 2, 2, generator=g)
    B = torch.randn(samples, 2, 2, generator=g)
    err = float((apply_rule(U.float(), V.float(), W.float(), A, B) - A @ B).abs().max())
    if not err < tol:
        reasons.append(f"max error {err:.3g} on random 2x2 products >= {tol:g}")
    exact = bool(torch.equal(rule_tensor(U, V, W), matmul_tensor()))
    zs, zs_ok = {}, False
    if sizes:
        zs = zero_shot(U, V, W, sizes, seed=seed)
        bad = [n for n, e in zs.items() if not e["fp64"] <= zero_shot_tol]
        zs_ok = not bad
        if bad:
            reasons.append(f"zero-shot fails at n={bad}")
    else:
        reasons.append("zero-shot not run")
    return Verification(active=active, integer=integer, delta=delta, max_error_2x2=err, exact=exact, zero_shot=zs,
                        zero_shot_ok=zs_ok, passed=not reasons, reasons=tuple(reasons))
