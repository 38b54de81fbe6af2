"""``fusedmoe convert``: Hugging Face <-> module checkpoints (orbax), of whole
models or of their MoE layers.

    fusedmoe convert HF_DIR OUT [--fused | --unfused]                  (whole model)
    fusedmoe convert HF_DIR OUT --moe-layers | --layer N ... [--fused | --unfused]
    fusedmoe convert CKPT OUT_HF [--packed] [--model-type T]
    fusedmoe convert CKPT OUT --fused | --unfused      (orbax -> orbax re-layout)

The direction follows the source: a directory with ``config.json`` is a Hugging
Face model, one with ``fusedmoe.json`` a fusedmoe module checkpoint
(:mod:`fusedmoe.checkpoint.module_checkpoint`); ``--to`` overrides the target
kind. From Hugging Face the whole decoder is converted (:func:`fusedmoe.hf.load_model`,
then :func:`~fusedmoe.checkpoint.module_checkpoint.save_model_checkpoint`)
unless ``--moe-layers`` or ``--layer`` asks for MoE layers only; back to
Hugging Face, a whole-model checkpoint becomes a whole model
(:func:`fusedmoe.hf.save_model`) and one of MoE layers their tensors. Every
input is checked before anything is written, and the output appears only when
complete (a temporary directory next to it, renamed at the end); a failed
conversion leaves nothing behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fusedmoe.atomic import file_in_the_way
from fusedmoe.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a Hugging Face model directory or a fusedmoe checkpoint")
    parser.add_argument("dst", help="the directory to write (must not exist, unless --overwrite)")
    parser.add_argument("--to", choices=("orbax", "hf"), default=None,
                        help="target kind (default: orbax from HF; from orbax, hf unless "
                             "--fused/--unfused asks for a re-layout)")
    parser.add_argument("--layer", type=int, action="append", default=None, metavar="N",
                        help="convert only this decoder layer's MoE block (repeatable)")
    parser.add_argument("--moe-layers", action="store_true",
                        help="from HF: convert every MoE layer, not the whole model (the default "
                             "is the whole model)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fused", dest="fused", action="store_const", const=True, default=None,
                       help="store wi [G,K,2,N] (default from HF)")
    group.add_argument("--unfused", dest="fused", action="store_const", const=False,
                       help="store wi_0, wi_1 [G,K,N]")
    parser.add_argument("--packed", action="store_true",
                        help="to HF: write transformers v5 packed expert tensors "
                             "(experts.gate_up_proj) instead of per-expert ones")
    parser.add_argument("--model-type", default=None,
                        help="to HF: the model_type, when the checkpoint does not record one")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")


def _kind(path: Path) -> str:
    from fusedmoe.checkpoint.module_checkpoint import META_FILE

    if not path.exists():
        raise UsageError(f"src: {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"src: {path} is not a directory")
    if (path / META_FILE).is_file():
        return "orbax"
    if (path / "config.json").is_file():
        return "hf"
    raise UsageError(
        f"src: {path} is neither a Hugging Face model directory (config.json) nor a fusedmoe "
        f"checkpoint ({META_FILE})"
    )


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src).absolute(), Path(args.dst).absolute()
    kind = _kind(src)
    # From orbax, --fused/--unfused alone means a re-layout (orbax -> orbax).
    to = args.to or ("orbax" if kind == "hf" or args.fused is not None else "hf")
    if dst == src:
        raise UsageError("dst: must differ from src")
    if dst.exists() and not args.overwrite:
        raise UsageError(f"dst: {dst} already exists (pass --overwrite to replace it)")
    blocked = file_in_the_way(dst)
    if blocked is not None:  # missing parents are created; a file in the way is an error
        raise UsageError(f"dst: {blocked} is a file, not a directory")
    if kind == "hf" and to == "hf":
        raise UsageError("--to hf: the source is already a Hugging Face model")
    if to == "orbax" and (args.packed or args.model_type):
        raise UsageError("--packed/--model-type: apply to --to hf only")
    if args.moe_layers and kind != "hf":
        raise UsageError("--moe-layers: applies to a Hugging Face source (a checkpoint's "
                         "kind, whole model or MoE layers, is kept)")
    if to == "hf" and args.fused is not None:
        raise UsageError("--fused/--unfused: apply to orbax output only (HF layouts are fixed)")
    if kind == "orbax" and to == "orbax" and args.fused is None:
        raise UsageError("orbax -> orbax: pass --fused or --unfused")

    from fusedmoe.errors import CheckpointError

    try:
        if kind == "hf" and (args.moe_layers or args.layer):
            written = _hf_to_orbax(src, dst, args)
        elif kind == "hf":
            written = _hf_model_to_orbax(src, dst, args)
        elif to == "orbax":
            from fusedmoe.checkpoint.module_checkpoint import convert_module_checkpoint

            if args.layer:
                raise UsageError("--layer: orbax -> orbax converts the whole checkpoint")
            written = convert_module_checkpoint(src, dst, fused=args.fused,
                                                overwrite=args.overwrite)
        else:
            written = _orbax_to_hf(src, dst, args)
    except (CheckpointError, FileNotFoundError, FileExistsError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise UsageError(msg) from None
    print(f"wrote {written}")
    return 0


def _hf_model_to_orbax(src: Path, dst: Path, args) -> Path:
    """The whole model of ``src`` as a module checkpoint, in the checkpoint's dtype."""
    from fusedmoe import hf
    from fusedmoe.checkpoint.module_checkpoint import save_model_checkpoint

    hf_config = hf.read_hf_config(src)
    model_type = hf.family_of(hf_config, str(src / "config.json")).model_type
    if model_type not in hf.WHOLE_MODEL_TYPES:
        raise UsageError(f"src: whole {model_type} models do not load yet (whole models: "
                         f"{', '.join(hf.WHOLE_MODEL_TYPES)}); pass --moe-layers or --layer N "
                         "to convert its MoE layers")
    model = hf.load_model(src, fused_moe_mlp=True if args.fused is None else args.fused)
    metadata = {"source": "huggingface", "model_type": model_type, "hf_config": hf_config}
    return save_model_checkpoint(dst, model, metadata=metadata, overwrite=args.overwrite)


def _hf_to_orbax(src: Path, dst: Path, args) -> Path:
    from fusedmoe import hf
    from fusedmoe.checkpoint.module_checkpoint import module_state, save_module_checkpoint

    hf_config = hf.read_hf_config(src)
    fused = True if args.fused is None else args.fused
    layers = hf.load_moe_layers(src, args.layer, fused_moe_mlp=fused)
    tree = {"layers": {str(i): module_state(m) for i, m in layers.items()}}
    configs = {f"layers/{i}": m.config for i, m in layers.items()}
    metadata = {"source": "huggingface", "model_type": hf_config["model_type"],
                "layers": sorted(layers), "hf_config": hf_config}
    return save_module_checkpoint(dst, tree, configs=configs, metadata=metadata,
                                  overwrite=args.overwrite)


def _layer_index(key: str, args) -> int:
    last = key.rsplit("/", 1)[-1]
    if last.isdigit():
        return int(last)
    if args.layer and len(args.layer) == 1:
        return args.layer[0]
    if key == "":
        return 0
    raise UsageError(f"--layer: cannot tell the decoder layer of {key!r}; pass one --layer")


def _model_orbax_to_hf(src: Path, dst: Path, args, meta: dict) -> Path:
    """A whole-model checkpoint as a Hugging Face model directory."""
    from fusedmoe import hf
    from fusedmoe.checkpoint.module_checkpoint import MODEL_CONFIG_KEY, model_from_module_checkpoint

    model_type = meta["metadata"][MODEL_CONFIG_KEY].get("model_type") or ""
    for flag, value in (("--packed", args.packed), ("--layer", args.layer)):
        if value:
            raise UsageError(f"{flag}: applies to checkpoints of MoE layers; {src} holds a whole "
                             "model (written as save_pretrained writes it)")
    if args.model_type is not None and args.model_type != model_type:
        raise UsageError(f"--model-type: got {args.model_type!r}, but {src} holds a whole "
                         f"{model_type or 'fusedmoe toy'} model")
    # save_model refuses a model its family cannot express before writing anything.
    return hf.save_model(model_from_module_checkpoint(src), dst, overwrite=args.overwrite)


def _orbax_to_hf(src: Path, dst: Path, args) -> Path:
    from fusedmoe import hf
    from fusedmoe.checkpoint.module_checkpoint import (
        is_model_checkpoint,
        load_module_checkpoint,
        read_module_checkpoint_meta,
    )
    from fusedmoe.config import MoEConfig

    meta = read_module_checkpoint_meta(src)
    if is_model_checkpoint(meta):
        return _model_orbax_to_hf(src, dst, args, meta)
    tree, meta = load_module_checkpoint(src)
    saved = meta.get("metadata", {})
    model_type = args.model_type or saved.get("model_type")
    if model_type is None:
        raise UsageError(
            f"--model-type: {src} records no model_type; pass one of "
            f"{', '.join(hf.SUPPORTED_MODEL_TYPES)}"
        )
    hf.family_of({"model_type": model_type}, "--model-type")
    if not meta["configs"]:
        raise UsageError(f"src: {src} holds no MoE layers")
    tensors, configs = {}, {}
    for key in sorted(meta["configs"]):
        index = _layer_index(key, args)
        if args.layer and index not in args.layer and key != "":
            continue
        node = tree
        for part in [p for p in key.split("/") if p]:
            node = node[part]
        configs[index] = MoEConfig.from_dict(meta["configs"][key])
        hf.check_exportable(configs[index], model_type)
        tensors.update(hf.state_to_hf(node, model_type, index, packed=args.packed))
    if not tensors:
        raise UsageError(f"--layer: none of {args.layer} is in {src}")
    hf_config = saved.get("hf_config")
    if hf_config is None:  # a native checkpoint: describe its MoE layers
        hf_config = _native_hf_config(configs, model_type, src)
    return hf.save_safetensors(dst, tensors, hf_config=hf_config, overwrite=args.overwrite)


def _native_hf_config(configs: dict, model_type: str, src: Path) -> dict | None:
    """``config.json`` for MoE layers that came from no Hugging Face model, when one
    config describes them all (a Hugging Face config has one MoE shape per model)."""
    from fusedmoe import hf

    layers = sorted(configs)
    described = [hf.hf_config_for(c, model_type, layers) for c in configs.values()]
    if any(d != described[0] for d in described):
        print(f"note: the MoE layers of {src} differ in shape or routing; one config.json "
              "cannot describe them all, so none is written (the tensors are)")
        return None
    print(f"note: {src} records no Hugging Face config.json; writing one that describes "
          "its MoE layers only")
    return described[0]
