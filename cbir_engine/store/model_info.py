"""What an index needs to know about a model: the input it takes (channels, size, normalisation)
and what it outputs (binary codes or float descriptors).

`cbir export` and the project's training scripts write this into the ONNX file's metadata
(`metadata_props`, keys below); for other ONNX files it is read off the graph: the input shape,
and a Sign node producing the output means binary codes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from cbir_engine.errors import ModelFormatError

META_PREPROCESS = "cbir.preprocess"  # JSON: {"channels", "height", "width", "mean", "std"}
META_OUTPUT = "cbir.output"  # "binary" or "float"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fashion-MNIST's pixel statistics: what cbir_engine.data.to_float normalises 28x28 images with.
GREY_MEAN = (0.286,)
GREY_STD = (0.353,)
DEFAULT_SIDE = 224  # for models whose height and width are dynamic


@dataclass(frozen=True)
class ModelInfo:
    """Input layout and output kind of an image model. Pixels are scaled to [0, 1], then
    (x - mean) / std per channel."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    output: str  # "binary" (sign outputs, packed into codes) or "float" (descriptors)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ModelFormatError(f"image models must take 1 or 3 channels, this one takes {self.channels}")
        if self.height < 1 or self.width < 1:
            raise ModelFormatError(f"bad model input size {self.height}x{self.width}")
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise ModelFormatError(f"mean {self.mean} / std {self.std} do not fit {self.channels} channels")
        if self.output not in ("binary", "float"):
            raise ModelFormatError(f"model output must be 'binary' or 'float', got {self.output!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        d = json.loads(text)
        return cls(int(d["channels"]), int(d["height"]), int(d["width"]), tuple(d["mean"]),
                   tuple(d["std"]), str(d["output"]))

    def metadata(self) -> dict[str, str]:
        """The `metadata_props` entries that carry this info inside an ONNX file."""
        pre = {"channels": self.channels, "height": self.height, "width": self.width,
               "mean": list(self.mean), "std": list(self.std)}
        return {META_PREPROCESS: json.dumps(pre, sort_keys=True), META_OUTPUT: self.output}


def default_info(channels: int, height: int, width: int, output: str) -> ModelInfo:
    """The project's conventions: ImageNet statistics for colour, Fashion-MNIST's for grey."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GREY_MEAN, GREY_STD)
    return ModelInfo(channels, height, width, mean, std, output)


def _read_proto(model: str | os.PathLike[str] | bytes):  # type: ignore[no-untyped-def]
    import onnx

    try:
        if isinstance(model, bytes):
            return onnx.load_from_string(model)
        # External data is not needed to read the graph's interface.
        return onnx.load(os.fspath(model), load_external_data=False)
    except FileNotFoundError:
        raise ModelFormatError(f"{model}: no such model file") from None
    except Exception as e:  # onnx raises DecodeError and others for non-ONNX bytes
        raise ModelFormatError(f"{model if not isinstance(model, bytes) else 'model bytes'}: "
                               f"not a readable ONNX model ({type(e).__name__}: {e})") from e


def read_model_info(model: str | os.PathLike[str] | bytes) -> ModelInfo:
    """The ModelInfo of an ONNX model (path or bytes): from its metadata where present, else
    from the graph (input [N, C, H, W]; dynamic H/W read as 224; Sign output -> binary)."""
    proto = _read_proto(model)
    meta = {p.key: p.value for p in proto.metadata_props}
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelFormatError(f"an image model takes one input and gives one output; this one has "
                               f"{len(inputs)} inputs and {len(graph.output)} outputs")
    if META_OUTPUT in meta:
        output = meta[META_OUTPUT]
    else:
        out_name = graph.output[0].name
        producer = next((n for n in graph.node if out_name in n.output), None)
        output = "binary" if producer is not None and producer.op_type == "Sign" else "float"
    if META_PREPROCESS in meta:
        try:
            pre = json.loads(meta[META_PREPROCESS])
            return ModelInfo(int(pre["channels"]), int(pre["height"]), int(pre["width"]),
                             tuple(float(v) for v in pre["mean"]), tuple(float(v) for v in pre["std"]),
                             output)
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFormatError(f"bad {META_PREPROCESS} metadata in the model: {e}") from e
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ModelFormatError(f"an image model takes [N, C, H, W]; this one's input has rank {len(dims)}")
    c, h, w = (d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:])
    if c not in (1, 3):
        raise ModelFormatError(f"image models must take 1 or 3 channels; this one's input is {c or '?'}")
    return default_info(c, h or DEFAULT_SIDE, w or DEFAULT_SIDE, output)


def with_metadata(onnx_bytes: bytes, info: ModelInfo) -> bytes:
    """The model with `info` written into its metadata_props (replacing earlier entries)."""
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in (META_PREPROCESS, META_OUTPUT)]
    del proto.metadata_props[:]
    for k, v in [*keep, *info.metadata().items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    return proto.SerializeToString()
