"""A synthetic streaming voice-activity model with the structure of published ones, and a streamed signal for it.

The model (``vad.onnx``) takes ``input [batch, samples]`` (one 32 ms frame), a scalar ``sr: int64`` (16000 or
8000) and a recurrent ``state [2, batch, 128]`` whose batch axis is 1, and returns ``output [batch, 1]`` (the
speech probability) and ``stateN``. Its top-level graph is four nodes: ``Equal(sr, 16000)`` and an ``If`` whose
two branches each hold six Convs and a recurrent cell (Gemm / MatMul), every weight a ``Constant`` node inside
the branch; the 8 kHz branch reads half as many samples. Weights are random (seeded); the output layer is set
so that the probability rises with the frame's energy and crosses 0.5 between the silent and the voiced parts
of the streamed test signal, so that "speech / no speech" decisions mean something.

Also written: ``calib/`` (one ``.npz`` feed per run, the state taken from the previous run's output, as
``cet-onnx quantize --calib`` reads a folder of per-run feeds), ``eval16k.npy`` and ``eval8k.npy`` (disjoint
streamed signals, one row per frame).

    python tools/make_streaming_model.py OUT_DIR [--calib-frames 64] [--eval-frames 400]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 128
FRAME = {16000: 512, 8000: 256}
#: (out channels, kernel, stride) of the six Convs; the first one's stride halves at 8 kHz
CONVS = [(32, 16, 8), (32, 3, 2), (64, 3, 2), (64, 3, 1), (128, 3, 2), (128, 3, 1)]


def _const(nodes: list, name: str, value: np.ndarray) -> str:
    nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
    return name


def _branch(tag: str, first_stride: int, rng: np.random.Generator, out_w: np.ndarray, out_b: float) -> onnx.GraphProto:
    """One If branch: frame → six Convs → mean over time → recurrent cell → probability, new state."""
    n: list = []
    p = f"{tag}_"
    x = f"{p}x"
    n.append(helper.make_node("Unsqueeze", ["input", _const(n, f"{p}axis1", np.array([1], np.int64))], [x]))
    cin = 1
    for i, (cout, k, s) in enumerate(CONVS):
        stride = first_stride if i == 0 else s
        w = (rng.standard_normal((cout, cin, k)) * np.sqrt(2.0 / (cin * k))).astype(np.float32)
        b = np.zeros(cout, np.float32)
        y = f"{p}conv{i}"
        n.append(helper.make_node("Conv", [x, _const(n, f"{p}conv{i}.weight", w), _const(n, f"{p}conv{i}.bias", b)],
                                  [y], strides=[stride], pads=[k // 2, k // 2], name=f"{p}Conv_{i}"))
        n.append(helper.make_node("Relu", [y], [f"{y}_relu"]))
        x, cin = f"{y}_relu", cout
    n.append(helper.make_node("ReduceMean", [x], [f"{p}feat"], axes=[2], keepdims=0))
    # a recurrent cell as exporters unroll one: gates = feat·Wx + h·Wh + b → i, f, g, o
    h = f"{p}h"
    c = f"{p}c"
    n.append(helper.make_node("Gather", ["state", _const(n, f"{p}i0", np.array(0, np.int64))], [h], axis=0))
    n.append(helper.make_node("Gather", ["state", _const(n, f"{p}i1", np.array(1, np.int64))], [c], axis=0))
    wx = (rng.standard_normal((HIDDEN, 4 * HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
    wh = (rng.standard_normal((HIDDEN, 4 * HIDDEN)) / np.sqrt(HIDDEN) * 0.5).astype(np.float32)
    n.append(helper.make_node("Gemm", [f"{p}feat", _const(n, f"{p}cell.wx", wx),
                                       _const(n, f"{p}cell.b", np.zeros(4 * HIDDEN, np.float32))],
                              [f"{p}gx"], name=f"{p}Gemm_x"))
    n.append(helper.make_node("MatMul", [h, _const(n, f"{p}cell.wh", wh)], [f"{p}gh"], name=f"{p}MatMul_h"))
    n.append(helper.make_node("Add", [f"{p}gx", f"{p}gh"], [f"{p}gates"]))
    gates = [f"{p}gate{j}" for j in range(4)]
    split = _const(n, f"{p}split", np.full(4, HIDDEN, np.int64))
    n.append(helper.make_node("Split", [f"{p}gates", split], gates, axis=1))
    for j, act in enumerate(("Sigmoid", "Sigmoid", "Tanh", "Sigmoid")):
        n.append(helper.make_node(act, [gates[j]], [f"{gates[j]}_a"]))
    i_, f_, g_, o_ = (f"{g}_a" for g in gates)
    n.append(helper.make_node("Mul", [f_, c], [f"{p}fc"]))
    n.append(helper.make_node("Mul", [i_, g_], [f"{p}ig"]))
    n.append(helper.make_node("Add", [f"{p}fc", f"{p}ig"], [f"{p}c_new"]))
    n.append(helper.make_node("Tanh", [f"{p}c_new"], [f"{p}c_tanh"]))
    n.append(helper.make_node("Mul", [o_, f"{p}c_tanh"], [f"{p}h_new"]))
    n.append(helper.make_node("Gemm", [f"{p}feat", _const(n, f"{p}out.w", out_w),
                                       _const(n, f"{p}out.b", np.array([out_b], np.float32))],
                              [f"{p}logit_x"], name=f"{p}Gemm_out"))
    wo = (rng.standard_normal((HIDDEN, 1)) / np.sqrt(HIDDEN)).astype(np.float32)
    n.append(helper.make_node("MatMul", [f"{p}h_new", _const(n, f"{p}out.wh", wo)], [f"{p}logit_h"],
                              name=f"{p}MatMul_out"))
    n.append(helper.make_node("Add", [f"{p}logit_x", f"{p}logit_h"], [f"{p}logit"]))
    n.append(helper.make_node("Sigmoid", [f"{p}logit"], [f"{p}output"]))
    ax0 = _const(n, f"{p}axis0", np.array([0], np.int64))
    n.append(helper.make_node("Unsqueeze", [f"{p}h_new", ax0], [f"{p}h_u"]))
    n.append(helper.make_node("Unsqueeze", [f"{p}c_new", ax0], [f"{p}c_u"]))
    n.append(helper.make_node("Concat", [f"{p}h_u", f"{p}c_u"], [f"{p}stateN"], axis=0))
    outs = [helper.make_tensor_value_info(f"{p}output", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"{p}stateN", TensorProto.FLOAT, None)]
    return helper.make_graph(n, f"{tag}_branch", [], outs)


def build(seed: int = 0, out_w: dict[int, np.ndarray] | None = None,
          out_b: dict[int, float] | None = None) -> onnx.ModelProto:
    """The VAD model; ``out_w`` / ``out_b``: the output layer of each branch (by sample rate)."""
    out_w = out_w or {sr: np.full((128, 1), 1 / 128, np.float32) for sr in FRAME}
    out_b = out_b or {sr: 0.0 for sr in FRAME}
    then = _branch("sr16k", CONVS[0][2], np.random.default_rng(seed), out_w[16000], out_b[16000])
    other = _branch("sr8k", CONVS[0][2] // 2, np.random.default_rng(seed + 1), out_w[8000], out_b[8000])
    nodes = [helper.make_node("Constant", [], ["sr16000"], value=numpy_helper.from_array(np.array(16000, np.int64))),
             helper.make_node("Equal", ["sr", "sr16000"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["output", "stateN"], then_branch=then, else_branch=other, name="If_sr")]
    graph = helper.make_graph(
        nodes, "streaming_vad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, []),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", HIDDEN])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", HIDDEN])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def signal(frames: int, sr: int, seed: int) -> np.ndarray:
    """``frames`` frames of a streamed signal: voiced stretches (harmonics of a wandering pitch, with noise)
    between quiet ones, one row per frame."""
    rng = np.random.default_rng(seed)
    n = FRAME[sr]
    out = np.zeros((frames, n), np.float32)
    t = np.arange(n) / sr
    voiced, left = False, 0
    for k in range(frames):
        if left == 0:
            voiced, left = not voiced, int(rng.integers(8, 30))
        left -= 1
        noise = rng.standard_normal(n) * 0.003
        if voiced:
            f0 = rng.uniform(90, 250)
            amp = rng.uniform(0.1, 0.5)
            wave = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3)) / h for h in range(1, 8))
            out[k] = amp * wave + noise * 10
        else:
            out[k] = noise
    return out


def stream(session, frames: np.ndarray, sr: int) -> tuple[np.ndarray, list[dict]]:
    """Probabilities of every frame, run one after another with the state carried; and the feeds run."""
    state = np.zeros((2, 1, HIDDEN), np.float32)
    probs, feeds = [], []
    for frame in frames:
        feed = {"input": frame[None], "sr": np.array(sr, np.int64), "state": state}
        feeds.append(feed)
        prob, state = session.run(None, feed)
        probs.append(float(prob[0, 0]))
    return np.array(probs), feeds


def _logits(session, frames: np.ndarray, sr: int) -> np.ndarray:
    p, _ = stream(session, frames, sr)
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def calibrated_model(seed: int = 0) -> onnx.ModelProto:
    """:func:`build` with each branch's output bias set halfway between its voiced and quiet frames' logits."""
    import onnxruntime as ort

    base = build(seed)
    sess = ort.InferenceSession(base.SerializeToString(), providers=["CPUExecutionProvider"])
    bias = {}
    for sr in FRAME:
        frames = signal(200, sr, seed + 100)
        z = _logits(sess, frames, sr)
        loud = np.abs(frames).mean(axis=1) > 0.02
        bias[sr] = float(-(z[loud].mean() + z[~loud].mean()) / 2)
    scale = {sr: 1.0 for sr in FRAME}
    return build(seed, {sr: np.full((128, 1), scale[sr] / 128, np.float32) for sr in FRAME}, bias)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--calib-frames", type=int, default=64)
    ap.add_argument("--eval-frames", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import onnxruntime as ort

    args.out.mkdir(parents=True, exist_ok=True)
    model = calibrated_model(args.seed)
    onnx.save(model, args.out / "vad.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    calib = args.out / "calib"
    calib.mkdir(exist_ok=True)
    _, feeds = stream(sess, signal(args.calib_frames, 16000, args.seed + 1), 16000)
    for k, feed in enumerate(feeds):
        np.savez(calib / f"run{k:04d}.npz", **feed)
    for sr, name in ((16000, "eval16k.npy"), (8000, "eval8k.npy")):
        frames = signal(args.eval_frames, sr, args.seed + 2)
        np.save(args.out / name, frames)
        probs, _ = stream(sess, frames, sr)
        print(f"{name}: {len(frames)} frames, {np.mean(probs > 0.5):.1%} speech decisions")
    print(f"wrote {args.out / 'vad.onnx'} and {len(feeds)} calibration runs in {calib}")


if __name__ == "__main__":
    main()
