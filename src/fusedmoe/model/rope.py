"""Rotary position embeddings: inverse frequencies for each RoPE type, and their
application to queries and keys. Pure functions on arrays.

The frequencies follow ``transformers.modeling_rope_utils`` exactly (same
formulas, float32 like torch) for the types the supported families use:
plain RoPE (``rope_scaling=None``), ``linear``, ``dynamic`` (NTK, whose base
grows with the sequence length), ``yarn`` and ``llama3``. Rotation is the
GPT-NeoX "halves" form: ``x = [x1 | x2]`` becomes
``[x1 cos - x2 sin | x2 cos + x1 sin]``; DeepSeek's ``rope_interleave`` pairs
``(x0, x1), (x2, x3), ..`` instead, and, as transformers does, returns the
rotated pairs as halves (queries and keys alike, so their products are those of
the interleaved rotation).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fusedmoe.model.config import RopeScaling


def _exponents(dim: int) -> np.ndarray:
    """``[0, 2, 4, ..] / dim`` in float32, as torch computes it."""
    return np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)


def default_inv_freq(dim: int, theta: float) -> np.ndarray:
    """``[dim / 2]`` float32: ``1 / theta ** (2i / dim)``."""
    return (np.float32(1.0) / (np.float32(theta) ** _exponents(dim))).astype(np.float32)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, s: RopeScaling) -> tuple[np.ndarray, float]:
    factor = s.factor
    if s.attention_factor:
        attention = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention = yarn_mscale(factor, s.mscale) / yarn_mscale(factor, s.mscale_all_dim)
    else:
        attention = yarn_mscale(factor)
    original = s.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the original length
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    pos_freqs = np.float32(theta) ** _exponents(dim)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # 1: high frequency, kept as is
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq.astype(np.float32), float(attention)


def _llama3(dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    inv_freq = default_inv_freq(dim, theta)
    original = s.original_max_position_embeddings
    low_wavelen = original / s.low_freq_factor
    high_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def static_inv_freq(dim: int, theta: float,
                    scaling: RopeScaling | None) -> tuple[np.ndarray, float]:
    """``(inv_freq [dim / 2] float32, attention_scaling)`` for every type whose
    frequencies do not depend on the sequence (all but ``dynamic``, which gives
    its frequencies at the original length)."""
    if scaling is None or scaling.rope_type == "dynamic":
        return default_inv_freq(dim, theta), 1.0
    if scaling.rope_type == "linear":
        return (default_inv_freq(dim, theta) / np.float32(scaling.factor)).astype(np.float32), 1.0
    if scaling.rope_type == "yarn":
        return _yarn(dim, theta, scaling)
    if scaling.rope_type == "llama3":
        return _llama3(dim, theta, scaling), 1.0
    raise ValueError(f"rope_scaling.rope_type: unknown {scaling.rope_type!r}")


def dynamic_inv_freq(dim: int, theta: float, scaling: RopeScaling, seq_len: jax.Array) -> jax.Array:
    """Dynamic NTK: ``[dim / 2]`` for a forward pass whose last position is
    ``seq_len - 1`` (a traced int). Past the original length the base becomes
    ``theta * (factor * seq_len / original - (factor - 1)) ** (dim / (dim - 2))``.

    Keys are cached already rotated, so each keeps the frequencies of the call
    that computed it, exactly as transformers' cache does."""
    original = scaling.original_max_position_embeddings
    length = jnp.maximum(seq_len, original).astype(jnp.float32)
    base = theta * ((scaling.factor * length / original) - (scaling.factor - 1)) ** (
        dim / (dim - 2))
    return 1.0 / (base ** jnp.asarray(_exponents(dim)))


def rotary_tables(positions: jax.Array, dim: int, theta: float,
                  scaling: RopeScaling | None) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each ``[S, dim / 2]`` float32, for ``positions [S]``
    (attention scaling folded in, as transformers does)."""
    if scaling is not None and scaling.rope_type == "dynamic":
        inv_freq = dynamic_inv_freq(dim, theta, scaling, jnp.max(positions) + 1)
        attention = 1.0
    else:
        inv_freq, attention = static_inv_freq(dim, theta, scaling)
        inv_freq = jnp.asarray(inv_freq)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles) * attention, jnp.sin(angles) * attention


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, *,
                 interleaved: bool = False) -> jax.Array:
    """Rotate ``x [B, S, H, D]`` by ``cos``, ``sin [S, D/2]``: pairs ``(x[i], x[i + D/2])``,
    or with ``interleaved`` ``(x[2i], x[2i + 1])``; float32 inside, ``x``'s dtype out."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    dtype, x = x.dtype, x.astype(jnp.float32)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float,
           scaling: RopeScaling | None = None) -> jax.Array:
    """Rotary position embedding on ``x [B, S, H, D]`` at ``positions [S]``."""
    cos, sin = rotary_tables(positions, x.shape[-1], theta, scaling)
    return apply_rotary(x, cos, sin)
