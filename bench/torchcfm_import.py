"""Convert a TorchCFM CIFAR-10 checkpoint into this harness's checkpoint format.

Source: the CIFAR-10 flow-matching models of TorchCFM (atong01/conditional-flow-matching, release
1.0.4: ``otcfm_cifar10_weights_step_400000.pt``, ``cfm_...``, ``fm_...``), written by
``examples/images/cifar10/train_cifar10.py`` as ``torch.save({"net_model", "ema_model", "sched",
"optim", "step"})``, where ``ema_model`` is the state dict of ``UNetModelWrapper(dim=(3, 32, 32),
num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4, num_head_channels=64,
attention_resolutions="16", dropout=0.1)`` (35.7M parameters). Its ``compute_fid.py`` evaluates the
``ema_model`` weights; so does the harness (only they are converted).

Conventions, checked against METHOD.md Sec. 1 by reading TorchCFM's code (torchcfm 1.0.4-1.0.7):

- Time: t = 0 noise, t = 1 data, as ours. ``train_cifar10.py`` draws x0 = ``torch.randn_like(x1)``
  and takes x1 from the data loader; ``ConditionalFlowMatcher.compute_mu_t`` is t x1 + (1 - t) x0
  and the regression target ``compute_conditional_flow`` is x1 - x0 (variants ``icfm``/``cfm`` and
  ``otcfm``, the latter with minibatch-OT pairs; ``fm``, ``TargetConditionalFlowMatcher`` with
  sigma = 0, gives x_t = t x1 + (1 - t) eps and target x1 - eps: the same linear path). Sampling in
  ``compute_fid.py`` integrates ``odeint(net, randn, [0, 1])`` and maps the t = 1 end to pixels.
  The network is called as ``net(t, x)`` with t in [0, 1] (no rescaling). So v(x, t) = net(t, x)
  with no change of sign or time, and the converted field is their field exactly.
- Prior: x0 = ``randn``: N(0, I), i.e. sigma_0 = 1, the cifar10 dataset's sigma_0.
- Data: ``ToTensor`` then ``Normalize((0.5,) * 3, (0.5,) * 3)``: y = 2 k / 255 - 1 in [-1, 1] for
  8-bit levels k, with random horizontal flips and no dequantization. The harness evaluates on
  uniformly dequantized y = 2 (k + U) / 256 - 1, also in [-1, 1] (the F2D2 authors' protocol): the
  two differ by less than one quantization bin, no rescaling is applied, and the dequantized BPD
  remains a valid bound for a model trained on the lattice (it can only be pessimistic).
- The ``si`` variant (variance-preserving path) is refused: its time parametrisation differs.
  ``otcfm`` pairs noise and data by minibatch OT, so its marginal path p_t is not that of the
  independent linear interpolant the harness samples x_t from; this changes where distillation
  queries the teacher's field, never what the field is.

The architecture (widths, levels, blocks per level, where attention sits) is read from the state
dict's tensor names and shapes, so TorchCFM UNets of other sizes convert too (the record says
whether it is the published CIFAR-10 one); the head split (``num_heads``/``num_head_channels``)
is not in the weights and is taken from the options (TorchCFM's CIFAR-10 values by default).
The source is read with ``torch.load(weights_only=True)``: no code in the file ever runs.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.checkpoint import save_checkpoint, sha256_file
from bench.config import ConfigError, ModelConfig, key_dict, stable_hash, to_dict
from f2d2.model import Capabilities

IMPORTER_VERSION = 1  # part of every imported checkpoint's cache key
ENTRY = "ema_model"
DDP_PREFIX = "module."  # DistributedDataParallel training prefixes every name
VARIANTS = {"otcfm": "otcfm", "cfm": "cfm", "icfm": "cfm", "fm": "fm"}  # icfm's files are named cfm_
VARIANT_FROM_NAME = re.compile(r"^(otcfm|icfm|cfm|fm)_")
PUBLISHED_CIFAR10 = {"channels": 128, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2, "attn_resolutions": (16,)}
PUBLISHED_HEADS = {"num_heads": 4, "num_head_channels": 64}
PUBLISHED_DROPOUT = 0.1  # training only; recorded, no effect on evaluation
RES_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb": "emb_layers.1", "norm2": "out_layers.0",
             "conv2": "out_layers.3", "skip": "skip_connection"}
ATTN_NAMES = {"norm": "norm", "qkv": "qkv", "proj": "proj_out"}
TOP_NAMES = {"time_mlp.0": "time_embed.0", "time_mlp.2": "time_embed.2", "inp": "input_blocks.0.0",
             "mid1": "middle_block.0", "mid_attn": "middle_block.1", "mid2": "middle_block.2",
             "out_norm": "out.0", "out_conv": "out.2"}


class ConversionError(ValueError):
    """The source file cannot be converted; the message names the file and the reason."""


def resolve_variant(file_name: str, variant: str | None) -> str:
    """otcfm, cfm or fm: the option if given, else the file name's prefix (TorchCFM's naming)."""
    if variant is not None:
        if variant not in VARIANTS:
            raise ConversionError(f"unknown variant {variant!r}; valid: otcfm, cfm (icfm), fm")
        return VARIANTS[variant]
    match = VARIANT_FROM_NAME.match(file_name)
    if match is None:
        raise ConversionError(f"{file_name}: cannot tell the variant from the file name; pass --variant otcfm, cfm or fm")
    return VARIANTS[match.group(1)]


def read_source(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The ``ema_model`` state dict (DDP prefix removed) and facts about the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notes of the weights-only unpickler
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, KeyError, EOFError, UnpicklingError...
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        refused = [line for line in lines if "GLOBAL" in line]  # the weights-only unpickler's refusal
        if refused:
            raise ConversionError(f"{path}: refused, the file asks to load Python objects ({refused[0]}); "
                                  "only tensors and plain containers are read (torch.load weights_only=True)") from None
        detail = [line for line in lines if line.startswith("Unsupported")] or lines or [type(err).__name__]
        reason = detail[0].split(". ")[0][:160]
        raise ConversionError(f"{path}: not a readable torch file ({type(err).__name__}: {reason})") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict with an {ENTRY!r} entry (TorchCFM's train_cifar10.py), got {type(obj).__name__}")
    if ENTRY not in obj:
        found = ", ".join(sorted(map(str, obj))[:8]) or "none"
        raise ConversionError(f"{path}: no {ENTRY!r} entry (entries: {found}); expected TorchCFM's train_cifar10.py output")
    state = obj[ENTRY]
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ConversionError(f"{path}: {ENTRY!r} is not a state dict of named tensors")
    prefixed = all(name.startswith(DDP_PREFIX) for name in state)
    if prefixed:
        state = {name[len(DDP_PREFIX):]: value for name, value in state.items()}
    step = obj.get("step")
    return state, {"stripped_prefix": DDP_PREFIX if prefixed else None, "step": step if isinstance(step, int) else None}


def infer_architecture(state: dict[str, Tensor], data_shape: tuple[int, ...], where: Path) -> dict[str, Any]:
    """channels, channel_mult, num_res_blocks and attention_resolutions from names and shapes."""

    def fail(reason: str) -> ConversionError:
        return ConversionError(f"{where}: not a TorchCFM UNet for {data_shape} images: {reason}")

    first = state.get("input_blocks.0.0.weight")
    if first is None or first.ndim != 4:
        raise fail("no input convolution 'input_blocks.0.0.weight'")
    channels, in_channels = int(first.shape[0]), int(first.shape[1])
    if in_channels != data_shape[0] or "out.2.weight" not in state or state["out.2.weight"].shape[0] != data_shape[0]:
        out = tuple(state["out.2.weight"].shape) if "out.2.weight" in state else None
        raise fail(f"input convolution {tuple(first.shape)}, output convolution {out}: expected {data_shape[0]} channels in and out")
    if "label_emb.weight" in state:
        raise fail("class-conditional models (label_emb) are not supported")
    levels: list[list[tuple[int, bool]]] = [[]]
    i = 1
    while f"input_blocks.{i}.0.op.weight" in state or f"input_blocks.{i}.0.out_layers.3.weight" in state:
        if f"input_blocks.{i}.0.op.weight" in state:
            levels.append([])
        else:
            width = int(state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0])
            emb = state.get(f"input_blocks.{i}.0.emb_layers.1.weight")
            if emb is not None and emb.shape[0] == 2 * width:
                raise fail("use_scale_shift_norm models are not supported")
            levels[-1].append((width, f"input_blocks.{i}.1.qkv.weight" in state))
        i += 1
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts:
        raise fail(f"residual blocks per level {[len(level) for level in levels]}: expected the same number >= 1 per level")
    mult, attention = [], []
    for index, level in enumerate(levels):
        widths, attn = {w for w, _ in level}, {a for _, a in level}
        if len(widths) != 1 or len(attn) != 1 or next(iter(widths)) % channels:
            raise fail(f"level {index} has widths {sorted(widths)} (not one multiple of {channels}) or attention on some blocks only")
        mult.append(next(iter(widths)) // channels)
        if attn.pop():
            attention.append(data_shape[1] // 2**index)
    return {"channels": channels, "channel_mult": tuple(mult), "num_res_blocks": counts.pop(),
            "attn_resolutions": tuple(attention)}


def source_name(name: str, net: torch.nn.Module) -> str:
    """TorchCFM's name of our parameter ``name`` (without FlowMap's ``net.`` prefix)."""
    parts = name.split(".")
    for ours, theirs in TOP_NAMES.items():
        if name.startswith(ours + "."):
            rest = parts[len(ours.split(".")):]
            table = RES_NAMES if ours in ("mid1", "mid2") else ATTN_NAMES if ours == "mid_attn" else None
            return ".".join([theirs, table[rest[0]], *rest[1:]] if table else [theirs, *rest])
    group, index, part, *rest = parts  # down.J.res.norm1.weight, up.J.resample.conv.weight, ...
    stage = getattr(net, group)[int(index)]
    block = f"input_blocks.{int(index) + 1}" if group == "down" else f"output_blocks.{index}"
    if part == "res":
        return ".".join([block, "0", RES_NAMES[rest[0]], *rest[1:]])
    if part == "attn":
        return ".".join([block, "1", ATTN_NAMES[rest[0]], *rest[1:]])
    if group == "down":  # the stride-2 convolution is TorchCFM's Downsample.op
        return ".".join([block, "0", "op", *rest])
    return ".".join([block, "2" if stage.attn is not None else "1", *rest])  # Upsample.conv


def convert_state(state: dict[str, Tensor], net: torch.nn.Module, where: Path) -> tuple[dict[str, Tensor], dict]:
    """Our state dict from theirs: renamed, 1x1 Conv1d weights (c_out, c_in, 1) of attention
    reshaped to Linear (c_out, c_in); every tensor used once, every shape checked."""
    converted, reshaped = {}, []
    for name, ours in net.state_dict().items():
        theirs = source_name(name, net)
        if theirs not in state:
            raise ConversionError(f"{where}: missing tensor {theirs!r} (for {name}): not the UNet its other tensors describe")
        value = state[theirs]
        if value.shape != ours.shape and value.ndim == 3 and value.shape[2] == 1 and value.shape[:2] == ours.shape:
            value = value[:, :, 0]
            reshaped.append(theirs)
        if value.shape != ours.shape:
            raise ConversionError(f"{where}: tensor {theirs!r} has shape {tuple(value.shape)}, expected {tuple(ours.shape)}")
        converted[name] = value.to(ours.dtype).contiguous()
    unused = sorted(set(state) - {source_name(n, net) for n in converted})
    if unused:
        raise ConversionError(f"{where}: {len(unused)} tensor(s) of no known role, e.g. {unused[0]!r}: not a TorchCFM UNet of this layout")
    return converted, {"num_tensors": len(converted), "reshaped_conv1d_to_linear": reshaped}


def import_torchcfm(
    path: str | Path,
    out: str | Path,
    *,
    variant: str | None = None,
    num_heads: int = PUBLISHED_HEADS["num_heads"],
    num_head_channels: int = PUBLISHED_HEADS["num_head_channels"],
    dataset: str = "cifar10",
) -> Path:
    """Convert TorchCFM checkpoint ``path`` into a harness checkpoint directory ``out``.

    Everything is read and checked before anything is written; the directory then appears whole
    (staged beside it and renamed). Raises :class:`ConversionError` (or ConfigError for options).
    Returns ``out``.
    """
    from bench.datasets import dataset_class
    from bench.models import build_model

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--out {out} exists and is not an empty directory")
    data = dataset_class(dataset)
    variant = resolve_variant(path.name, variant)
    state, facts = read_source(path)
    arch = infer_architecture(state, tuple(data.data_shape), path)
    cfg = ModelConfig(arch="adm", num_heads=num_heads, num_head_channels=num_head_channels, dropout=PUBLISHED_DROPOUT, **arch)
    caps = Capabilities(flow_map=False, divergence_head=False)
    try:
        model = build_model(cfg, data.data_shape, caps, kappa=data.kappa, sigma_0=data.sigma_0)
    except ConfigError as err:
        raise ConversionError(f"{path}: {err}") from None
    tensors, conversion = convert_state(state, model.net, path)
    model.net.load_state_dict(tensors, strict=True)
    digest = sha256_file(path)
    identity = {"importer": "torchcfm", "version": IMPORTER_VERSION, "source_sha256": digest, "entry": ENTRY,
                "model": key_dict(cfg), "dataset": dataset, "kappa": data.kappa, "sigma_0": data.sigma_0}
    meta = {
        "method": "flow-matching", "dataset": dataset, "data_shape": list(data.data_shape),
        "capabilities": {"flow_map": False, "divergence_head": False, "backward": False},
        "kappa": data.kappa, "sigma_0": data.sigma_0, "model": to_dict(cfg), "step": facts["step"] or 0,
        "complete": True, "ema": True, "cache_key": stable_hash(identity), "identity": identity,
        "source": {
            "format": "torchcfm", "file": path.name, "sha256": digest, "variant": variant, "entry": ENTRY,
            "step": facts["step"], "published_cifar10_architecture": arch == PUBLISHED_CIFAR10
            and {"num_heads": num_heads, "num_head_channels": num_head_channels} == PUBLISHED_HEADS,
        },
        "conversion": {**conversion, "stripped_prefix": facts["stripped_prefix"], "architecture": "inferred from tensor names and shapes",
                       "conventions": "t = 0 noise, t = 1 data, prior N(0, I), data in [-1, 1]: as METHOD.md, nothing converted",
                       "velocity": "v(x, t) = net(t, x)", "weights": "EMA only (ema/)"},
    }
    _write(out, {f"ema/net.{name}": value for name, value in tensors.items()}, meta)
    return out


def _write(out: Path, tensors: dict[str, Tensor], meta: dict) -> None:
    """Stage the checkpoint beside ``out`` and rename it into place (an empty ``out`` is replaced)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".import", dir=out.parent))
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(stage, 0o777 & ~mask)  # mkdtemp's 0700 -> what a plain mkdir would give
        save_checkpoint(stage, tensors, meta)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
