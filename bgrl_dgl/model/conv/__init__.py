"""Graph convolutions in plain torch ops, one per module (each equals its ``dgl.nn``
counterpart within 1e-5), so the same model runs on CPU and CUDA."""
from bgrl_dgl.model.conv.gat import GATConv
from bgrl_dgl.model.conv.gcn import GCNConv
from bgrl_dgl.model.conv.sage import SAGEConv

__all__ = ["GATConv", "GCNConv", "SAGEConv"]
