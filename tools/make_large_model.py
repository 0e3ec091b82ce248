"""Write a synthetic MLP whose float32 weights exceed protobuf's 2 GB limit, with external data.

The model is ``x → (MatMul W_k → Add b_k → Relu) × L → MatMul W_out → y``; weights are
written to ``model.onnx.data`` one layer at a time, so this script itself never holds more
than one layer. Also writes ``calib.npz`` (keyed by the input name) with random inputs.

    python tools/make_large_model.py OUT_DIR [--gb 2.5] [--width 8192] [--samples 64]

Used by ``tools/large_model_memory.py`` (peak RSS of ``cet-onnx quantize`` on it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def _external(name: str, dims: list[int], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def write_model(out_dir: Path, gb: float = 2.5, width: int = 8192, classes: int = 1000,
                samples: int = 64, seed: int = 0) -> tuple[Path, Path, int]:
    """Write ``model.onnx`` + ``model.onnx.data`` + ``calib.npz``; returns (model, calib, weight bytes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    layer_bytes = 4 * width * width
    layers = max(1, int(np.ceil((gb * 1e9 - 4 * width * classes) / layer_bytes)))
    data_name = "model.onnx.data"
    inits, nodes = [], []
    offset = 0
    x = "input"
    with open(out_dir / data_name, "wb") as f:
        def put(name: str, arr: np.ndarray) -> None:
            nonlocal offset
            pad = (-offset) % 4096  # page-aligned tensors, as onnx's own writer does for large ones
            f.write(b"\0" * pad)
            offset += pad
            data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
            f.write(data)
            inits.append(_external(name, list(arr.shape), data_name, offset, len(data)))
            offset += len(data)

        for k in range(layers):
            w = (rng.standard_normal((width, width), dtype=np.float32) * np.float32(np.sqrt(2.0 / width)))
            put(f"W{k}", w)
            del w
            put(f"b{k}", rng.standard_normal(width, dtype=np.float32) * np.float32(0.01))
            nodes += [helper.make_node("MatMul", [x, f"W{k}"], [f"h{k}"], name=f"matmul{k}"),
                      helper.make_node("Add", [f"h{k}", f"b{k}"], [f"a{k}"], name=f"add{k}"),
                      helper.make_node("Relu", [f"a{k}"], [f"r{k}"], name=f"relu{k}")]
            x = f"r{k}"
        put("W_out", rng.standard_normal((width, classes), dtype=np.float32) * np.float32(np.sqrt(1.0 / width)))
        nodes.append(helper.make_node("MatMul", [x, "W_out"], ["logits"], name="classifier"))
    graph = helper.make_graph(nodes, "large_mlp",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(out_dir / "model.onnx"))
    calib = out_dir / "calib.npz"
    np.savez(calib, input=rng.standard_normal((samples, width), dtype=np.float32))
    weight_bytes = 4 * (layers * (width * width + width) + width * classes)
    return out_dir / "model.onnx", calib, weight_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--gb", type=float, default=2.5, help="approximate float32 weight size in GB (1e9 bytes)")
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()
    model, calib, nbytes = write_model(args.out_dir, args.gb, args.width, samples=args.samples)
    print(f"wrote {model} ({nbytes / 1e9:.3f} GB of float32 weights in external data) and {calib}")


if __name__ == "__main__":
    main()
