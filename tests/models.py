"""Small float models built with onnx.helper for the tests (real ONNX, real onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(rng, name, shape, scale=0.3):
    return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)


def small_cnn(seed: int = 0, constant_weights: bool = False, opset: int = 17) -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu + residual Add, depthwise Conv, GlobalAveragePool, Flatten, Gemm.

    Input ``x`` [N, 3, 8, 8], output ``logits`` [N, 10]. With ``constant_weights`` the Conv
    weights live in Constant nodes, as Paddle exports keep them.
    """
    rng = np.random.default_rng(seed)
    inits = [
        _init(rng, "c1.w", (8, 3, 3, 3)), _init(rng, "c1.b", (8,), 0.1),
        _init(rng, "c2.w", (8, 8, 3, 3), 0.2), _init(rng, "c2.b", (8,), 0.1),
        _init(rng, "dw.w", (8, 1, 3, 3)), _init(rng, "dw.b", (8,), 0.1),
        _init(rng, "fc.w", (10, 8), 0.5), _init(rng, "fc.b", (10,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["res"], name="add"),
        helper.make_node("Relu", ["res"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "dw.w", "dw.b"], ["dw"], name="dwconv", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Relu", ["dw"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    if constant_weights:
        consts = [helper.make_node("Constant", [], [t.name], value=t) for t in inits if t.name.endswith(".w")]
        inits = [t for t in inits if not t.name.endswith(".w")]
        nodes = consts + nodes
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def small_mlp(seed: int = 0) -> onnx.ModelProto:
    """MatMul-Add-Relu-MatMul on ``x`` [N, 16] → ``y`` [N, 4] (weights as MatMul B operands)."""
    rng = np.random.default_rng(seed)
    inits = [_init(rng, "w1", (16, 64)), _init(rng, "b1", (64,), 0.1), _init(rng, "w2", (64, 4))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(nodes, "small_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiny_encoder(seed: int = 0, vocab: int = 50, hidden: int = 32, ffn: int = 64, mask_value: float = -np.inf,
                 tied_head: bool = False) -> onnx.ModelProto:
    """A one-layer, one-head transformer encoder as Hugging Face exports build it.

    ``input_ids`` int64 [N, T], ``attention_mask`` int64 [N, T] → ``embedding`` [N, hidden]
    (masked mean pooling, L2-normalised). Word embeddings are a ``Gather`` over an initializer;
    the additive mask is ``Where(mask, 0, mask_value)`` (``-inf`` or ``finfo.min``); LayerNorm is
    LayerNormalization, GELU the Erf form. ``tied_head``: also ``logits`` [N, T, vocab], a MatMul
    with the transposed embedding table (a tied LM head).
    """
    rng = np.random.default_rng(seed)
    h = hidden
    inits = [_init(rng, "word_embeddings", (vocab, h), 1.0), _init(rng, "position_embeddings", (16, h), 0.1),
             numpy_helper.from_array(np.ones(h, np.float32), "ln1_g"), numpy_helper.from_array(np.zeros(h, np.float32), "ln1_b"),
             numpy_helper.from_array(np.ones(h, np.float32), "ln2_g"), numpy_helper.from_array(np.zeros(h, np.float32), "ln2_b"),
             *[_init(rng, n, (h, h), h ** -0.5) for n in ("wq", "wk", "wv", "wo")],
             _init(rng, "w1", (h, ffn), h ** -0.5), _init(rng, "b1", (ffn,), 0.02), _init(rng, "w2", (ffn, h), ffn ** -0.5),
             numpy_helper.from_array(np.array(h ** -0.5, np.float32), "inv_sqrt_d"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(mask_value, np.float32), "mask_value"),
             numpy_helper.from_array(np.array(2 ** -0.5, np.float32), "inv_sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"), numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"), numpy_helper.from_array(np.array([-1], np.int64), "axis_last"),
             numpy_helper.from_array(np.array(1e-12, np.float32), "eps")]
    mk = helper.make_node
    nodes = [
        mk("Gather", ["word_embeddings", "input_ids"], ["tok"], name="embed"),
        mk("Shape", ["input_ids"], ["ids_shape"]),
        mk("Gather", ["ids_shape", "one_i"], ["seq_len"], axis=0),
        mk("Range", ["zero_i", "seq_len", "one_i"], ["positions"]),
        mk("Gather", ["position_embeddings", "positions"], ["pos"], name="pos_embed"),
        mk("Add", ["tok", "pos"], ["emb"]),
        mk("LayerNormalization", ["emb", "ln1_g", "ln1_b"], ["x0"], axis=-1, name="ln1"),
        mk("MatMul", ["x0", "wq"], ["q"], name="q_proj"), mk("MatMul", ["x0", "wk"], ["k"], name="k_proj"),
        mk("MatMul", ["x0", "wv"], ["v"], name="v_proj"),
        mk("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        mk("MatMul", ["q", "kt"], ["scores_raw"], name="qk"),
        mk("Mul", ["scores_raw", "inv_sqrt_d"], ["scores"]),
        mk("Unsqueeze", ["attention_mask", "axis1"], ["mask3"]),
        mk("Cast", ["mask3"], ["mask_bool"], to=TensorProto.BOOL),
        mk("Where", ["mask_bool", "zero", "mask_value"], ["additive_mask"], name="mask_where"),
        mk("Add", ["scores", "additive_mask"], ["masked_scores"]),
        mk("Softmax", ["masked_scores"], ["probs"], axis=-1),
        mk("MatMul", ["probs", "v"], ["ctx"], name="pv"),
        mk("MatMul", ["ctx", "wo"], ["attn_out"], name="o_proj"),
        mk("Add", ["x0", "attn_out"], ["res1"]),
        mk("LayerNormalization", ["res1", "ln2_g", "ln2_b"], ["x1"], axis=-1, name="ln2"),
        mk("MatMul", ["x1", "w1"], ["f1"], name="ffn_in"), mk("Add", ["f1", "b1"], ["f1b"]),
        mk("Mul", ["f1b", "inv_sqrt2"], ["f1s"]), mk("Erf", ["f1s"], ["erf"]), mk("Add", ["erf", "one"], ["erf1"]),
        mk("Mul", ["f1b", "erf1"], ["g0"]), mk("Mul", ["g0", "half"], ["gelu"]),
        mk("MatMul", ["gelu", "w2"], ["f2"], name="ffn_out"),
        mk("Add", ["x1", "f2"], ["hidden_states"]),
        mk("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        mk("Unsqueeze", ["mask_f", "axis_last"], ["mask_f3"]),
        mk("Mul", ["hidden_states", "mask_f3"], ["masked_hidden"]),
        mk("ReduceSum", ["masked_hidden", "axis1"], ["summed"], keepdims=0),
        mk("ReduceSum", ["mask_f3", "axis1"], ["count"], keepdims=0),
        mk("Max", ["count", "one"], ["count1"]),
        mk("Div", ["summed", "count1"], ["pooled"]),
        mk("ReduceL2", ["pooled"], ["norm"], axes=[-1], keepdims=1),
        mk("Max", ["norm", "eps"], ["norm1"]),
        mk("Div", ["pooled", "norm1"], ["embedding"]),
    ]
    inits += [numpy_helper.from_array(np.array(1, np.int64), "one_i"), numpy_helper.from_array(np.array(0, np.int64), "zero_i")]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", h])]
    if tied_head:
        nodes += [mk("Transpose", ["word_embeddings"], ["head_t"], perm=[1, 0]),
                  mk("MatMul", ["hidden_states", "head_t"], ["logits"], name="lm_head")]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "T", vocab]))
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "T"]) for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "tiny_encoder", ints, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def encoder_feeds(n: int, seq: int = 12, vocab: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids and right-padded attention masks (every sample at least 3 real tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, seq)).astype(np.int64)
    lengths = rng.integers(3, seq + 1, size=n)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def outlier_mlp(seed: int = 0) -> onnx.ModelProto:
    """MatMul-Add-Relu-Gemm on ``x`` [N, 16] → ``logits`` [N, 10] whose hidden channel 0 always holds about 1000
    and is read by no output (its row of the Gemm weight is 0): an 8-bit grid over that range rounds the other
    channels away, so uniform static INT8 destroys the logits while the rest takes 8 bits without harm.
    (A Gemm with ``transB=1``: onnxruntime does not turn it into ``MatMulNBits``, which would quantize its float
    input on its own.)"""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(16, 32)) * 0.3).astype(np.float32)
    b1 = (rng.normal(size=(32,)) * 0.1).astype(np.float32)
    b1[0] = 1000.0
    w2 = (rng.normal(size=(10, 32)) * 2.0).astype(np.float32)
    w2[:, 0] = 0.0
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["hr"], name="relu"),
             helper.make_node("Gemm", ["hr", "w2"], ["logits"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "outlier_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def keras_style_mlp(seed: int = 0, hidden: int = 32, classes: int = 12, conv: bool = False) -> onnx.ModelProto:
    """Dense → GELU (tanh form) → LayerNorm → Dense → softmax, every block decomposed the way jax2tf / Keras
    exports write them (Magika's file-type classifier): the mean as ``ReduceSum · (1/n)`` reshaped and expanded
    before the ``Sub``, the softmax as ``Exp(x - max) / Expand(ReduceSum)``. ``x`` [N, 16] → ``probs`` [N, classes].
    ``conv``: a 1-wide Conv1D over the 16 input features first (Magika has Conv layers too)."""
    rng = np.random.default_rng(seed)
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, dtype=np.float32), name)  # noqa: E731
    shape = numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "col")
    inits = [_init(rng, "w1", (16, hidden)), _init(rng, "b1", (hidden,), 0.1), _init(rng, "w2", (hidden, classes), 0.5),
             c("k0", 0.044715), c("k1", np.sqrt(2 / np.pi)), c("one", 1.0), c("half", 0.5), c("inv_n", 1 / hidden),
             c("eps", 1e-5), shape]
    mk = helper.make_node
    first = "x"
    pre = []
    if conv:
        inits += [_init(rng, "wc", (16, 16, 1), 0.25), numpy_helper.from_array(np.array([-1, 16, 1], np.int64), "ncl"),
                  numpy_helper.from_array(np.array([-1, 16], np.int64), "nc")]
        pre = [mk("Reshape", ["x", "ncl"], ["x3"]), mk("Conv", ["x3", "wc"], ["c3"]), mk("Relu", ["c3"], ["r3"]),
               mk("Reshape", ["r3", "nc"], ["xc"])]
        first = "xc"
    nodes = pre + [mk("MatMul", [first, "w1"], ["h0"]), mk("Add", ["h0", "b1"], ["h"]),
             mk("Mul", ["h", "h"], ["h2"]), mk("Mul", ["h2", "h"], ["h3"]), mk("Mul", ["k0", "h3"], ["h3k"]),
             mk("Add", ["h", "h3k"], ["inner"]), mk("Mul", ["k1", "inner"], ["inner_s"]), mk("Tanh", ["inner_s"], ["t"]),
             mk("Add", ["one", "t"], ["t1"]), mk("Mul", ["half", "t1"], ["t1h"]), mk("Mul", ["h", "t1h"], ["g"]),
             mk("ReduceSum", ["g"], ["sum"], axes=[1], keepdims=0), mk("Mul", ["sum", "inv_n"], ["mean"]),
             mk("Reshape", ["mean", "col"], ["mean_c"]), mk("Sub", ["g", "mean_c"], ["centred"]),
             mk("Mul", ["centred", "centred"], ["sq"]), mk("ReduceSum", ["sq"], ["ssq"], axes=[1], keepdims=1),
             mk("Mul", ["ssq", "inv_n"], ["var"]), mk("Add", ["var", "eps"], ["var_e"]), mk("Sqrt", ["var_e"], ["std"]),
             mk("Div", ["centred", "std"], ["ln"]), mk("MatMul", ["ln", "w2"], ["logits"]),
             mk("ReduceMax", ["logits"], ["mx"], axes=[1], keepdims=1), mk("Sub", ["logits", "mx"], ["shifted"]),
             mk("Exp", ["shifted"], ["e"]), mk("ReduceSum", ["e"], ["es"], axes=[1], keepdims=0),
             mk("Reshape", ["es", "col"], ["es_c"]), mk("Div", ["e", "es_c"], ["probs"])]
    graph = helper.make_graph(nodes, "keras_style_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
