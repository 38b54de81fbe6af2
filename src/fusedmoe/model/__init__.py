"""The decoder-only MoE transformer: one definition for the toy language model of
``fusedmoe train`` and for every Hugging Face family :mod:`fusedmoe.hf` loads.

=====================  ====================================================================
module                 what it holds
=====================  ====================================================================
``config``             :class:`ModelConfig`, :class:`RopeScaling`
``rope``               rotary frequencies per RoPE type, and their application
``layers``             :class:`RMSNorm`, the dense gated FFN
``softmax_attention``  the masked softmax over positions (with optional sinks)
``attention``          grouped-query attention (with or without sinks), ``ATTENTIONS``
``latent_attention``   multi-head latent attention (DeepSeek), its absorbed decode
``cache``              the KV cache (rings of slots per layer: keys and values, or latents)
``sharding``           where the parameters live on a mesh
``decoder``            blocks and :class:`Decoder` (``MoEModel``), ``cross_entropy``
=====================  ====================================================================
"""

from fusedmoe.model.attention import (
    ATTENTIONS,
    GroupedQueryAttention,
    MultiHeadLatentAttention,
    SinkAttention,
    attend,
)
from fusedmoe.model.cache import Cache, LatentKV, LayerKV
from fusedmoe.model.config import FULL, SLIDING, ModelConfig, RopeScaling
from fusedmoe.model.decoder import Block, Decoder, MoEModel, cache_bytes_per_token, cross_entropy
from fusedmoe.model.layers import DenseFFN, RMSNorm
from fusedmoe.model.rope import rotary

__all__ = [
    "ATTENTIONS", "FULL", "SLIDING", "Block", "Cache", "Decoder", "DenseFFN",
    "GroupedQueryAttention", "LatentKV", "LayerKV", "ModelConfig", "MoEModel",
    "MultiHeadLatentAttention", "RMSNorm", "RopeScaling", "SinkAttention", "attend",
    "cache_bytes_per_token", "cross_entropy", "rotary",
]
