"""CSR (Contrastive Sparse Representation, Wen et al., "Beyond Matryoshka", ICML 2025): a top-k sparse autoencoder
over frozen dense embeddings, and its training loss."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .losses import RegularizerScheduler, WarmupSteps, flops, info_nce
from .sparse import SparseBatch
from .topk import topk_sparsify

__all__ = ["SAEOutput", "SparseAutoEncoder", "CSRLoss"]


def _check_positive_int(v, name: str, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")
    return v


class SAEOutput(NamedTuple):
    """What :meth:`SparseAutoEncoder.forward` returns; latents are dense (batch, hidden) with zeros."""
    latents: torch.Tensor  # top-k, then ReLU: at most k non-zeros per row
    latents_4k: torch.Tensor  # top-4k, then ReLU
    recon: torch.Tensor  # decoded from ``latents`` (batch, input_dim)
    recon_4k: torch.Tensor
    aux_recon: Optional[torch.Tensor]  # the top-k_aux dead latents decoded without bias; None if none are dead


class SparseAutoEncoder(torch.nn.Module):
    """Top-k sparse autoencoder: ``z = relu(topk_k(W_enc (x - b_pre) + b_enc))``, ``x_hat = W_dec z + b_pre``.

    ``tied=True`` uses ``W_dec = W_enc^T``; otherwise ``W_dec`` is its own parameter, initialised to ``W_enc^T``.
    Encoder rows start with unit norm. The top-k goes through the library's ``topk_sparsify``, so gradients reach the
    kept latents only. In training mode every forward call is one step of dead-latent accounting: a latent that was
    not among any row's top-k for ``dead_after_steps`` consecutive steps is *dead*, and the auxiliary
    reconstruction (``k_aux`` largest dead pre-activations, decoding the residual ``x - x_hat``) feeds it gradient.
    """

    def __init__(self, input_dim: int, hidden_dim: int, k: int, k_aux: int | None = None, tied: bool = True,
                 dead_after_steps: int = 100):
        super().__init__()
        _check_positive_int(input_dim, "input_dim")
        _check_positive_int(hidden_dim, "hidden_dim")
        _check_positive_int(k, "k")
        if k > hidden_dim:
            raise ValueError(f"k: must be <= hidden_dim ({hidden_dim}), got {k}")
        k_aux = min(hidden_dim, max(1, input_dim // 2)) if k_aux is None else k_aux
        _check_positive_int(k_aux, "k_aux", low=0)
        _check_positive_int(dead_after_steps, "dead_after_steps")
        self.input_dim, self.hidden_dim, self.k, self.k_aux = input_dim, hidden_dim, k, k_aux
        self.tied, self.dead_after_steps = tied, dead_after_steps
        self.pre_bias = torch.nn.Parameter(torch.zeros(input_dim))
        self.encoder = torch.nn.Linear(input_dim, hidden_dim)
        with torch.no_grad():
            self.encoder.weight /= self.encoder.weight.norm(dim=1, keepdim=True)
            self.encoder.bias.zero_()
        self.decoder_weight = None if tied else torch.nn.Parameter(self.encoder.weight.detach().T.clone())
        self.register_buffer("steps_since_active", torch.zeros(hidden_dim, dtype=torch.int64))

    @property
    def W_dec(self) -> torch.Tensor:
        """(input_dim, hidden_dim) decoder matrix."""
        return self.encoder.weight.T if self.tied else self.decoder_weight

    @property
    def dead_mask(self) -> torch.Tensor:
        """Boolean (hidden_dim,): latents inactive for at least ``dead_after_steps`` training steps."""
        return self.steps_since_active >= self.dead_after_steps

    def _check_input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"x: expected shape (batch, {self.input_dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        return x.to(self.encoder.weight.dtype)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        return self.encoder(x - self.pre_bias)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec.T + self.pre_bias

    def _sparse(self, pre: torch.Tensor, k: int) -> torch.Tensor:
        return F.relu(topk_sparsify(pre, min(k, self.hidden_dim)))

    def forward(self, x: torch.Tensor) -> SAEOutput:
        pre = self.pre_activation(x)
        z = self._sparse(pre, self.k)
        z4 = self._sparse(pre, 4 * self.k)
        dead = self.dead_mask
        n_dead = int(dead.sum())
        aux = None
        if n_dead and self.k_aux:
            # Live latents get the most negative finite value (not -inf: topk_sparsify multiplies by a 0/1 mask).
            masked = torch.where(dead, pre, torch.full_like(pre, torch.finfo(pre.dtype).min))
            aux = self._sparse(masked, min(self.k_aux, n_dead)) @ self.W_dec.T
        if self.training:
            with torch.no_grad():
                self.steps_since_active += 1
                self.steps_since_active[(z > 0).any(0)] = 0
        return SAEOutput(z, z4, self.decode(z), self.decode(z4), aux)

    def codes(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Differentiable k-sparse codes as a dense (batch, hidden) tensor: the top ``k`` (default: the trained k)
        latents of each row after ReLU, without a step of dead-latent accounting (for extra loss terms)."""
        k = self.k if k is None else _check_positive_int(k, "k")
        if k > self.hidden_dim:
            raise ValueError(f"k: must be <= hidden_dim ({self.hidden_dim}), got {k}")
        return self._sparse(self.pre_activation(x), k)

    def encode(self, x: torch.Tensor, k: int | None = None) -> SparseBatch:
        """Sparse codes as a SparseBatch (float32 values, int32 indices): the top ``k`` (default: the trained k)
        latents of each row, fewer only where fewer than k pre-activations are positive."""
        return SparseBatch.from_dense(self.codes(x, k).float())

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, k={self.k}, k_aux={self.k_aux}, "
                f"tied={self.tied}, dead_after_steps={self.dead_after_steps}")


def _normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE divided by the MSE of predicting the batch mean of ``target`` (1 when that is 0)."""
    baseline = F.mse_loss(target.mean(0, keepdim=True).expand_as(target), target)
    return F.mse_loss(pred, target) / torch.where(baseline > 0, baseline, torch.ones_like(baseline))


class CSRLoss(WarmupSteps, torch.nn.Module):
    """CSR training loss: ``L(k) + k4_weight * L(4k) + aux_weight * L_aux + contrastive_weight * InfoNCE``.

    ``L(k)``, ``L(4k)``: MSE (mean over elements) between the input embeddings and their reconstructions from k and
    4k latents. ``L_aux``: normalized MSE between the auxiliary reconstruction from dead latents and the detached
    residual ``x - x_hat``, 0 when no latent is dead. InfoNCE: :func:`~sparse_retrieval.losses.info_nce` between
    the k-sparse codes of anchors and positives (dot product, in-batch negatives, ``temperature``); skipped when no
    positives are given. Defaults are the paper's text setting, ``L(k) + L(4k)/8 + L_aux/32 + 0.1 * InfoNCE(T=0.2)``.
    sentence-transformers' ``CSRLoss`` defaults differ: aux weight 0.1, contrastive weight 1 at scale 1 (T=1).

    ``flops_weight`` (a number or a :class:`~sparse_retrieval.losses.RegularizerScheduler`, stepped once per
    training call, or per optimizer step after ``count_optimizer_steps(optimizer)``; saved in ``state_dict``) adds ``w * flops(codes)`` over the k-sparse codes of all rows: top-k fixes the non-zeros per
    row, and this term spreads them over the latents, lowering the expected FLOPs of a search (not in CSR or
    sentence-transformers).

    ``forward(model, anchors, positives=None)`` runs the model once on the concatenated batch (one step of
    dead-latent accounting) and returns the scalar loss; ``last`` holds its float components and ``last_output``
    the model's :class:`SAEOutput` (anchors first), for extra terms on the same forward pass.
    """

    def __init__(self, k4_weight: float = 1 / 8, aux_weight: float = 1 / 32, contrastive_weight: float = 0.1,
                 temperature: float = 0.2, flops_weight: float | RegularizerScheduler = 0.0):
        super().__init__()
        for name, v in (("k4_weight", k4_weight), ("aux_weight", aux_weight),
                        ("contrastive_weight", contrastive_weight)):
            if not v >= 0:
                raise ValueError(f"{name}: must be >= 0, got {v!r}")
        if not temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {temperature!r}")
        self.k4_weight, self.aux_weight = k4_weight, aux_weight
        self.contrastive_weight, self.temperature = contrastive_weight, temperature
        if not isinstance(flops_weight, RegularizerScheduler):
            flops_weight = RegularizerScheduler(flops_weight)
        self.flops_weight = flops_weight
        self.last: dict[str, float] = {}
        self.last_output: SAEOutput | None = None

    def _schedulers(self) -> dict[str, RegularizerScheduler]:
        return {"flops_weight": self.flops_weight}

    def forward(self, model: SparseAutoEncoder, anchors: torch.Tensor,
                positives: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(model, SparseAutoEncoder):
            kind = type(model)
            raise TypeError(f"model: expected sparse_retrieval.SparseAutoEncoder, got {kind.__module__}."
                            f"{kind.__qualname__}" + (" (sentence-transformers' CSR head: train it with its CSRLoss)"
                                                       if kind.__module__.startswith("sentence_transformers") else ""))
        x = model._check_input(anchors)
        if positives is not None:
            p = model._check_input(positives)
            if p.shape[0] != x.shape[0]:
                raise ValueError(f"positives: has {p.shape[0]} rows, anchors has {x.shape[0]}")
            x = torch.cat([x, p])
        out = model(x)
        l_k = F.mse_loss(out.recon, x)
        l_4k = F.mse_loss(out.recon_4k, x)
        l_aux = torch.zeros((), device=x.device)
        if out.aux_recon is not None:
            l_aux = _normalized_mse(out.aux_recon, (x - out.recon).detach())
        total = l_k + self.k4_weight * l_4k + self.aux_weight * l_aux
        l_cl = torch.zeros((), device=x.device)
        if positives is not None:
            z_a, z_p = out.latents.chunk(2)
            l_cl = info_nce(z_a, z_p, temperature=self.temperature)
            total = total + self.contrastive_weight * l_cl
        lam = self.flops_weight.value
        l_flops = flops(out.latents) if lam > 0 else torch.zeros((), device=x.device)
        total = total + lam * l_flops
        self._forward_done()
        self.last_output = out
        self.last = {"recon_k": l_k.item(), "recon_4k": l_4k.item(), "aux": l_aux.item(), "contrastive": l_cl.item(),
                     "flops": l_flops.item(), "flops_weight": lam, "dead": int(model.dead_mask.sum())}
        return total
