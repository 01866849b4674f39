"""Bootstrapped Graph Latents: online encoder + predictor, EMA target encoder, bootstrap loss."""
from __future__ import annotations

import copy
import itertools
import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from bgrl_dgl.model.encoder import Encoder, ModelConfig, Predictor

if TYPE_CHECKING:
    from bgrl_dgl.model.adjacency import Adjacency
    from bgrl_dgl.model.augment import View


def cosine_tau(step: int, total_steps: int, base: float) -> float:
    """Target decay rate at ``step``: ``base`` at step 0 rising along a cosine to 1 at the end.

    ``tau = 1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2``; ``step`` is clamped to
    ``[0, total_steps]``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def bootstrap_loss(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``2 - 2 cos(q, z)`` for q, z [B, D]; no gradient flows into ``z``.

    Returns a scalar in [0, 4]: 0 when every pair points the same way, 4 when opposite.
    """
    cosine = (F.normalize(q, dim=-1) * F.normalize(z.detach(), dim=-1)).sum(dim=-1)
    return (2.0 - 2.0 * cosine).mean()


@torch.no_grad()
def embedding_std(h: torch.Tensor) -> float:
    """Collapse indicator of embeddings h [B, D]: per-dimension std over the batch of the
    L2-normalised rows, averaged over dimensions.

    0 means every row points the same way (collapse); rows spread evenly over the sphere give
    about ``1 / sqrt(D)``. NaN for fewer than 2 rows.
    """
    if h.shape[0] < 2:
        return math.nan
    return F.normalize(h.float(), dim=-1).std(dim=0).mean().item()


class OnlineBranch(nn.Module):
    """The trained half of BGRL, the part that data-parallel training wraps: the online
    encoder followed by the predictor. Holds the same modules as the :class:`BGRL` it
    comes from, not copies."""

    def __init__(self, online: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.online = online
        self.predictor = predictor

    def forward(self, adjs: list[Adjacency], features: torch.Tensor,
                column_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings h [B, D] of the seed nodes of one view (see ``augment.View``) and their
        predictions q [B, D]."""
        h = self.online(adjs, features, column_keep)
        return h, self.predictor(h)


class BGRL(nn.Module):
    """Online encoder and predictor trained to predict a slowly moving target encoder.

    The target starts as an exact copy of the online encoder, never receives gradients and
    follows it by :meth:`update_target`. Both encoders share the module's train/eval mode, so
    during training batch normalisation in the target uses batch statistics, like the online
    encoder (as in the BGRL reference implementation).
    """

    def __init__(self, online: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.online = online
        self.predictor = predictor
        self.target = copy.deepcopy(online)
        for param in self.target.parameters():
            param.requires_grad_(False)
            param.grad = None

    @torch.no_grad()
    def copy_online_to_target(self) -> None:
        """Make the target an exact copy of the online encoder's current weights and buffers
        (after data-parallel training has given every rank rank 0's online weights)."""
        self.target.load_state_dict(self.online.state_dict())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates: online encoder and predictor, never the target."""
        return list(itertools.chain(self.online.parameters(), self.predictor.parameters()))

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """``target <- tau * target + (1 - tau) * online`` for parameters and floating-point
        buffers (batch-norm running statistics follow the same average as the weights);
        integer buffers such as ``num_batches_tracked`` are copied from the online encoder.
        Running statistics only matter when the target runs in eval mode; in train mode both
        encoders normalise with batch statistics.
        """
        target_params = list(self.target.parameters())
        online_params = list(self.online.parameters())
        target_floats, online_floats = [], []
        for target_buf, online_buf in zip(self.target.buffers(), self.online.buffers()):
            if target_buf.is_floating_point():
                target_floats.append(target_buf)
                online_floats.append(online_buf)
            else:
                target_buf.copy_(online_buf)
        targets = target_params + target_floats
        onlines = online_params + online_floats
        if targets:
            torch._foreach_mul_(targets, tau)
            torch._foreach_add_(targets, onlines, alpha=1.0 - tau)

    def loss(self, view1: View, view2: View,
             online_branch: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetrised bootstrap loss of two views of the same seed nodes.

        ``bootstrap(q1, z2) + bootstrap(q2, z1)`` with ``q_i = predictor(online(view_i))`` and
        ``z_i = target(view_i)`` (no gradient), each term averaged over the seed nodes.
        ``online_branch`` computes ``(online(view), q)``: by default an :class:`OnlineBranch`
        of this model; in data-parallel training, its DDP wrapper.
        Returns the scalar loss and the online embeddings of ``view1`` [B, D], detached.
        """
        branch = online_branch or OnlineBranch(self.online, self.predictor)
        h1, q1 = branch(*view1)
        h2, q2 = branch(*view2)
        with torch.no_grad():
            z1 = self.target(*view1)
            z2 = self.target(*view2)
        loss = bootstrap_loss(q1, z2) + bootstrap_loss(q2, z1)
        return loss, h1.detach()


def build_model(feat_dim: int, config: ModelConfig, seed: int) -> BGRL:
    """Online encoder, predictor and target, initialised from ``seed``."""
    torch.manual_seed(seed)
    encoder = Encoder(feat_dim, config)
    return BGRL(encoder, Predictor(encoder.out_dim, config.predictor_hidden))

