#!/usr/bin/env python
"""Graph-structure check on a decoder export: a small GPT-2 with KV-cache inputs quantizes, loads and runs.

A ``transformers`` GPT-2 configuration (vocabulary 512, 2 layers, 4 heads, width 64, tied word
embeddings) with random weights (seed 0) is exported with ``torch.onnx.export`` (TorchScript
exporter, opset 17) as a decoding step: ``input_ids [b, t]``, ``attention_mask [b, p + t]`` and
the past keys / values of each layer ``[b, 4, p, 16]`` in; ``logits`` and the present keys /
values out. No quality claim (the weights are random): each command below must exit 0, the
written model must load in stock onnxruntime and run on a feed with another batch size, past
length and step length than the calibration data, with finite outputs of the right shapes.

* ``cet-onnx quantize dec.onnx -o q.onnx --calib calib.npz --weight-bits 4 --block-size 32``
* ``cet-onnx quantize dec.onnx -o q.onnx --calib calib.npz --avg-bits 4``

Needs torch and transformers (benchmark-only dependencies). Writes ``tools/results/decoder_check.md``
and ``.json``.

    python tools/decoder_check.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tools" / "results"
LAYERS, HEADS, WIDTH, VOCAB = 2, 4, 64, 512
PAST = [f"past_{kind}{i}" for i in range(LAYERS) for kind in ("k", "v")]
COMMANDS = {"w4 blocks of 32": ["--weight-bits", "4", "--block-size", "32"], "avg-bits 4": ["--avg-bits", "4"]}


def export(path: Path) -> None:
    """The decoding step of a random-weight GPT-2 as ONNX (module docstring)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                     tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg).eval()

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache()
            for i in range(LAYERS):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            layers = out.past_key_values.layers
            return (out.logits, *[t for layer in layers for t in (layer.keys, layer.values)])

    b, t, p = 2, 3, 5
    args = (torch.randint(0, VOCAB, (b, t)), torch.ones(b, p + t, dtype=torch.long),
            *[torch.randn(b, HEADS, p, WIDTH // HEADS) for _ in PAST])
    present = [n.replace("past", "present") for n in PAST]
    torch.onnx.export(Step(), args, str(path), opset_version=17, dynamo=False,
                      input_names=["input_ids", "attention_mask", *PAST], output_names=["logits", *present],
                      dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "pt"},
                                    **{n: {0: "b", 2: "p"} for n in PAST}, "logits": {0: "b", 1: "t"},
                                    **{n: {0: "b", 2: "pt"} for n in present}})


def feed(rng: np.random.Generator, b: int, t: int, p: int) -> dict[str, np.ndarray]:
    return {"input_ids": rng.integers(0, VOCAB, (b, t)).astype(np.int64),
            "attention_mask": np.ones((b, p + t), np.int64),
            **{n: rng.normal(size=(b, HEADS, p, WIDTH // HEADS)).astype(np.float32) for n in PAST}}


def main() -> None:
    import onnxruntime as ort
    work = Path(tempfile.mkdtemp(prefix="decoder_check_"))
    model = work / "dec.onnx"
    export(model)
    rng = np.random.default_rng(0)
    np.savez(work / "calib.npz", **feed(rng, 64, 3, 5))
    test = feed(rng, 3, 1, 7)
    rows = []
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, test)
    for label, extra in COMMANDS.items():
        out = work / f"q_{label.replace(' ', '_')}.onnx"
        cmd = [sys.executable, "-c", "from cet_onnx.cli import main; main()", "quantize", str(model), "-o", str(out),
               "--calib", str(work / "calib.npz"), "--json", *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            raise SystemExit(f"{label}: exit {res.returncode}\n{res.stderr[-2000:]}")
        report = json.loads(res.stdout)
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, test)
        shapes_ok = [g.shape for g in got] == [r.shape for r in ref]
        finite = all(np.isfinite(g).all() for g in got)
        if not (shapes_ok and finite):
            raise SystemExit(f"{label}: outputs {[g.shape for g in got]} (expected {[r.shape for r in ref]}), "
                             f"finite {finite}")
        rows.append({"run": label, "command": "cet-onnx quantize dec.onnx -o q.onnx --calib calib.npz " + " ".join(extra),
                     "weights": len(report["weights"]), "compression": report["totals"]["weight_compression"],
                     "activation_mode": report["activation_mode"]["mode"],
                     "token_agreement": float(np.mean(got[0].argmax(-1) == ref[0].argmax(-1))),
                     "logits_sqnr_db": report["verification"]["outputs"][0]["sqnr_db"]})
    lines = ["| run | weights | × smaller (weights) | act mode | token agreement (b3, t1, p7) | logits SQNR (verify) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| `{r['command']}` | {r['weights']} | {r['compression']:.2f} | {r['activation_mode']} | "
              f"{100 * r['token_agreement']:.1f} % | {r['logits_sqnr_db']:.2f} dB |" for r in rows]
    md = ("# Decoder export: random-weight GPT-2 with KV cache\n\n`python tools/decoder_check.py`: both commands exit 0; "
          "the written models load in onnxruntime and run on a feed of another batch (3), step (1) and past length "
          "(7) than the calibration data, with finite outputs of the FP32 model's shapes. Random weights: no "
          "quality claim.\n\n" + "\n".join(lines) + "\n")
    (RESULTS / "decoder_check.md").write_text(md)
    (RESULTS / "decoder_check.json").write_text(json.dumps(rows, indent=1))
    print(md)


if __name__ == "__main__":
    main()
