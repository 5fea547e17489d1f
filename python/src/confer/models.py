"""Exported models: the files ``confer model export`` writes, and loading
them into PyTorch.

An export is three files (``models/src/model.rs``, ``cli/src/train.rs``):

* ``model.safetensors``: the linear layers, input side first, as
  ``layers.{i}.weight`` (``[out, in]``) and ``layers.{i}.bias`` (``[out]``;
  Cox models have none), float32;
* ``model.spec.json``: the model spec (``architecture``, ``inputs``,
  ``hidden``, ``activation``, ``dropout``);
* ``model.job.json``: the job id, the round, the feature names in input
  order, the standardisation (per-feature ``mean`` and ``std``) and the
  privacy statement.

The model's forward pass: each hidden layer is linear then the activation
(ReLU by default, tanh, or exact GELU; dropout only while training), the
last layer is linear to one output: a logit for classifiers, a log
relative hazard for Cox. Inputs are raw features clamped to the job's
bounds and standardised as ``(clamp(x) - mean) / std``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .errors import ConfigurationError, InternalError

if TYPE_CHECKING:
    import torch

__all__ = [
    "load_torch_model",
    "read_safetensors",
    "write_safetensors",
]


def spec_path(weights: Path) -> Path:
    """Where the spec of ``weights`` goes: ``model.safetensors`` →
    ``model.spec.json``."""
    return weights.with_name(f"{weights.stem}.spec.json")


def job_path(weights: Path) -> Path:
    """Where the job metadata of ``weights`` goes: ``model.job.json``."""
    return weights.with_name(f"{weights.stem}.job.json")


def layer_shapes(spec: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The (out, in) shape of every linear layer, input side first."""
    width = int(spec["inputs"])
    shapes = []
    for h in spec.get("hidden") or []:
        shapes.append((int(h), width))
        width = int(h)
    shapes.append((1, width))
    return shapes


def has_bias(spec: Mapping[str, Any]) -> bool:
    """Whether the linear layers carry a bias (all but Cox's)."""
    return spec.get("architecture") != "cox"


def decode_f32(text: str) -> list[float]:
    """Flat float32 values from base64 of their little-endian bytes (how
    weights travel)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as e:
        raise InternalError(f"the exported weights are not base64: {e}") from None
    if len(raw) % 4:
        raise InternalError(f"the exported weights hold {len(raw)} bytes, not whole float32 values")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


_DTYPES = {"F32": ("f", 4), "F64": ("d", 8)}


def write_safetensors(path: Path, tensors: Mapping[str, tuple[Sequence[int], Sequence[float]]]) -> None:
    """Writes float32 tensors (name → (shape, flat values)) as safetensors."""
    header: dict[str, Any] = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        shape, values = tensors[name]
        expected = math.prod(shape)
        if len(values) != expected:
            raise InternalError(f"tensor {name}: {len(values)} values for shape {list(shape)}")
        data = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for chunk in chunks:
            f.write(chunk)
    os.replace(tmp, path)


def read_safetensors(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Reads float tensors (name → (shape, flat values)) from a safetensors file."""
    raw = Path(path).read_bytes()
    if len(raw) < 8:
        raise ConfigurationError(f"{path} is not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", raw[:8])
    if 8 + size > len(raw):
        raise ConfigurationError(f"{path} is not a safetensors file (header past the end)")
    try:
        header = json.loads(raw[8 : 8 + size])
    except ValueError as e:
        raise ConfigurationError(f"{path} is not a safetensors file: {e}") from None
    data = raw[8 + size :]
    out: dict[str, tuple[list[int], list[float]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _DTYPES:
            raise ConfigurationError(f"{path}: tensor {name} has dtype {dtype}; float32 or float64 expected")
        code, width = _DTYPES[dtype]
        start, end = info["data_offsets"]
        count = (end - start) // width
        values = list(struct.unpack(f"<{count}{code}", data[start:end]))
        out[name] = (list(info["shape"]), values)
    return out


def write_export(
    export: Mapping[str, Any], weights: Path, *, bounds: Mapping[str, Any] | None = None
) -> Path:
    """Writes a ``confer.model.export`` answer as ``confer model export``
    does (see the module's documentation). Returns the weights' path."""
    spec = export["spec"]
    values = decode_f32(export["weights"])
    tensors: dict[str, tuple[list[int], list[float]]] = {}
    at = 0
    for i, (out, inp) in enumerate(layer_shapes(spec)):
        tensors[f"layers.{i}.weight"] = ([out, inp], values[at : at + out * inp])
        at += out * inp
        if has_bias(spec):
            tensors[f"layers.{i}.bias"] = ([out], values[at : at + out])
            at += out
    if at != len(values):
        raise InternalError(f"the exported weights hold {len(values)} values; the spec needs {at}")
    if any(not math.isfinite(v) for v in values):
        raise InternalError("the exported weights are not all finite")
    weights = Path(weights)
    if weights.parent and not weights.parent.exists():
        weights.parent.mkdir(parents=True, exist_ok=True)
    spec_path(weights).write_text(json.dumps(spec, indent=2))
    write_safetensors(weights, tensors)
    meta: dict[str, Any] = {
        "job_id": export.get("job_id"),
        "round": export.get("round"),
        "features": export.get("features"),
        "standardisation": export.get("standardisation"),
        "privacy": export.get("privacy"),
    }
    if bounds:
        features = export.get("features") or []
        meta["bounds"] = {f: bounds[f] for f in features if f in bounds}
    job_path(weights).write_text(json.dumps(meta, indent=2))
    return weights


def load_torch_model(
    path: str | os.PathLike[str],
    *,
    bounds: Mapping[str, Sequence[float]] | None = None,
    device: str | torch.device | None = None,
) -> ConferModule:
    """Loads an exported model (``Job.export`` or ``confer model export``)
    into PyTorch, in evaluation mode.

    Args:
        path: The ``.safetensors`` file; the spec (``.spec.json``) and, if
            present, the job metadata (``.job.json``: features,
            standardisation, privacy statement) are read beside it.
        bounds: Per-feature ``[lo, hi]`` to clamp raw inputs to (as the
            nodes did in training); by default those in ``.job.json``.
        device: Where to put it (default: CPU).

    Returns:
        A ``torch.nn.Module`` (:class:`ConferModule`): ``model(x)`` maps
        standardised inputs ``[n, inputs]`` to logits (classifiers) or
        risk scores (Cox) ``[n]``, as confer's model does;
        ``model.predict(raw)`` clamps and standardises raw features first
        and gives probabilities of the positive class (or risk scores).

    Raises:
        ImportError: PyTorch is not installed (``pip install torch``).
        ConfigurationError: The files are missing or do not match.
    """
    try:
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_torch_model needs PyTorch: pip install torch") from e
    weights = Path(path)
    if weights.suffix != ".safetensors":
        raise ConfigurationError(f"{weights}: weights files are safetensors (.safetensors)")
    if not weights.is_file():
        raise ConfigurationError(f"{weights} does not exist")
    sidecar = spec_path(weights)
    try:
        spec = json.loads(sidecar.read_text())
    except OSError as e:
        raise ConfigurationError(f"cannot read the model spec {sidecar}: {e.strerror}") from None
    meta: dict[str, Any] = {}
    if job_path(weights).is_file():
        meta = json.loads(job_path(weights).read_text())
    module = _module_class()(spec, meta, bounds)
    tensors = read_safetensors(weights)
    state = {}
    for name, (shape, values) in tensors.items():
        state[name] = torch.tensor(values, dtype=torch.float32).reshape(shape)
    expected = {k for k in module.state_dict() if k.startswith("layers.")}
    missing = expected - set(state)
    if missing:
        raise ConfigurationError(f"{weights} lacks tensors {sorted(missing)} that the spec needs")
    for name in expected:
        if tuple(state[name].shape) != tuple(module.state_dict()[name].shape):
            raise ConfigurationError(
                f"{weights}: tensor {name} has shape {list(state[name].shape)}, the spec needs "
                f"{list(module.state_dict()[name].shape)}"
            )
    module.load_state_dict({k: state[k] for k in expected}, strict=False)
    module.eval()
    if device is not None:
        module.to(device)
    return cast("ConferModule", module)


_MODULE: Any = None


def _module_class() -> Any:
    """The ``torch.nn.Module`` class, defined when torch is first needed."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    import torch
    from torch import nn

    class ConferModule(nn.Module):
        """A confer model in PyTorch. See :func:`load_torch_model`.

        Attributes:
            spec: The model spec.
            features: Feature names in input order (if exported with them).
            privacy: The privacy statement.
            job_id: The job that trained it.
            round: Rounds the weights have been through.
        """

        def __init__(
            self,
            spec: Mapping[str, Any],
            meta: Mapping[str, Any],
            bounds: Mapping[str, Sequence[float]] | None,
        ) -> None:
            super().__init__()
            self.spec = dict(spec)
            self.features: list[str] = list(meta.get("features") or [])
            self.privacy: Any = meta.get("privacy")
            self.job_id: Any = meta.get("job_id")
            self.round: Any = meta.get("round")
            bias = has_bias(spec)
            self.layers = nn.ModuleList([nn.Linear(inp, out, bias=bias) for out, inp in layer_shapes(spec)])
            activation = spec.get("activation") or "relu"
            self.activation: nn.Module = {
                "relu": nn.ReLU(),
                "tanh": nn.Tanh(),
                "gelu": nn.GELU(approximate="none"),
            }[activation]
            self.dropout = nn.Dropout(float(spec.get("dropout") or 0.0))
            inputs = int(spec["inputs"])
            standard = meta.get("standardisation") or {}
            mean = standard.get("mean") or [0.0] * inputs
            std = standard.get("std") or [1.0] * inputs
            if len(mean) != inputs or len(std) != inputs:
                raise ConfigurationError(
                    f"the standardisation is for {len(mean)} features; the model has {inputs} inputs"
                )
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float64))
            chosen = bounds if bounds is not None else meta.get("bounds")
            lo = hi = None
            if chosen:
                names = self.features or [str(i) for i in range(inputs)]
                if set(names) - set(chosen):
                    raise ConfigurationError(f"bounds lack features {sorted(set(names) - set(chosen))}")
                lo = torch.tensor([float(chosen[n][0]) for n in names], dtype=torch.float64)
                hi = torch.tensor([float(chosen[n][1]) for n in names], dtype=torch.float64)
            self.register_buffer("lo", lo)
            self.register_buffer("hi", hi)

        @property
        def is_classifier(self) -> bool:
            """Whether it predicts a binary label (not a Cox risk score)."""
            return self.spec.get("architecture") != "cox"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """Logits (classifiers) or log relative hazards (Cox), shape
            ``[n]``, for standardised inputs ``[n, inputs]``."""
            h = x
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                h = layer(h)
                if i < last:
                    h = self.dropout(self.activation(h))
            return h.squeeze(1)

        def standardise(self, raw: Any) -> torch.Tensor:
            """Raw features ``[n, inputs]`` (a tensor, array or nested list,
            in :attr:`features` order) clamped to the bounds, if known,
            and standardised with the job's means and deviations."""
            mean = cast(torch.Tensor, self.mean)
            std = cast(torch.Tensor, self.std)
            lo = cast(torch.Tensor | None, self.lo)
            hi = cast(torch.Tensor | None, self.hi)
            x = torch.as_tensor(raw, dtype=torch.float64, device=mean.device)
            if x.dim() == 1:
                x = x.unsqueeze(0)
            if lo is not None and hi is not None:
                x = torch.maximum(torch.minimum(x, hi), lo)
            return ((x - mean) / std).to(torch.float32)

        @torch.no_grad()
        def predict(self, raw: Any) -> torch.Tensor:
            """Probabilities of the positive class (classifiers) or risk
            scores (Cox) for raw features, as confer's ``Model::predict``
            computes them after the nodes' standardisation."""
            was_training = self.training
            self.eval()
            try:
                out = self.forward(self.standardise(raw))
            finally:
                self.train(was_training)
            return torch.sigmoid(out) if self.is_classifier else out

    _MODULE = ConferModule
    return _MODULE


def __getattr__(name: str) -> Any:
    # `confer.models.ConferModule` is made when torch is first needed.
    if name == "ConferModule":
        return _module_class()
    raise AttributeError(name)


if TYPE_CHECKING:
    from torch import nn

    class ConferModule(nn.Module):
        """A confer model in PyTorch (defined at run time; see :func:`load_torch_model`)."""

        spec: dict[str, Any]
        features: list[str]
        privacy: Any
        job_id: Any
        round: Any
        is_classifier: bool

        def forward(self, x: torch.Tensor) -> torch.Tensor: ...

        def standardise(self, raw: Any) -> torch.Tensor: ...

        def predict(self, raw: Any) -> torch.Tensor: ...
