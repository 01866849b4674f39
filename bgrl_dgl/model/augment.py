"""BGRL's graph augmentations: edge dropping and feature masking, one pair of rates per view.

Random numbers are drawn on the device of the ``torch.Generator`` passed in and the resulting
masks are moved to the device of the data. A CPU generator therefore gives the same
augmentations whatever device the model runs on (masks cost one host-to-device copy of
``E`` or ``F`` (``N * F`` in element mode) bools); a generator created on the data's device
(``torch.Generator(device="cuda")``) avoids the copy. Seeding the generator makes a run
reproducible for a given generator device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from bgrl_dgl.config import check_finite, field
from bgrl_dgl.model.sparse import SparseRows

if TYPE_CHECKING:
    from bgrl_dgl.model.adjacency import Adjacency

    # One augmented view: the sampled blocks (input layer first), their input features
    # [N, F] (dense, or sparse rows) and an optional feature-column keep mask [F] bool (see
    # augment_view).
    View = tuple[list[Adjacency], torch.Tensor | SparseRows, torch.Tensor | None]

MaskMode = Literal["column", "element"]


@dataclass
class AugmentConfig:
    edge_drop: list[float] = field([0.4, 0.4], "edge drop probabilities p_e1,p_e2 of the two views")
    feature_mask: list[float] = field(
        [0.5, 0.6], "feature mask probabilities p_f1,p_f2 of the two views")
    mask_mode: MaskMode = field(
        "column",
        "column: zero the same random feature columns for every node of a view (BGRL paper); "
        "element: mask every feature entry independently (with sparse input rows only the "
        "non-zeros are drawn, so the draws differ from those of dense rows)")
    independent_views: bool = field(
        False, "sample a separate neighbourhood for each view instead of sharing one")

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ("edge_drop", "feature_mask"):
            rates = getattr(self, name)
            if len(rates) != 2:
                raise ValueError(f"{name} needs exactly 2 probabilities (one per view), got "
                                 f"{len(rates)}")
            for rate in rates:
                if not 0.0 <= rate < 1.0:
                    raise ValueError(f"{name} probabilities must lie in [0, 1), got {rate}")
        if self.mask_mode not in ("column", "element"):
            raise ValueError(f"mask_mode must be column or element, got {self.mask_mode!r}")

    def view_rates(self, view: int) -> tuple[float, float]:
        """(edge drop probability, feature mask probability) of view 0 or 1."""
        return self.edge_drop[view], self.feature_mask[view]


def _keep_mask(shape: tuple[int, ...], p: float, generator: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """Bool tensor of ``shape`` on ``device``, each entry True with probability ``1 - p``."""
    draws = torch.rand(shape, generator=generator, device=generator.device)
    return (draws >= p).to(device)


def drop_edges(adj: Adjacency, p: float, generator: torch.Generator) -> Adjacency:
    """Remove each edge of ``adj`` independently with probability ``p``.

    Node sets (``num_src``, ``num_dst``) are unchanged; ``p == 0`` returns ``adj`` itself.
    """
    if p == 0.0:
        return adj
    keep = _keep_mask((adj.indices.numel(),), p, generator, adj.indices.device)
    return adj.keep_edges(keep)


def feature_keep(x: torch.Tensor | SparseRows, p: float, mode: MaskMode,
                 generator: torch.Generator) -> torch.Tensor | None:
    """Keep mask for masking the features of ``x`` [N, F] with probability ``p``.

    ``mode="column"``: bool [F], one draw per column, shared by all rows (BGRL paper);
    ``mode="element"``: bool [N, F], every entry drawn independently, or for sparse rows
    bool [nnz], one draw per non-zero (zeros stay zero whatever is drawn for them). ``None``
    when ``p == 0``.
    """
    if mode not in ("column", "element"):
        raise ValueError(f"mask mode must be column or element, got {mode!r}")
    if p == 0.0:
        return None
    if mode == "column":
        shape: tuple[int, ...] = (x.shape[1],)
    else:
        shape = (x.nnz,) if isinstance(x, SparseRows) else tuple(x.shape)
    return _keep_mask(shape, p, generator, x.device)


def mask_features(x: torch.Tensor | SparseRows,
                  keep: torch.Tensor | None) -> torch.Tensor | SparseRows:
    """``x`` [N, F] with the entries where ``keep`` is False zeroed (dense rows: [F] columns
    or [N, F] entries; sparse rows: [nnz] non-zeros); a new object, or ``x`` itself when
    ``keep`` is ``None``."""
    if keep is None:
        return x
    if isinstance(x, SparseRows):
        return x.keep_entries(keep)
    return x.masked_fill(~keep, 0)


def augment_view(adjs: list[Adjacency], x: torch.Tensor | SparseRows, p_edge: float,
                 p_feat: float, mode: MaskMode, generator: torch.Generator) -> View:
    """One augmented view ``(blocks, features, column_keep)``: edges dropped in every block,
    input features masked.

    ``adjs`` are the blocks of a sampled neighbourhood (input layer first) and ``x``
    [adjs[0].num_src, F] their input features (dense, or sparse rows). An element mask is
    applied to a copy of ``x`` and ``column_keep`` is ``None``; a column mask is returned as
    ``column_keep`` bool [F] with ``x`` itself, for the encoder to fold into its first
    layer's weights (equal to zeroing the columns, without a masked copy of the largest
    tensor of the step). Sparse rows lose the non-zeros of masked columns (or the masked
    non-zeros) instead, so that the first layer skips them; ``column_keep`` is then ``None``.
    """
    dropped = [drop_edges(adj, p_edge, generator) for adj in adjs]
    keep = feature_keep(x, p_feat, mode, generator)
    if isinstance(x, SparseRows) and keep is not None:
        return dropped, x.keep_columns(keep) if mode == "column" else x.keep_entries(keep), None
    if mode == "column":
        return dropped, x, keep
    return dropped, mask_features(x, keep), None
