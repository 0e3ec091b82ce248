#!/usr/bin/env python3
"""Probe which onnx / onnxruntime versions handle the Q/DQ forms cet-onnx emits.

Standalone: needs only numpy, plus onnx (to build / check models) and
onnxruntime (to run them).  Each check builds a tiny model, runs it on the
onnxruntime CPU provider (with graph optimizations off and fully on) and
compares the result with a numpy reference; DequantizeLinear results must be
bit-exact.  A failing check is reported, never raised.

Usage:
  python tools/check_min_versions.py                 # build + check + run, all in this env
  python tools/check_min_versions.py build DIR       # build models (+ expected outputs) into DIR
  python tools/check_min_versions.py check DIR       # onnx.checker.check_model(full_check=True) on DIR/*.onnx
  python tools/check_min_versions.py run DIR         # run DIR/*.onnx in onnxruntime (onnx not needed)

Models built once by a new onnx can thus be run by old onnxruntime versions
(which do not need the onnx package) and checked by old onnx versions.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback

import numpy as np

# ONNX enum values (stable across versions); used when onnx is not importable
# and to feature-detect: a type counts as "known" only if the installed onnx
# TensorProto has the name.
_ENUM = {"FLOAT": 1, "UINT8": 2, "INT8": 3, "FLOAT16": 10, "UINT4": 21, "INT4": 22, "INT2": 26}
_NP = {"FLOAT": np.float32, "FLOAT16": np.float16}
_RANGE = {"INT8": (-128, 127), "UINT8": (0, 255), "INT4": (-8, 7), "UINT4": (0, 15), "INT2": (-2, 1)}
_BITS = {"INT8": 8, "UINT8": 8, "INT4": 4, "UINT4": 4, "INT2": 2}
# minimal IR version for an opset (onnx.helper.VERSION_TABLE)
_MIN_IR = {13: 7, 21: 10, 23: 11, 24: 12, 25: 13}


# --------------------------------------------------------------------------- specs
def _dq_spec(name, qtype, opset, *, shape=(64, 16), axis=1, block_size=None,
             scale_dtype="FLOAT", output_dtype=None, zero_point=True, matmul=False, widen=False, seed=0):
    """Weight-only DequantizeLinear on an initializer (optionally feeding a MatMul); ``widen``: the
    codes and zero point go through ``Cast(to=INT8)`` first, as cet-onnx writes low-bit weights for
    onnxruntime's INT8 kernels."""
    rng = np.random.default_rng(seed)
    lo, hi = _RANGE[qtype]
    q = rng.integers(lo, hi + 1, size=shape).astype(np.int64)
    q.flat[:4] = [lo, hi, 0, lo]  # make sure the extremes are present
    if block_size:
        sshape = list(shape)
        sshape[axis] = -(-shape[axis] // block_size)
    else:
        sshape = [shape[axis]]
    scale = (rng.random(sshape) * 0.05 + 0.001).astype(_NP[scale_dtype])
    zp = rng.integers(lo, hi + 1, size=sshape).astype(np.int64) if zero_point else np.zeros(sshape, np.int64)
    # numpy reference: (q - zp) * scale, computed in the output precision
    out_np = _NP[output_dtype or scale_dtype]
    if block_size:
        s_full = np.repeat(scale, block_size, axis=axis)
        z_full = np.repeat(zp, block_size, axis=axis)
        idx = [slice(None)] * len(shape)
        idx[axis] = slice(0, shape[axis])
        s_full, z_full = s_full[tuple(idx)], z_full[tuple(idx)]
    else:
        bshape = [1] * len(shape)
        bshape[axis] = shape[axis]
        s_full, z_full = scale.reshape(bshape), zp.reshape(bshape)
    expected = ((q - z_full).astype(out_np) * s_full.astype(out_np)).astype(out_np)
    spec = dict(kind="dq", name=name, qtype=qtype, opset=opset, q=q, scale=scale, scale_dtype=scale_dtype,
                zp=zp if zero_point else None, axis=axis, block_size=block_size,
                output_dtype=output_dtype, out_dtype=output_dtype or scale_dtype, exact=True, widen=widen)
    if matmul:
        x = rng.standard_normal((4, shape[0])).astype(np.float32)
        spec.update(x=x, exact=False)
        expected = (x.astype(np.float64) @ expected.astype(np.float64)).astype(np.float32)
    spec["expected"] = {"y": expected}
    return spec


def _qdq_spec(name, opset, seed=1):
    """UINT8 activation QuantizeLinear -> DequantizeLinear (per-tensor, runtime input)."""
    rng = np.random.default_rng(seed)
    scale = np.float32(0.0625)  # power of two: x / scale is exact, so rounding is unambiguous
    zp = np.uint8(128)
    x = (rng.standard_normal((4, 16)) * 4).astype(np.float32)
    x.flat[:4] = [1000.0, -1000.0, 0.5 * 0.0625, 1.5 * 0.0625]  # saturation + half-to-even ties
    q = np.clip(np.rint(x / scale) + np.float32(zp), 0, 255).astype(np.uint8)
    y = ((q.astype(np.int32) - int(zp)).astype(np.float32) * scale).astype(np.float32)
    return dict(kind="qdq", name=name, opset=opset, x=x, scale=scale, zp=zp, exact=True,
                expected={"q": q, "y": y})


def all_specs():
    S = []
    S.append(_dq_spec("int8_axis_op13", "INT8", 13))
    S.append(_dq_spec("int4_axis_op21", "INT4", 21))
    S.append(_dq_spec("int4_block_op21", "INT4", 21, axis=0, block_size=32))
    S.append(_dq_spec("uint4_block_op21", "UINT4", 21, axis=0, block_size=32))
    S.append(_dq_spec("int4_block_matmul_op21", "INT4", 21, axis=0, block_size=32, matmul=True))
    S.append(_dq_spec("int4_axis_cast_int8_op21", "INT4", 21, widen=True))
    S.append(_dq_spec("int2_axis_op25", "INT2", 25))
    S.append(_dq_spec("int2_axis_cast_int8_op25", "INT2", 25, widen=True))
    S.append(_dq_spec("int2_block_op25", "INT2", 25, axis=0, block_size=32))
    S.append(_dq_spec("int2_block_matmul_op25", "INT2", 25, axis=0, block_size=32, matmul=True))
    S.append(_dq_spec("int8_axis_fp16s_outf32_op23", "INT8", 23, scale_dtype="FLOAT16", output_dtype="FLOAT"))
    S.append(_dq_spec("int4_block_fp16s_outf32_op23", "INT4", 23, axis=0, block_size=32,
                      scale_dtype="FLOAT16", output_dtype="FLOAT"))
    S.append(_dq_spec("int4_block_fp16s_outf32_op25", "INT4", 25, axis=0, block_size=32,
                      scale_dtype="FLOAT16", output_dtype="FLOAT"))
    # controls for the output_dtype rows: FLOAT16 scale -> FLOAT16 output, no output_dtype attribute
    S.append(_dq_spec("int4_block_fp16s_op21", "INT4", 21, axis=0, block_size=32, scale_dtype="FLOAT16"))
    S.append(_dq_spec("int4_block_fp16s_op23", "INT4", 23, axis=0, block_size=32, scale_dtype="FLOAT16"))
    S.append(_qdq_spec("uint8_qdq_op21", 21))
    S.append(_qdq_spec("uint8_qdq_op25", 25))
    return S


# --------------------------------------------------------------------------- packing
def pack_bits(values, bits):
    """Pack signed/unsigned ints, `8 // bits` per byte, first element in the lowest bits."""
    v = np.asarray(values, dtype=np.int64).ravel()
    if bits == 8:
        return (v & 0xFF).astype(np.uint8).tobytes()
    per = 8 // bits
    v = np.concatenate([v, np.zeros((-len(v)) % per, np.int64)]) & ((1 << bits) - 1)
    v = v.reshape(-1, per)
    out = np.zeros(len(v), np.int64)
    for i in range(per):
        out |= v[:, i] << (bits * i)
    return out.astype(np.uint8).tobytes()


# --------------------------------------------------------------------------- build (onnx)
def _dtype(onnx, name):
    val = getattr(onnx.TensorProto, name, None)
    if val is None:
        raise RuntimeError(f"onnx {onnx.__version__} has no TensorProto.{name}")
    return val


def _tensor(onnx, name, dtype_name, shape, raw):
    t = onnx.TensorProto()
    t.name = name
    t.data_type = _dtype(onnx, dtype_name)
    t.dims.extend(list(shape))
    t.raw_data = raw
    return t


def _raw_tensor(onnx, name, qtype, arr):
    return _tensor(onnx, name, qtype, np.shape(arr), pack_bits(arr, _BITS[qtype]))


def _float_tensor(onnx, name, arr, dtype_name):
    raw = np.ascontiguousarray(arr, dtype=np.dtype(_NP[dtype_name]).newbyteorder("<")).tobytes()
    return _tensor(onnx, name, dtype_name, np.shape(arr), raw)


def build_model(spec):
    """Return (ModelProto, note).  note reports whether onnx's own (un)packing agrees."""
    import onnx
    from onnx import helper

    opset = spec["opset"]
    note = ""
    if spec["kind"] == "dq":
        w = _raw_tensor(onnx, "w", spec["qtype"], spec["q"])
        inits = [w, _float_tensor(onnx, "w_scale", spec["scale"], spec["scale_dtype"])]
        ins = ["w", "w_scale"]
        if spec["zp"] is not None:
            inits.append(_raw_tensor(onnx, "w_zp", spec["qtype"], spec["zp"]))
            ins.append("w_zp")
        casts = []
        if spec.get("widen"):
            casts = [helper.make_node("Cast", [name], [f"{name}_int8"], to=onnx.TensorProto.INT8) for name in ins[::2]]
            ins = [f"{n}_int8" if i % 2 == 0 else n for i, n in enumerate(ins)]
        attrs = {"axis": spec["axis"]}
        if spec["block_size"]:
            attrs["block_size"] = spec["block_size"]
        if spec["output_dtype"]:
            attrs["output_dtype"] = _dtype(onnx, spec["output_dtype"])
        out_t = _dtype(onnx, spec["out_dtype"])
        if "x" in spec:
            nodes = [*casts, helper.make_node("DequantizeLinear", ins, ["w_dq"], **attrs),
                     helper.make_node("MatMul", ["x", "w_dq"], ["y"])]
            inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(spec["x"].shape))]
            outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                     [spec["x"].shape[0], spec["q"].shape[1]])]
        else:
            nodes = [*casts, helper.make_node("DequantizeLinear", ins, ["y"], **attrs)]
            inputs = []
            outputs = [helper.make_tensor_value_info("y", out_t, list(spec["q"].shape))]
        note = _onnx_unpack_note(onnx, w, spec["q"])
    else:
        inits = [helper.make_tensor("s", onnx.TensorProto.FLOAT, [], [float(spec["scale"])]),
                 helper.make_tensor("zp", onnx.TensorProto.UINT8, [], [int(spec["zp"])])]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
        shape = list(spec["x"].shape)
        inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)]
        outputs = [helper.make_tensor_value_info("q", onnx.TensorProto.UINT8, shape),
                   helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)]
    graph = helper.make_graph(nodes, spec["name"], inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="cet-onnx-check_min_versions")
    model.ir_version = _MIN_IR[opset]  # lowest IR that allows the opset, so old runtimes can load it
    return model, note


def _onnx_unpack_note(onnx, tensor, q):
    """Does onnx.numpy_helper.to_array read our manual packing back to the same ints?"""
    try:
        arr = onnx.numpy_helper.to_array(tensor)
    except Exception as e:  # noqa: BLE001 - old onnx / missing ml_dtypes
        return f"to_array n/a: {_first_line(e)}"
    try:
        back = np.asarray(arr).astype(np.int64)
    except Exception as e:  # noqa: BLE001 - dtype numpy cannot cast
        return f"to_array result not castable: {_first_line(e)}"
    if back.shape == q.shape and np.array_equal(back, q):
        return "to_array agrees"
    return "to_array DISAGREES with manual packing"


def check_model(model):
    import onnx

    onnx.checker.check_model(model, full_check=True)


# --------------------------------------------------------------------------- run (onnxruntime)
def run_model(model_bytes, spec_inputs, expected, exact):
    """Run on CPU with graph optimizations disabled and fully enabled; compare to expected.

    For the MatMul checks (exact=False) ORT_ENABLE_ALL may fuse DQ->MatMul into
    MatMulNBits, whose default accuracy_level (4 = int8-quantized activations) is
    lossy; the pass/fail run pins 'session.qdq_matmulnbits_accuracy_level' = 0 and
    the default's error is only returned as a note.
    """
    import onnxruntime as ort

    def _sess(level_name, config=None):
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level_name)
        so.log_severity_level = 3
        for k, v in (config or {}).items():
            so.add_session_config_entry(k, v)
        sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, spec_inputs)))

    acc0 = {} if exact else {"session.qdq_matmulnbits_accuracy_level": "0"}
    for level_name, config in (("ORT_DISABLE_ALL", None), ("ORT_ENABLE_ALL", acc0)):
        outs = _sess(level_name, config)
        for k, exp in expected.items():
            got = outs[k]
            if got.dtype != exp.dtype or got.shape != exp.shape:
                raise AssertionError(f"{level_name}: {k} is {got.dtype}{list(got.shape)}, "
                                     f"expected {exp.dtype}{list(exp.shape)}")
            d = np.abs(got.astype(np.float64) - exp.astype(np.float64))
            if exact:
                if not np.array_equal(got, exp):
                    raise AssertionError(f"{level_name}: {k} not bit-exact: {int((d > 0).sum())} differ, "
                                         f"max |diff| {d.max():.3g}")
            elif d.max() > 1e-5 * max(1.0, float(np.abs(exp).max())):
                raise AssertionError(f"{level_name}: {k} max |diff| {d.max():.3g} > tol")
    if exact:
        return ""
    got = _sess("ORT_ENABLE_ALL")["y"]
    exp = expected["y"]
    rel = float(np.abs(got.astype(np.float64) - exp).max() / np.abs(exp).max())
    return f"default ENABLE_ALL max rel err {rel:.1e}"


def _inputs(spec):
    return {"x": spec["x"]} if "x" in spec else {}


# --------------------------------------------------------------------------- driver
def _first_line(e):
    s = f"{type(e).__name__}: {e}".strip()
    # drop onnxruntime's source paths and C++ signatures so the message itself fits
    s = re.sub(r"/onnxruntime_src/\S+\s*", "", s)
    s = re.sub(r"(?:\w+::)+\w+\([^()]*\)\s*", "", s)
    s = s.replace("[ONNXRuntimeError] : ", "")
    for line in s.splitlines():
        line = line.strip()
        if line:
            return line[:240]
    return type(e).__name__


def _try(fn, *a):
    try:
        return "ok", fn(*a), ""
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        if os.environ.get("CHECK_TRACE"):
            traceback.print_exc()
        return "FAIL", None, _first_line(e)


def _versions():
    v = [f"python {sys.version.split()[0]}", f"numpy {np.__version__}"]
    for mod in ("onnx", "onnxruntime"):
        try:
            v.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001
            v.append(f"{mod} -")
    return ", ".join(v)


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: " | ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    print(fmt(header))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(fmt(r))


def _save(directory, spec, model):
    with open(os.path.join(directory, spec["name"] + ".onnx"), "wb") as f:
        f.write(model.SerializeToString())
    np.savez(os.path.join(directory, spec["name"] + ".npz"),
             **{"in_" + k: v for k, v in _inputs(spec).items()},
             **{"exp_" + k: v for k, v in spec["expected"].items()})


def _load(directory, name):
    with open(os.path.join(directory, name + ".onnx"), "rb") as f:
        data = f.read()
    z = np.load(os.path.join(directory, name + ".npz"))
    ins = {k[3:]: z[k] for k in z.files if k.startswith("in_")}
    exp = {k[4:]: z[k] for k in z.files if k.startswith("exp_")}
    return data, ins, exp


def main(argv):
    mode = argv[1] if len(argv) > 1 else "all"
    directory = argv[2] if len(argv) > 2 else None
    specs = all_specs()
    print(f"# {_versions()}")
    results = {}
    rows = []
    if mode == "all":
        for s in specs:
            st_b, built, err = _try(build_model, s)
            st_c = st_r = "-"
            if built:
                model, note = built
                st_c, _, err_c = _try(check_model, model)
                st_r, note_r, err_r = _try(run_model, model.SerializeToString(), _inputs(s), s["expected"],
                                           s["exact"])
                err = err_r or err_c or "; ".join(n for n in (note, note_r) if n)
            rows.append((s["name"], st_b, st_c, st_r, err))
            results[s["name"]] = {"build": st_b, "check": st_c, "run": st_r, "error": err}
        _table(rows, ("check", "build", "onnx.checker", "ort run", "error / note"))
    elif mode == "build":
        os.makedirs(directory, exist_ok=True)
        for s in specs:
            st, built, err = _try(build_model, s)
            if built:
                _save(directory, s, built[0])
                err = built[1]
            rows.append((s["name"], st, err))
            results[s["name"]] = {"build": st, "error": err}
        _table(rows, ("check", "build", "error / note"))
    elif mode == "check":
        import onnx

        for s in specs:
            path = os.path.join(directory, s["name"] + ".onnx")
            st, _, err = _try(lambda p: check_model(onnx.load(p)), path)
            rows.append((s["name"], st, err))
            results[s["name"]] = {"check": st, "error": err}
        _table(rows, ("check", "onnx.checker", "error"))
    elif mode == "run":
        for s in specs:
            st, note, err = _try(lambda n, ex: run_model(*_load(directory, n), ex), s["name"], s["exact"])
            err = err or note or ""
            rows.append((s["name"], st, err))
            results[s["name"]] = {"run": st, "error": err}
        _table(rows, ("check", "ort run", "error"))
    else:
        print(__doc__)
        return 2
    if os.environ.get("CHECK_JSON"):
        with open(os.environ["CHECK_JSON"], "w") as f:
            json.dump({"versions": _versions(), "mode": mode, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
