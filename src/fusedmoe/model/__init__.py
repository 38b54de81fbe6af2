"""The decoder-only MoE transformer: one definition for the toy language model of
``fusedmoe train`` and for every Hugging Face family :mod:`fusedmoe.hf` loads.

=================  ===========================================================
module             what it holds
=================  ===========================================================
``config``         :class:`ModelConfig`, :class:`RopeScaling`
``rope``           rotary frequencies per RoPE type, and their application
``layers``         :class:`RMSNorm`, the dense gated FFN
``attention``      the masked softmax, grouped-query attention, ``ATTENTIONS``
``cache``          the KV cache (rings of slots, per layer)
``sharding``       where the parameters live on a mesh
``decoder``        blocks and :class:`Decoder` (``MoEModel``), ``cross_entropy``
=================  ===========================================================
"""

from fusedmoe.model.attention import ATTENTIONS, GroupedQueryAttention, attend
from fusedmoe.model.cache import Cache, LayerKV
from fusedmoe.model.config import FULL, SLIDING, ModelConfig, RopeScaling
from fusedmoe.model.decoder import Block, Decoder, MoEModel, cross_entropy
from fusedmoe.model.layers import DenseFFN, RMSNorm
from fusedmoe.model.rope import rotary

__all__ = [
    "ATTENTIONS", "FULL", "SLIDING", "Block", "Cache", "Decoder", "DenseFFN",
    "GroupedQueryAttention", "LayerKV", "ModelConfig", "MoEModel", "RMSNorm", "RopeScaling",
    "attend", "cross_entropy", "rotary",
]
