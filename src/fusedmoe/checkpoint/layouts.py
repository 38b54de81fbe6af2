"""Named layouts of routed-expert weights and bit-exact converters between them.

A wrong gate/up split fails silently (outputs are off, nothing errors), so
every converter names the layout it reads and the layout it writes, and
checks the shapes it is given. All functions are pure, work on numpy arrays,
and only transpose, slice, stack and concatenate: conversions are bit-exact
in every dtype.

``G`` experts, ``K`` = emb dim, ``N`` = expert mlp dim. Each layout is a dict
of arrays whose keys are relative to the experts module:

=====================  ==============================================  ==========================
layout                 tensors                                         gate/up order
=====================  ==============================================  ==========================
``fusedmoe_fused``     ``wi [G,K,2,N]``, ``wo [G,N,K]``                ``wi[:,:,0]`` gate,
                       (+ ``wi_bias [G,2,N]``, ``wo_bias [G,K]``)      ``wi[:,:,1]`` up
``fusedmoe_unfused``   ``wi_0``, ``wi_1 [G,K,N]``, ``wo [G,N,K]``      separate
                       (+ ``wi_0_bias``, ``wi_1_bias [G,N]``,
                       ``wo_bias [G,K]``)
``hf_per_expert``      ``{e}.gate_proj.weight``, ``{e}.up_proj.weight``  separate; Mixtral names
                       ``[N,K]``, ``{e}.down_proj.weight [K,N]``        them ``w1``/``w3``/``w2``
                       (torch Linear, out x in; + ``.bias``)
``hf_packed``          ``gate_up_proj [G,2N,K]``, ``down_proj [G,K,N]``  first half gate
                       (+ ``gate_up_proj_bias [G,2N]``,
                       ``down_proj_bias [G,K]``)
``gpt_oss``            ``gate_up_proj [G,K,2N]``, ``down_proj [G,N,K]``  interleaved: ``[..., ::2]``
                       (+ ``gate_up_proj_bias [G,2N]``,                gate, ``[..., 1::2]`` up
                       ``down_proj_bias [G,K]``)
``maxtext_unfused``    ``wi_0``, ``wi_1 [G,K,N]``, ``wo [G,N,K]``      separate
``maxtext_prefused``   ``wi [G,K,2N]``, ``wo [G,N,K]``                 first half gate (global)
                       (+ ``wi_bias [G,2N]``, ``wo_bias [G,K]``)
=====================  ==============================================  ==========================

Every layout converts to and from ``fusedmoe_unfused`` (:func:`to_unfused`,
:func:`from_unfused`); :func:`convert` chains the two.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping

import numpy as np

Arrays = dict[str, np.ndarray]

#: per-expert tensor names (gate, up, down) of the HF families
HF_PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = ("w1", "w3", "w2")


class Layout(enum.StrEnum):
    """A named layout of routed-expert weights (see the module docstring)."""

    FUSEDMOE_FUSED = "fusedmoe_fused"
    FUSEDMOE_UNFUSED = "fusedmoe_unfused"
    HF_PER_EXPERT = "hf_per_expert"
    HF_PACKED = "hf_packed"
    GPT_OSS = "gpt_oss"
    MAXTEXT_UNFUSED = "maxtext_unfused"
    MAXTEXT_PREFUSED = "maxtext_prefused"


LAYOUTS = tuple(layout.value for layout in Layout)


def as_layout(value: str | Layout) -> Layout:
    """``value`` as a :class:`Layout`; a clear error listing the names otherwise."""
    try:
        return Layout(value)
    except ValueError:
        raise ValueError(f"layout: unknown layout {value!r}; expected one of {LAYOUTS}") from None


# ----------------------------------------------------------------------------- checks
def _get(tensors: Mapping[str, np.ndarray], name: str, layout: Layout, ndim: int) -> np.ndarray:
    if name not in tensors:
        raise KeyError(
            f"{layout.value}: missing tensor {name!r}; got {sorted(tensors)[:12]}"
            + (" ..." if len(tensors) > 12 else "")
        )
    a = np.asarray(tensors[name])
    if a.ndim != ndim:
        raise ValueError(f"{layout.value}: tensor {name!r} must have rank {ndim}, got {a.shape}")
    return a


def _expect(layout: Layout, name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{layout.value}: tensor {name!r} has shape {tuple(got)}, expected {want}")


def _optional_biases(tensors, layout, names) -> bool:
    present = [n for n in names if n in tensors]
    if present and len(present) != len(names):
        raise KeyError(f"{layout.value}: biases must come together; got only {present} of {names}")
    return bool(present)


def _c(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a)


def _check_unfused(t: Mapping[str, np.ndarray], layout=Layout.FUSEDMOE_UNFUSED) -> bool:
    g, k, n = _get(t, "wi_0", layout, 3).shape
    _expect(layout, "wi_1", _get(t, "wi_1", layout, 3).shape, (g, k, n))
    _expect(layout, "wo", _get(t, "wo", layout, 3).shape, (g, n, k))
    bias = _optional_biases(t, layout, ("wi_0_bias", "wi_1_bias", "wo_bias"))
    if bias:
        _expect(layout, "wi_0_bias", np.shape(t["wi_0_bias"]), (g, n))
        _expect(layout, "wi_1_bias", np.shape(t["wi_1_bias"]), (g, n))
        _expect(layout, "wo_bias", np.shape(t["wo_bias"]), (g, k))
    return bias


def _unfused(wi_0, wi_1, wo, biases=None) -> Arrays:
    out = {"wi_0": _c(wi_0), "wi_1": _c(wi_1), "wo": _c(wo)}
    if biases is not None:
        out["wi_0_bias"], out["wi_1_bias"], out["wo_bias"] = (_c(b) for b in biases)
    return out


# ----------------------------------------------------------------------------- fusedmoe
def fused_to_unfused(t: Mapping[str, np.ndarray]) -> Arrays:
    """Reads ``fusedmoe_fused``, writes ``fusedmoe_unfused``."""
    layout = Layout.FUSEDMOE_FUSED
    wi = _get(t, "wi", layout, 4)
    g, k, two, n = wi.shape
    if two != 2:
        raise ValueError(f"{layout.value}: tensor 'wi' must be [G, K, 2, N], got {wi.shape}")
    _expect(layout, "wo", _get(t, "wo", layout, 3).shape, (g, n, k))
    biases = None
    if _optional_biases(t, layout, ("wi_bias", "wo_bias")):
        _expect(layout, "wi_bias", np.shape(t["wi_bias"]), (g, 2, n))
        _expect(layout, "wo_bias", np.shape(t["wo_bias"]), (g, k))
        wb = np.asarray(t["wi_bias"])
        biases = (wb[:, 0], wb[:, 1], np.asarray(t["wo_bias"]))
    return _unfused(wi[:, :, 0], wi[:, :, 1], t["wo"], biases)


def _join_gate_up(t: Mapping[str, np.ndarray], join, wi: str = "wi", wo: str = "wo") -> Arrays:
    """Writes a layout that holds gate and up in one tensor from ``fusedmoe_unfused``:
    ``t[wi] = join(wi_0, wi_1)`` (and the same for the biases, as ``{wi}_bias``),
    ``t[wo]`` (and ``{wo}_bias``) copied."""
    bias = _check_unfused(t)
    out = {wi: join(t["wi_0"], t["wi_1"]), wo: _c(t["wo"])}
    if bias:
        out[f"{wi}_bias"] = join(t["wi_0_bias"], t["wi_1_bias"])
        out[f"{wo}_bias"] = _c(t["wo_bias"])
    return out


def unfused_to_fused(t: Mapping[str, np.ndarray]) -> Arrays:
    """Reads ``fusedmoe_unfused``, writes ``fusedmoe_fused`` (``wi = stack([wi_0, wi_1], -2)``)."""
    return _join_gate_up(t, lambda gate, up: np.stack([gate, up], axis=-2))


def _identity_unfused(layout: Layout) -> Callable[[Mapping[str, np.ndarray]], Arrays]:
    def convert(t: Mapping[str, np.ndarray]) -> Arrays:
        bias = _check_unfused(t, layout)
        return _unfused(t["wi_0"], t["wi_1"], t["wo"],
                        (t["wi_0_bias"], t["wi_1_bias"], t["wo_bias"]) if bias else None)

    convert.__doc__ = f"Reads ``{layout.value}``, writes ``fusedmoe_unfused`` (same tensors)."
    return convert


# ----------------------------------------------------------------------------- HF per expert
def hf_per_expert_to_unfused(
    t: Mapping[str, np.ndarray], num_experts: int, names: tuple[str, str, str] = HF_PROJ_NAMES
) -> Arrays:
    """Reads ``hf_per_expert`` (``{e}.{gate}.weight [N,K]``, ``{e}.{up}.weight [N,K]``,
    ``{e}.{down}.weight [K,N]``; ``names`` = :data:`HF_PROJ_NAMES` or
    :data:`MIXTRAL_NAMES`), writes ``fusedmoe_unfused``."""
    layout = Layout.HF_PER_EXPERT
    if num_experts < 1:
        raise ValueError(f"{layout.value}: num_experts must be >= 1, got {num_experts}")
    gate_n, up_n, down_n = names
    n, k = _get(t, f"0.{gate_n}.weight", layout, 2).shape
    gates, ups, downs = [], [], []
    for e in range(num_experts):
        gate = _get(t, f"{e}.{gate_n}.weight", layout, 2)
        up = _get(t, f"{e}.{up_n}.weight", layout, 2)
        dn = _get(t, f"{e}.{down_n}.weight", layout, 2)
        _expect(layout, f"{e}.{gate_n}.weight", gate.shape, (n, k))
        _expect(layout, f"{e}.{up_n}.weight", up.shape, (n, k))
        _expect(layout, f"{e}.{down_n}.weight", dn.shape, (k, n))
        gates.append(gate.T)
        ups.append(up.T)
        downs.append(dn.T)
    bias_names = [f"0.{p}.bias" for p in names]
    biases = None
    if _optional_biases(t, layout, bias_names):
        get_b = lambda p, size: np.stack(
            [_checked_bias(t, f"{e}.{p}.bias", layout, size) for e in range(num_experts)]
        )
        biases = (get_b(gate_n, n), get_b(up_n, n), get_b(down_n, k))
    return _unfused(np.stack(gates), np.stack(ups), np.stack(downs), biases)


def _checked_bias(t, name, layout, size):
    b = _get(t, name, layout, 1)
    _expect(layout, name, b.shape, (size,))
    return b


def unfused_to_hf_per_expert(
    t: Mapping[str, np.ndarray], names: tuple[str, str, str] = HF_PROJ_NAMES
) -> Arrays:
    """Reads ``fusedmoe_unfused``, writes ``hf_per_expert`` (see
    :func:`hf_per_expert_to_unfused`)."""
    bias = _check_unfused(t)
    gate_n, up_n, down_n = names
    out = {}
    for e in range(np.shape(t["wi_0"])[0]):
        out[f"{e}.{gate_n}.weight"] = _c(np.asarray(t["wi_0"])[e].T)
        out[f"{e}.{up_n}.weight"] = _c(np.asarray(t["wi_1"])[e].T)
        out[f"{e}.{down_n}.weight"] = _c(np.asarray(t["wo"])[e].T)
        if bias:
            out[f"{e}.{gate_n}.bias"] = _c(np.asarray(t["wi_0_bias"])[e])
            out[f"{e}.{up_n}.bias"] = _c(np.asarray(t["wi_1_bias"])[e])
            out[f"{e}.{down_n}.bias"] = _c(np.asarray(t["wo_bias"])[e])
    return out


# ----------------------------------------------------------------------------- HF packed (v5)
def _packed_biases(t, layout, g, n, k, split):
    if not _optional_biases(t, layout, ("gate_up_proj_bias", "down_proj_bias")):
        return None
    gub = _get(t, "gate_up_proj_bias", layout, 2)
    _expect(layout, "gate_up_proj_bias", gub.shape, (g, 2 * n))
    db = _get(t, "down_proj_bias", layout, 2)
    _expect(layout, "down_proj_bias", db.shape, (g, k))
    return (*split(gub), db)


def _get_gate_up(t, layout: Layout, name: str, axis: int, dims: str) -> tuple[np.ndarray, int]:
    """The rank-3 tensor ``name`` holding gate and up along ``axis`` (``dims``
    names its axes for errors, e.g. ``"[G,K,2N]"``), and N; an odd 2N is an error."""
    packed = _get(t, name, layout, 3)
    if packed.shape[axis] % 2:
        raise ValueError(f"{layout.value}: tensor {name!r} {dims} has odd 2N: {packed.shape}")
    return packed, packed.shape[axis] // 2


def hf_packed_to_unfused(t: Mapping[str, np.ndarray]) -> Arrays:
    """Reads ``hf_packed`` (transformers v5 ``experts.gate_up_proj [G,2N,K]``, first half
    gate; ``experts.down_proj [G,K,N]``), writes ``fusedmoe_unfused``."""
    layout = Layout.HF_PACKED
    gu, n = _get_gate_up(t, layout, "gate_up_proj", 1, "[G,2N,K]")
    g, _, k = gu.shape
    dn = _get(t, "down_proj", layout, 3)
    _expect(layout, "down_proj", dn.shape, (g, k, n))
    biases = _packed_biases(t, layout, g, n, k, lambda b: (b[:, :n], b[:, n:]))
    return _unfused(
        gu[:, :n].transpose(0, 2, 1), gu[:, n:].transpose(0, 2, 1), dn.transpose(0, 2, 1), biases
    )


def unfused_to_hf_packed(t: Mapping[str, np.ndarray]) -> Arrays:
    """Reads ``fusedmoe_unfused``, writes ``hf_packed``."""
    bias = _check_unfused(t)
    wi_0, wi_1, wo = (np.asarray(t[n]) for n in ("wi_0", "wi_1", "wo"))
    out = {
        "gate_up_proj": _c(np.concatenate([wi_0, wi_1], axis=2).transpose(0, 2, 1)),
        "down_proj": _c(wo.transpose(0, 2, 1)),
    }
    if bias:
        out["gate_up_proj_bias"] = np.concatenate([t["wi_0_bias"], t["wi_1_bias"]], axis=1)
        out["down_proj_bias"] = _c(t["wo_bias"])
    return out


# ----------------------------------------------------------------------------- gpt-oss
def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``[..., N]`` x2 -> ``[..., 2N]`` with ``[..., ::2]`` gate and ``[..., 1::2]`` up."""
    return np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1])


def gpt_oss_to_unfused(t: Mapping[str, np.ndarray]) -> Arrays:
    """Reads ``gpt_oss`` (``gate_up_proj [G,K,2N]`` interleaved: ``[..., ::2]`` gate,
    ``[..., 1::2]`` up; ``down_proj [G,N,K]``; biases), writes ``fusedmoe_unfused``."""
    layout = Layout.GPT_OSS
    gu, n = _get_gate_up(t, layout, "gate_up_proj", 2, "[G,K,2N]")
    g, k, _ = gu.shape
    dn = _get(t, "down_proj", layout, 3)
    _expect(layout, "down_proj", dn.shape, (g, n, k))
    biases = _packed_biases(t, layout, g, n, k, lambda b: (b[:, ::2], b[:, 1::2]))
    return _unfused(gu[..., ::2], gu[..., 1::2], dn, biases)


def unfused_to_gpt_oss(t: Mapping[str, np.ndarray]) -> Arrays:
    """Reads ``fusedmoe_unfused``, writes ``gpt_oss``."""
    return _join_gate_up(t, lambda gate, up: _interleave(np.asarray(gate), np.asarray(up)),
                         wi="gate_up_proj", wo="down_proj")


# ----------------------------------------------------------------------------- MaxText prefused
def maxtext_prefused_to_unfused(t: Mapping[str, np.ndarray]) -> Arrays:
    """Reads ``maxtext_prefused`` (``wi [G,K,2N]``, first half gate), writes
    ``fusedmoe_unfused``."""
    layout = Layout.MAXTEXT_PREFUSED
    wi, n = _get_gate_up(t, layout, "wi", 2, "[G,K,2N]")
    g, k, _ = wi.shape
    _expect(layout, "wo", _get(t, "wo", layout, 3).shape, (g, n, k))
    biases = None
    if _optional_biases(t, layout, ("wi_bias", "wo_bias")):
        wb = _get(t, "wi_bias", layout, 2)
        _expect(layout, "wi_bias", wb.shape, (g, 2 * n))
        _expect(layout, "wo_bias", np.shape(t["wo_bias"]), (g, k))
        biases = (wb[:, :n], wb[:, n:], np.asarray(t["wo_bias"]))
    return _unfused(wi[..., :n], wi[..., n:], t["wo"], biases)


def unfused_to_maxtext_prefused(t: Mapping[str, np.ndarray]) -> Arrays:
    """Reads ``fusedmoe_unfused``, writes ``maxtext_prefused``."""
    return _join_gate_up(t, lambda gate, up: np.concatenate([gate, up], axis=-1))


# ----------------------------------------------------------------------------- dispatch
def to_unfused(tensors: Mapping[str, np.ndarray], layout: str | Layout, **kwargs) -> Arrays:
    """Read ``tensors`` in ``layout``, write ``fusedmoe_unfused``.

    ``hf_per_expert`` needs ``num_experts=`` and takes ``names=``.
    """
    layout = as_layout(layout)
    if layout is Layout.HF_PER_EXPERT:
        if "num_experts" not in kwargs:
            raise TypeError("to_unfused: layout hf_per_expert needs num_experts=")
        return hf_per_expert_to_unfused(tensors, **kwargs)
    if kwargs:
        raise TypeError(f"to_unfused: layout {layout.value} takes no options, got {sorted(kwargs)}")
    return _TO_UNFUSED[layout](tensors)


def from_unfused(tensors: Mapping[str, np.ndarray], layout: str | Layout, **kwargs) -> Arrays:
    """Read ``fusedmoe_unfused``, write ``layout`` (``hf_per_expert`` takes ``names=``)."""
    layout = as_layout(layout)
    if layout is Layout.HF_PER_EXPERT:
        return unfused_to_hf_per_expert(tensors, **kwargs)
    if kwargs:
        raise TypeError(
            f"from_unfused: layout {layout.value} takes no options, got {sorted(kwargs)}"
        )
    return _FROM_UNFUSED[layout](tensors)


def convert(
    tensors: Mapping[str, np.ndarray],
    src: str | Layout,
    dst: str | Layout,
    *,
    num_experts: int | None = None,
    names: tuple[str, str, str] = HF_PROJ_NAMES,
) -> Arrays:
    """Convert routed-expert tensors from layout ``src`` to layout ``dst``, bit-exact.

    ``num_experts`` is needed to read ``hf_per_expert``; ``names`` picks its tensor
    names (:data:`HF_PROJ_NAMES` or :data:`MIXTRAL_NAMES`).
    """
    src, dst = as_layout(src), as_layout(dst)
    read_kw = {}
    if src is Layout.HF_PER_EXPERT:
        if num_experts is None:
            raise TypeError("convert: reading hf_per_expert needs num_experts=")
        read_kw = {"num_experts": num_experts, "names": names}
    unfused = to_unfused(tensors, src, **read_kw)
    write_kw = {"names": names} if dst is Layout.HF_PER_EXPERT else {}
    return from_unfused(unfused, dst, **write_kw)


_TO_UNFUSED: dict[Layout, Callable[[Mapping[str, np.ndarray]], Arrays]] = {
    Layout.FUSEDMOE_FUSED: fused_to_unfused,
    Layout.FUSEDMOE_UNFUSED: _identity_unfused(Layout.FUSEDMOE_UNFUSED),
    Layout.HF_PACKED: hf_packed_to_unfused,
    Layout.GPT_OSS: gpt_oss_to_unfused,
    Layout.MAXTEXT_UNFUSED: _identity_unfused(Layout.MAXTEXT_UNFUSED),
    Layout.MAXTEXT_PREFUSED: maxtext_prefused_to_unfused,
}
_FROM_UNFUSED: dict[Layout, Callable[[Mapping[str, np.ndarray]], Arrays]] = {
    Layout.FUSEDMOE_FUSED: unfused_to_fused,
    Layout.FUSEDMOE_UNFUSED: _identity_unfused(Layout.FUSEDMOE_UNFUSED),
    Layout.HF_PACKED: unfused_to_hf_packed,
    Layout.GPT_OSS: unfused_to_gpt_oss,
    Layout.MAXTEXT_UNFUSED: _identity_unfused(Layout.MAXTEXT_UNFUSED),
    Layout.MAXTEXT_PREFUSED: unfused_to_maxtext_prefused,
}
