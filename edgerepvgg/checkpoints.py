"""Load and save RepVGG checkpoints.

Our own format is one safetensors file whose header metadata carries a JSON :class:`ModelMeta`
(variant, block type, classes, input spec, train-time or fused). Foreign checkpoints in the
official RepVGG, timm or MMPretrain key layouts (``.pth``/``.pt``/``.safetensors``, train-time or
deploy, wrapped in ``state_dict``/``model``/``module.`` or not) are recognized by their keys, renamed
to the official layout (which is ours) and their variant is read off the tensor shapes.

Pickles are only ever read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from edgerepvgg.inputs import FIELDS, INTERPOLATIONS, InputOverrides, InputSpec, apply_overrides, default_spec, describe_origins
from edgerepvgg.errors import UserError
from edgerepvgg.io import atomic_path
from edgerepvgg.models import VARIANTS, RepVGG, create_model, resolve_variant

log = logging.getLogger(__name__)

FORMAT = "edgerepvgg"
FORMAT_VERSION = 1
BUNDLED_DIR = Path(__file__).parent / "weights"
BUNDLED = {"repvgg-a0-fmnist": "repvgg_a0_fmnist.safetensors", "qarepvgg-a0-fmnist": "qarepvgg_a0_fmnist.safetensors"}
DEFAULT_MODEL = "repvgg-a0-fmnist"


@dataclass(frozen=True)
class ModelMeta:
    """What a checkpoint is: enough to rebuild the module and preprocess its inputs."""

    variant: str
    block: str = "repvgg"
    num_classes: int = 1000
    in_chans: int = 3
    fused: bool = False
    input_spec: InputSpec = field(default_factory=InputSpec)
    extra: dict = field(default_factory=dict)  # provenance: accuracy, training command, source layout

    def to_json(self) -> str:
        d = {"format": FORMAT, "version": FORMAT_VERSION, "variant": self.variant, "block": self.block,
             "num_classes": self.num_classes, "in_chans": self.in_chans, "fused": self.fused,
             "input_spec": self.input_spec.to_dict(), "extra": self.extra}  # fmt: skip
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelMeta":
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError("not an edgerepvgg metadata block")
        if d.get("version", 0) > FORMAT_VERSION:
            raise UserError(f"checkpoint format version {d['version']} is newer than this edgerepvgg; upgrade it")
        return cls(d["variant"], d["block"], d["num_classes"], d["in_chans"], d["fused"],
                   InputSpec.from_dict(d["input_spec"]), d.get("extra", {}))  # fmt: skip

    def build(self) -> RepVGG:
        return create_model(self.variant, self.num_classes, self.in_chans, self.block, deploy=self.fused)


def meta_for(model: RepVGG, input_spec: InputSpec | None = None, **extra) -> ModelMeta:
    """Describe a model: whether it is fused is read off its blocks."""
    fused = all(b.is_fused for b in model.blocks())
    spec = input_spec or default_spec(model.in_chans)
    return ModelMeta(model.config.name, model.block_type, model.num_classes, model.in_chans, fused, spec, dict(extra))


def save_checkpoint(path: str | Path, model: RepVGG, meta: ModelMeta, half: bool = False) -> Path:
    """Write model weights and metadata as one safetensors file, atomically. ``half`` stores conv
    and linear weights in float16 (loading casts back to float32); BN statistics and biases stay
    float32, where float16 would move predictions."""
    from safetensors.torch import save_file

    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if half and v.is_floating_point() and v.ndim > 1:  # weights only: BN statistics stay float32
            v = v.half()
        tensors[k] = v.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={FORMAT: meta.to_json()})
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Reading


def resolve_checkpoint(ref: str | Path | None) -> Path:
    """A path, or the name of a bundled model (``None`` means the default bundled model)."""
    if ref is None:
        ref = DEFAULT_MODEL
    if str(ref) in BUNDLED:
        path = BUNDLED_DIR / BUNDLED[str(ref)]
        if not path.is_file():
            raise UserError(f"bundled model {ref!r} is missing from the installation ({path}); reinstall edgerepvgg")
        return path
    path = Path(ref)
    if not path.exists():
        raise UserError(f"checkpoint {str(ref)!r} not found; pass a file path, a bundled model ({', '.join(BUNDLED)}) "
                        f"or a variant name ({', '.join(VARIANTS)})")  # fmt: skip
    if path.is_dir():
        raise UserError(f"checkpoint {str(ref)!r} is a folder; pass the checkpoint file inside it")
    return path


def _is_safetensors(path: Path) -> bool:
    """By suffix or by content: 8-byte little-endian header length, then a JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _torch_load_error(exc: Exception, path: Path) -> UserError:
    """One line out of torch's multi-paragraph unpickling errors (which suggest the unsafe load)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return UserError(
            f"{path} pickles {unsafe.group(1)}, which a safe (weights-only) load refuses to run; "
            "re-save only the weights (torch.save(model.state_dict(), ...) or safetensors)"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    first = (detail.group(1) if detail else text.strip().splitlines()[0] if text.strip() else type(exc).__name__).strip()
    return UserError(
        f"cannot read {path}: not a PyTorch or safetensors checkpoint ({first}); "
        "pass a .pth/.pt/.bin/.safetensors file holding a state dict"
    )


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], ModelMeta | None]:
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise UserError(f"cannot read {path}: not a valid safetensors file ({exc}); is it truncated?") from exc
        meta = None
        if FORMAT in header:
            try:
                meta = ModelMeta.from_json(header[FORMAT])
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{path} has a damaged edgerepvgg metadata block ({exc}); re-save it") from exc
        return tensors, meta
    try:
        # timm's trainer stores its argparse.Namespace beside the weights; it is plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a safe checkpoint"
        raise _torch_load_error(exc, path) from exc
    return _unwrap(obj, path), None


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside common wrappers and strip DataParallel/DDP prefixes."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("state_dict", "model", "model_state_dict", "module", "ema"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path} holds no state dict (found {type(obj).__name__}); save model.state_dict()")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} holds no tensors under its keys {list(obj)[:5]}")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


# Key layouts, as data: (name, a key that identifies it, [(pattern, replacement), ...]) mapping to
# the official layout. Patterns are applied in order to every key.
_TIMM_BLOCK = [
    (r"\.conv_kxk\.conv\.", ".rbr_dense.conv."), (r"\.conv_kxk\.bn\.", ".rbr_dense.bn."),
    (r"\.conv_1x1\.conv\.", ".rbr_1x1.conv."), (r"\.conv_1x1\.bn\.", ".rbr_1x1.bn."),
    (r"\.identity\.", ".rbr_identity."), (r"\.reparam_conv\.", ".rbr_reparam."),
]  # fmt: skip
_MMPRETRAIN_BLOCK = [
    (r"\.branch_3x3\.conv\.", ".rbr_dense.conv."), (r"\.branch_3x3\.norm\.", ".rbr_dense.bn."),
    (r"\.branch_1x1\.conv\.", ".rbr_1x1.conv."), (r"\.branch_1x1\.norm\.", ".rbr_1x1.bn."),
    (r"\.branch_norm\.", ".rbr_identity."), (r"\.branch_reparam\.", ".rbr_reparam."),
]  # fmt: skip
LAYOUTS: dict[str, tuple[str, list[tuple[str, str | Callable[[re.Match], str]]]]] = {
    "official": (r"^stage0\.", []),
    "timm": (r"^stem\.", [
        (r"^stem\.", "stage0."),
        (r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}."),
        (r"^head\.fc\.", "linear."),
        *_TIMM_BLOCK,
    ]),
    "mmpretrain": (r"^backbone\.stem\.", [
        (r"^backbone\.stem\.", "stage0."),
        (r"^backbone\.stage_(\d+)\.", r"stage\1."),
        (r"^head\.fc\.", "linear."),
        *_MMPRETRAIN_BLOCK,
    ]),
}  # fmt: skip
# Squeeze-excitation layers (RepVGG-D2se, RepVGGplus) have no counterpart in our blocks.
_SE_KEYS = re.compile(r"\.(se|se_layer|attn)\.")


def detect_layout(keys: list[str]) -> str:
    for name, (marker, _) in LAYOUTS.items():
        if any(re.search(marker, k) for k in keys):
            return name
    raise UserError(
        "unknown checkpoint layout; expected official RepVGG (stage0.*), timm (stem.*) or MMPretrain "
        f"(backbone.stem.*) keys, found e.g. {sorted(keys)[:4]}"
    )


def to_official(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Rename a state dict in any known layout to the official (our) layout. Keys that no rule
    renames are kept as they are, so :func:`load_state` reports them instead of dropping weights."""
    layout = detect_layout(list(tensors))
    se = sorted(k for k in tensors if _SE_KEYS.search(k))
    if se:
        raise UserError(
            f"this {layout}-layout checkpoint has squeeze-excitation layers (e.g. {se[0]}), as in RepVGG-D2se; "
            f"edgerepvgg supports the plain variants: {', '.join(VARIANTS)}"
        )
    rules = LAYOUTS[layout][1]
    out = {}
    for key, value in tensors.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out, layout


def infer_meta(tensors: dict[str, torch.Tensor]) -> ModelMeta:
    """Read variant, block type, classes, channels and fused-or-not off official-layout shapes."""
    try:
        fused = "stage0.rbr_reparam.weight" in tensors
        if fused:
            block = "repvgg"
            stem = tensors["stage0.rbr_reparam.weight"]
        else:
            block = "qarepvgg" if "stage0.bn.weight" in tensors else "repvgg"
            stem = tensors["stage0.rbr_dense.conv.weight"]
        head = tensors["linear.weight"]
    except KeyError as exc:
        raise UserError(f"checkpoint lacks {exc.args[0]!r}; is it a RepVGG classifier?") from exc
    if stem.ndim != 4 or head.ndim != 2:
        raise UserError(f"checkpoint has a {stem.ndim}-d stem conv and a {head.ndim}-d classifier; is it a RepVGG?")
    if stem.shape[1] not in (1, 3):
        raise UserError(f"checkpoint expects {stem.shape[1]} input channels; edgerepvgg supports 1 (grayscale) or 3 (RGB)")
    depths, widths = [], []
    for s in range(1, 5):
        idx = {int(m.group(1)) for k in tensors if (m := re.match(rf"stage{s}\.(\d+)\.", k))}
        depths.append(len(idx))
        conv = tensors.get(f"stage{s}.0.rbr_reparam.weight", tensors.get(f"stage{s}.0.rbr_dense.conv.weight"))
        widths.append(None if conv is None else conv.shape[0])
    probe = "rbr_reparam.weight" if fused else "rbr_dense.conv.weight"
    layer2 = tensors.get(f"stage1.1.{probe}")  # official layer index 2: grouped in g2/g4 variants
    group_ratio = 1 if layer2 is None or layer2.ndim != 4 else max(1, layer2.shape[0] // layer2.shape[1])
    for name, cfg in VARIANTS.items():
        if (tuple(depths) == cfg.num_blocks and tuple(widths) == cfg.stage_widths
                and stem.shape[0] == cfg.stem_width and group_ratio == cfg.groups):  # fmt: skip
            return ModelMeta(name, block, head.shape[0], stem.shape[1], fused, default_spec(stem.shape[1]))
    raise UserError(
        f"no RepVGG variant has blocks {depths}, widths {widths}, stem {stem.shape[0]}, groups {group_ratio}; "
        f"known variants: {', '.join(VARIANTS)}"
    )


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict`` with one clear error for missing/unexpected keys or shape mismatches."""
    expected = model.state_dict()
    tensors = {k: v for k, v in tensors.items() if k in expected or not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}")
        raise UserError(f"{path} does not match the model: {'; '.join(parts)}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise UserError(f"{path}: {k} has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}")
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise UserError(f"{path}: {k} holds {bad} NaN or infinite value(s); the checkpoint is corrupt, re-export it from training")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=False)


# ---------------------------------------------------------------------------------------------
# timm's config.json: the input spec a timm checkpoint was trained with

TIMM_CONFIG = "config.json"
_TIMM_INTERPOLATIONS = {"random": "bilinear"}  # timm's training-only choice; its eval default


def _config_error(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; fix or remove the file (it is read as timm's pretrained config beside the checkpoint)")


def read_timm_config(path: str | Path, base: InputSpec, num_classes: int) -> tuple[InputSpec, dict[str, str]]:
    """The input spec described by timm's ``config.json`` at ``path`` (``pretrained_cfg``:
    ``input_size`` [C, H, W], ``crop_pct``, ``interpolation``, ``mean``, ``std``; top-level
    ``num_classes`` and ``label_names``, a list or an index -> name dict; timm's older flat
    layout too), over ``base`` for what it does not say, and where each value came from. The
    channel and class counts must match the checkpoint's (``base.channels``, ``num_classes``)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _config_error(path, f"not readable JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise _config_error(path, "not a JSON object")
    pre = cfg.get("pretrained_cfg", cfg)  # timm's older configs were one flat dict
    if not isinstance(pre, dict):
        raise _config_error(path, "pretrained_cfg is not an object")
    where = f"timm {path.name}"
    origins = {f: "default" for f in FIELDS}
    changes: dict = {}
    try:
        classes = cfg.get("num_classes", pre.get("num_classes"))
        if classes is not None and int(classes) != num_classes:
            raise _config_error(path, f"num_classes is {classes} but the checkpoint's head has {num_classes} outputs; "
                                      "is it the config of another model?")  # fmt: skip
        size = pre.get("input_size")
        if size is not None:
            if len(size) != 3:
                raise _config_error(path, f"input_size should be [channels, height, width], got {size}")
            if int(size[0]) != base.channels:
                raise _config_error(path, f"input_size has {size[0]} channels but the checkpoint's stem takes {base.channels}")
            changes["size"] = (int(size[1]), int(size[2]))
            origins["size"] = where
        crop = pre.get("crop_pct")
        if crop is not None or "size" in changes:
            crop = 0.875 if crop is None else float(crop)  # timm's DEFAULT_CROP_PCT
            if not 0 < crop <= 1:
                raise _config_error(path, f"crop_pct must be in (0, 1], got {crop}")
            h, w = changes.get("size", base.hw)
            changes["resize"] = (math.floor(h / crop), math.floor(w / crop))  # as timm's eval transform
            origins["resize"] = f"{where}, crop_pct {crop:g}"
        mode = pre.get("crop_mode", "center") or "center"
        if mode != "center":
            log.warning("%s: crop_mode %r is not supported; using timm's default 'center' (resize keeping the aspect "
                        "ratio, crop the center), which may cost accuracy", path, mode)  # fmt: skip
        for key in ("mean", "std"):
            if pre.get(key) is not None:
                changes[key] = tuple(float(v) for v in pre[key])
                origins[key] = where
        interp = pre.get("interpolation")
        if interp:
            interp = _TIMM_INTERPOLATIONS.get(str(interp), str(interp))
            if interp not in INTERPOLATIONS:
                raise _config_error(path, f"interpolation {pre['interpolation']!r} is unknown; known: {', '.join(INTERPOLATIONS)}")
            changes["interpolation"] = interp
            origins["interpolation"] = where
        labels = cfg.get("label_names", pre.get("label_names", pre.get("labels")))
        if labels:
            if isinstance(labels, dict):
                order = sorted(labels, key=int)
                if [int(k) for k in order] != list(range(num_classes)):
                    raise _config_error(path, f"label_names must name every class index 0..{num_classes - 1} once")
                labels = [labels[k] for k in order]
            if len(labels) != num_classes:
                raise _config_error(path, f"label_names has {len(labels)} names but the head has {num_classes} outputs")
            changes["class_names"] = tuple(str(n) for n in labels)
            origins["class_names"] = where
    except (TypeError, ValueError) as exc:
        raise _config_error(path, f"unexpected value ({exc})") from exc
    try:
        return replace(base, **changes), origins
    except UserError as exc:
        raise _config_error(path, str(exc)) from exc


def _is_timm_config(path: Path) -> bool:
    """A ``config.json`` that looks like timm's (``pretrained_cfg`` or ``architecture`` inside)."""
    if not path.is_file():
        return False
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True  # read_timm_config says what is wrong with it
    return isinstance(cfg, dict) and ("pretrained_cfg" in cfg or "architecture" in cfg)


def read_checkpoint(ref: str | Path | None = None) -> tuple[dict[str, torch.Tensor], ModelMeta, Path]:
    """The tensors of any supported checkpoint (default: the bundled model) renamed to the
    official layout, its metadata (read off the shapes for a foreign checkpoint, whose
    ``extra["source_layout"]`` names its layout, with timm's ``config.json`` beside it read for
    its input spec) and its path; no model is built."""
    tensors, meta, path, _ = _read_checkpoint(ref)
    return tensors, meta, path


def _read_checkpoint(ref: str | Path | None) -> tuple[dict[str, torch.Tensor], ModelMeta, Path, dict[str, str] | None]:
    """read_checkpoint, plus where each input-spec value came from (None: our own checkpoint's)."""
    path = resolve_checkpoint(ref)
    tensors, meta = _read_tensors(path)
    origins = None
    if meta is None:
        tensors, layout = to_official(tensors)
        meta = infer_meta(tensors)
        meta = replace(meta, extra={"source_layout": layout, "source": str(path)})
        log.info("read %s as a %s-layout %s RepVGG-%s", path, layout, "fused" if meta.fused else "train-time", meta.variant)
        config = path.parent / TIMM_CONFIG
        origins = {f: "default" for f in FIELDS}
        if _is_timm_config(config):
            spec, origins = read_timm_config(config, meta.input_spec, meta.num_classes)
            meta = replace(meta, input_spec=spec, extra={**meta.extra, "input_config": str(config)})
    return tensors, meta, path, origins


def load_checkpoint(ref: str | Path | None = None, variant: str | None = None,
                    inputs: InputOverrides | None = None) -> tuple[RepVGG, ModelMeta]:  # fmt: skip
    """Load any supported checkpoint (default: the bundled model) as a RepVGG in eval mode,
    returning it with its metadata. ``variant`` overrides shape-based detection. A foreign
    checkpoint's input spec is read from timm's ``config.json`` beside it when there is one, else
    ImageNet's defaults; ``inputs`` overrides either (the log says where each value came from)."""
    tensors, meta, path, origins = _read_checkpoint(ref)
    if variant is not None:
        meta = replace(meta, variant=resolve_variant(variant).name)
    meta = _with_inputs(meta, inputs, origins)
    model = meta.build()
    load_state(model, tensors, path)
    return model.eval(), meta


def _with_inputs(meta: ModelMeta, inputs: InputOverrides | None, origins: dict[str, str] | None) -> ModelMeta:
    """``meta`` with ``inputs`` applied; logs where each value came from unless all came from
    our own checkpoint (``origins`` None: everything did before ``inputs``)."""
    spec, where = apply_overrides(meta.input_spec, inputs, meta.num_classes, origins)
    if origins is not None or (inputs is not None and inputs.given()):
        log.info("%s", describe_origins(spec, where))
    return meta if spec == meta.input_spec else replace(meta, input_spec=spec)


def is_variant_name(ref: str | Path | None) -> bool:
    """True when ``ref`` names a registered variant (``A0``, ``repvgg_b1g4``) rather than a
    checkpoint: not a bundled model name and not an existing path."""
    if ref is None or str(ref) in BUNDLED or Path(ref).exists():
        return False
    try:
        resolve_variant(str(ref))
    except UserError:
        return False
    return True


def load_model(ref: str | Path | None = None, *, num_classes: int = 1000, in_chans: int = 3,
               block: str = "repvgg", inputs: InputOverrides | None = None) -> tuple[RepVGG, ModelMeta]:  # fmt: skip
    """What every command takes as its model: a checkpoint file, a bundled model name (``None``:
    the default bundled model), or a variant name, which builds that variant with random weights
    (``num_classes``, ``in_chans``, ``block``) and says so in a warning: useful for sizes, speed
    and graph checks, meaningless for accuracy. ``inputs`` overrides the input spec it carries."""
    if not is_variant_name(ref):
        return load_checkpoint(ref, inputs=inputs)
    model = create_model(str(ref), num_classes=num_classes, in_chans=in_chans, block=block).eval()
    log.warning("%s is a variant name, not a checkpoint: RepVGG-%s with random weights (%d classes); "
                "accuracy figures mean nothing for it", ref, model.config.name, num_classes)  # fmt: skip
    meta = meta_for(model, default_spec(in_chans), random_weights=True)
    return model, _with_inputs(meta, inputs, {f: "default" for f in FIELDS} if inputs is not None and inputs.given() else None)


def describe(model: RepVGG, meta: ModelMeta, size: int | tuple[int, int] | None = None) -> dict:
    """Name, parameters (train-time and fused), MACs at ``size`` (default: the input size) and
    the per-layer table of ``model``: what ``edgerepvgg info`` prints."""
    from edgerepvgg._fuse import to_plain
    from edgerepvgg.plain import count_macs

    plain = to_plain(model, meta.input_spec)
    side = size or meta.input_spec.size
    rows = count_macs(plain, side)
    layers = [{"name": info.name, "in": info.in_channels, "out": info.out_channels, "stride": info.stride, "groups": info.groups,
               "out_size": out if isinstance(out, int) else list(out), "macs": macs} for info, (_, out, macs) in zip(plain.layers(), rows)]  # fmt: skip
    layers.append({"name": "head", "in": plain.head.in_features, "out": plain.head.out_features, "out_size": 1, "macs": rows[-1][2]})
    return {"name": plain.name, "variant": meta.variant, "block": meta.block, "fused": meta.fused, "size": side if isinstance(side, int) else list(side),
            "params_train": sum(p.numel() for p in model.parameters()), "params_fused": sum(p.numel() for p in plain.parameters()),
            "macs": sum(r[2] for r in rows), "layers": layers}  # fmt: skip
