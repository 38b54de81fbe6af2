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

The layouts a loader reads (``hf_per_expert``, ``hf_packed``, ``gpt_oss``) are
also described piece by piece (:class:`Piece`: which source tensor lands where
in which unfused array, through which transpose or slice). The converters to
``fusedmoe_unfused`` assemble their output from those pieces
(:func:`assemble`), and a loader can write the same pieces straight into a
model's final arrays, fused or not (:mod:`fusedmoe.hf.fill`): one description
of each layout for both.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping

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


# ----------------------------------------------------------------------------- pieces
def same(a: np.ndarray) -> np.ndarray:
    """A source tensor already in its target's layout."""
    return a


def transposed(a: np.ndarray) -> np.ndarray:
    """torch's Linear ``weight [out, in]`` -> our kernel ``[in, out]`` (a view)."""
    return a.T


def _experts_transposed(a: np.ndarray) -> np.ndarray:
    """``[G, out, in]`` -> ``[G, in, out]`` (a view)."""
    return a.transpose(0, 2, 1)


def _first_half(axis: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: a[(slice(None),) * axis + (slice(None, a.shape[axis] // 2),)]


def _second_half(axis: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: a[(slice(None),) * axis + (slice(a.shape[axis] // 2, None),)]


@dataclasses.dataclass(frozen=True)
class Piece:
    """One source tensor's share of a target array:
    ``target_array[index] = view(source_tensor)``.

    ``view`` only transposes and slices (no copy, no arithmetic), so writing a
    piece is bit-exact, casting aside; ``index`` is ``()`` for the whole target,
    ``(e,)`` for expert ``e``'s slot. Names are relative to whatever holds the
    tensors (the experts module here; :mod:`fusedmoe.hf.layers` adds the prefix).
    """

    source: str
    target: str
    index: tuple = ()
    view: Callable[[np.ndarray], np.ndarray] = same

    def renamed(self, source_prefix: str = "", target_prefix: str = "") -> Piece:
        return dataclasses.replace(self, source=source_prefix + self.source,
                                   target=target_prefix + self.target)


def hf_per_expert_pieces(
    num_experts: int, names: tuple[str, str, str] = HF_PROJ_NAMES, *, bias: bool = False
) -> list[Piece]:
    """``hf_per_expert`` -> ``fusedmoe_unfused``: expert ``e``'s gate ``[N,K]`` is
    ``wi_0[e]`` transposed, its up ``wi_1[e]``, its down ``[K,N]`` ``wo[e]``. In the
    order the tensors are stored: expert by expert."""
    out = []
    for e in range(num_experts):
        for name, target in zip(names, ("wi_0", "wi_1", "wo"), strict=True):
            out.append(Piece(f"{e}.{name}.weight", target, (e,), transposed))
        if bias:
            out += [Piece(f"{e}.{name}.bias", f"{target}_bias", (e,))
                    for name, target in zip(names, ("wi_0", "wi_1", "wo"), strict=True)]
    return out


def hf_packed_pieces(*, bias: bool = False) -> list[Piece]:
    """``hf_packed`` -> ``fusedmoe_unfused``: ``gate_up_proj [G,2N,K]``'s first half
    (transposed) is ``wi_0``, its second ``wi_1``; ``down_proj [G,K,N]`` transposed is
    ``wo``."""
    out = [Piece("gate_up_proj", "wi_0", view=lambda a: _experts_transposed(_first_half(1)(a))),
           Piece("gate_up_proj", "wi_1", view=lambda a: _experts_transposed(_second_half(1)(a))),
           Piece("down_proj", "wo", view=_experts_transposed)]
    if bias:
        out += [Piece("gate_up_proj_bias", "wi_0_bias", view=_first_half(1)),
                Piece("gate_up_proj_bias", "wi_1_bias", view=_second_half(1)),
                Piece("down_proj_bias", "wo_bias")]
    return out


def gpt_oss_pieces(*, bias: bool = False) -> list[Piece]:
    """``gpt_oss`` -> ``fusedmoe_unfused``: ``gate_up_proj [G,K,2N]`` interleaved,
    ``[..., ::2]`` is ``wi_0`` and ``[..., 1::2]`` ``wi_1``; ``down_proj [G,N,K]`` is
    ``wo`` as it is."""
    out = [Piece("gate_up_proj", "wi_0", view=lambda a: a[..., ::2]),
           Piece("gate_up_proj", "wi_1", view=lambda a: a[..., 1::2]),
           Piece("down_proj", "wo")]
    if bias:
        out += [Piece("gate_up_proj_bias", "wi_0_bias", view=lambda a: a[..., ::2]),
                Piece("gate_up_proj_bias", "wi_1_bias", view=lambda a: a[..., 1::2]),
                Piece("down_proj_bias", "wo_bias")]
    return out


def assemble(pieces: Iterable[Piece], tensors: Mapping[str, np.ndarray]) -> Arrays:
    """The targets of ``pieces`` as fresh contiguous arrays, each allocated once in its
    sources' dtype and written piece by piece from ``tensors`` (by source name).
    Target shapes follow from the pieces: a piece at ``(e,)`` needs ``e + 1`` slots."""
    parts = [(p, p.view(np.asarray(tensors[p.source]))) for p in pieces]
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, np.dtype] = {}
    for p, part in parts:
        if not all(isinstance(i, int) for i in p.index):
            raise ValueError(f"assemble: piece {p.source!r} -> {p.target!r} has index "
                             f"{p.index}; expected leading slots (ints)")
        shape = tuple(i + 1 for i in p.index) + part.shape
        old = shapes.get(p.target, shape)
        if len(old) != len(shape) or old[len(p.index):] != shape[len(p.index):]:
            raise ValueError(f"assemble: pieces of {p.target!r} disagree: {old} and {shape}")
        shapes[p.target] = tuple(max(a, b) for a, b in zip(old, shape, strict=True))
        dtypes[p.target] = np.result_type(dtypes.get(p.target, part.dtype), part.dtype)
    out = {t: np.empty(shape, dtypes[t]) for t, shape in shapes.items()}
    for p, part in parts:
        out[p.target][p.index] = part
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
    for e in range(num_experts):
        _expect(layout, f"{e}.{gate_n}.weight", _get(t, f"{e}.{gate_n}.weight", layout, 2).shape,
                (n, k))
        _expect(layout, f"{e}.{up_n}.weight", _get(t, f"{e}.{up_n}.weight", layout, 2).shape,
                (n, k))
        _expect(layout, f"{e}.{down_n}.weight", _get(t, f"{e}.{down_n}.weight", layout, 2).shape,
                (k, n))
    bias = _optional_biases(t, layout, [f"0.{p}.bias" for p in names])
    if bias:
        for e in range(num_experts):
            for name, size in zip(names, (n, n, k), strict=True):
                _checked_bias(t, f"{e}.{name}.bias", layout, size)
    return assemble(hf_per_expert_pieces(num_experts, names, bias=bias), t)


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
def _check_packed_biases(t, layout, g, n, k) -> bool:
    """Whether the packed layout has biases (both, of the right shapes)."""
    if not _optional_biases(t, layout, ("gate_up_proj_bias", "down_proj_bias")):
        return False
    _expect(layout, "gate_up_proj_bias", _get(t, "gate_up_proj_bias", layout, 2).shape,
            (g, 2 * n))
    _expect(layout, "down_proj_bias", _get(t, "down_proj_bias", layout, 2).shape, (g, k))
    return True


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
    bias = _check_packed_biases(t, layout, g, n, k)
    return assemble(hf_packed_pieces(bias=bias), t)


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
    bias = _check_packed_biases(t, layout, g, n, k)
    return assemble(gpt_oss_pieces(bias=bias), t)


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
