"""Damping, factorisation and application of the K-FAC inverses: pure functions on tensors.

Nothing here knows about modules, ranks or steps, so whoever owns a factor (one rank, or all of
them) can invert it and ship the result.

Damping (Martens & Grosse 2015, sec. 6.3) splits Tikhonov lambda over the two factors:
``A_d = A + pi sqrt(lambda) I`` and ``G_d = G + sqrt(lambda)/pi I`` with
``pi = sqrt((tr A / dim A) / (tr G / dim G))``, and the update is ``(G_d (x) A_d)^-1 vec(grad)``.
``cholesky`` stores ``A_d^-1`` and ``G_d^-1``. ``eigen`` stores ``A = Q_A diag(l_A) Q_A^T`` and
``G = Q_G diag(l_G) Q_G^T`` and divides ``Q_G^T grad Q_A`` elementwise by ``D``, where
``eigen_damping="factored"`` uses ``D = (l_G + sqrt(lambda)/pi)(l_A + pi sqrt(lambda))^T`` (the same
damped factors as ``cholesky``, hence the same update), and ``"kron"`` uses
``D = l_G l_A^T + lambda``, i.e. ``(G (x) A + lambda I)^-1``, exact Tikhonov damping of the Kronecker
product with no pi.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

MAX_DAMPING_RETRIES = 8  # the shift grows 10x per retry: 1e8 x lambda covers any finite PSD factor


@dataclass(frozen=True)
class Retries:
    """How often a factorisation needed float64, and how many 10x damping increases it needed."""

    fp64: int = 0
    damping: int = 0

    def __add__(self, other: Retries) -> Retries:
        return Retries(self.fp64 + other.fp64, self.damping + other.damping)


@dataclass
class KronCholesky:
    """Inverses of the damped factors."""

    A_inv: Tensor
    G_inv: Tensor

    def apply(self, grad: Tensor) -> Tensor:
        """``G_d^-1 grad A_d^-1`` for the (out, in[+1]) gradient matrix."""
        return self.G_inv @ grad @ self.A_inv


@dataclass
class KronEigen:
    """Eigenbases and the per-factor eigenvalues whose outer product (+ ``extra``) is divided out."""

    Q_A: Tensor
    l_A: Tensor
    Q_G: Tensor
    l_G: Tensor
    extra: float

    def apply(self, grad: Tensor) -> Tensor:
        """``Q_G [(Q_G^T grad Q_A) / (l_G l_A^T + extra)] Q_A^T``."""
        v = self.Q_G.T @ grad @ self.Q_A
        return self.Q_G @ (v / (torch.outer(self.l_G, self.l_A) + self.extra)) @ self.Q_A.T


KronInverse = KronCholesky | KronEigen
_KRON_INVERSES: dict[str, type[KronInverse]] = {c.__name__: c for c in (KronCholesky, KronEigen)}


def inverse_state(inv: KronInverse) -> dict[str, Any]:
    """A checkpointable dict (tensors and the class name)."""
    return {"kind": type(inv).__name__, **{f.name: getattr(inv, f.name) for f in fields(inv)}}


def inverse_from_state(state: dict[str, Any], device: torch.device, dtype: torch.dtype) -> KronInverse:
    kind = _KRON_INVERSES[state["kind"]]
    return kind(**{f.name: _to(state[f.name], device, dtype) for f in fields(kind)})


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    return value.to(device=device, dtype=dtype) if isinstance(value, Tensor) else value


def pi_correction(A: Tensor, G: Tensor) -> Tensor:
    """``sqrt((tr A/dim A)/(tr G/dim G))``; 1 where a trace is not positive (a dead layer)."""
    pi = torch.sqrt(A.diagonal().mean() / G.diagonal().mean())
    return torch.where(torch.isfinite(pi) & (pi > 0), pi, torch.ones_like(pi))


def damping_shifts(A: Tensor, G: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """The diagonal shifts ``(pi sqrt(lambda), sqrt(lambda)/pi)`` added to A and G."""
    pi = pi_correction(A, G)
    root = damping ** 0.5
    return pi * root, root / pi


def add_diagonal(M: Tensor, shift: Tensor | float) -> Tensor:
    out = M.clone()
    out.diagonal().add_(shift)
    return out


def cholesky_inverse(M: Tensor, shift: Tensor) -> tuple[Tensor, Retries]:
    """``(M + shift I)^-1`` in M's dtype.

    Tries M's dtype first, then float64 (float32 round-off breaks nearly singular factors), then
    float64 with the shift grown 10x per retry; raises only if M is not a finite PSD matrix.
    """
    fp64 = 0
    if M.dtype != torch.float64:
        L, info = torch.linalg.cholesky_ex(add_diagonal(M, shift))
        if int(info) == 0:
            return torch.cholesky_inverse(L), Retries()
        fp64 = 1
    M64, shift64 = M.double(), shift.double()
    for k in range(MAX_DAMPING_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(add_diagonal(M64, shift64 * 10.0 ** k))
        if int(info) == 0:
            return torch.cholesky_inverse(L).to(M.dtype), Retries(fp64, k)
    raise RuntimeError(f"K-FAC: Cholesky failed on a {tuple(M.shape)} factor even with damping x"
                       f"1e{MAX_DAMPING_RETRIES} in float64; the factor is not positive semi-definite")


def symmetric_eigh(M: Tensor) -> tuple[Tensor, Tensor, Retries]:
    """(eigenvalues clamped at 0, eigenvectors) in M's dtype, retrying in float64 on no convergence."""
    try:
        values, vectors = torch.linalg.eigh(M)
        retries = Retries()
    except torch.linalg.LinAlgError:
        values, vectors = (t.to(M.dtype) for t in torch.linalg.eigh(M.double()))
        retries = Retries(fp64=1)
    return values.clamp(min=0), vectors, retries


def invert_kron(A: Tensor, G: Tensor, damping: float, method: str,
                eigen_damping: str = "factored") -> tuple[KronInverse, Retries]:
    """Factorise the pair (A, G) for ``method`` in {cholesky, eigen}; see the module docstring."""
    if method == "cholesky":
        shift_A, shift_G = damping_shifts(A, G, damping)
        A_inv, ra = cholesky_inverse(A, shift_A)
        G_inv, rg = cholesky_inverse(G, shift_G)
        return KronCholesky(A_inv, G_inv), ra + rg
    if method != "eigen":
        raise ValueError(f"K-FAC: unknown inverse method {method!r} (known: cholesky, eigen)")
    l_A, Q_A, ra = symmetric_eigh(A)
    l_G, Q_G, rg = symmetric_eigh(G)
    if eigen_damping == "factored":
        shift_A, shift_G = damping_shifts(A, G, damping)
        return KronEigen(Q_A, l_A + shift_A, Q_G, l_G + shift_G, 0.0), ra + rg
    if eigen_damping == "kron":
        return KronEigen(Q_A, l_A, Q_G, l_G, damping), ra + rg
    raise ValueError(f"K-FAC: unknown eigen_damping {eigen_damping!r} (known: factored, kron)")


def unitwise_inverse(F: Tensor, damping: float) -> Tensor:
    """Closed-form inverses of the damped 2x2 blocks ``F_c + lambda I`` of shape (C, 2, 2)."""
    a = F[:, 0, 0] + damping
    b = F[:, 0, 1]
    d = F[:, 1, 1] + damping
    det = a * d - b * b
    return torch.stack([torch.stack([d, -b], -1), torch.stack([-b, a], -1)], -2) / det[:, None, None]


def unitwise_apply(F_inv: Tensor, grad: Tensor) -> Tensor:
    """Per channel ``F_inv[c] @ grad[c]`` for grad of shape (C, 2) = (d gamma_c, d beta_c)."""
    return torch.einsum("cij,cj->ci", F_inv, grad)
