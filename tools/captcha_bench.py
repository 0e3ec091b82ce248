"""A real CRNN + CTC captcha reader: cet-onnx against onnxruntime's ``quantize_static``, side by side.

The model ships in the ``captcha-whisperer`` wheel (``captcha_crnn.onnx``: 24 Convs, then recurrent cells
unrolled by the exporter into 80 Gemms over 20 time steps), fetched with ``pip download`` on first use into
``--cache`` (never committed); its own preprocessing and greedy CTC decoding (``recognizer.decode``) are
imported from the same wheel. Captchas are rendered here: 4–6 characters of its alphabet, each with its
own colour, tilt and offset, over a light background with noise lines and dots (seeded; 128 to calibrate,
``--eval`` others to score).

Each cet-onnx run is a fresh process with ``--no-cache`` (no probe results from an earlier run).
Scored: exact-string agreement of the decoded text with the float model's, file size, median latency at
batch 1 against the float model (interleaved), and the quantizer's wall time. Runs, default settings:

* cet-onnx ``quantize`` (W8A8: static activations with the default ``mse`` ranges, INT8 weights), and
  ``--avg-bits 4``; also W8A8 with the ``minmax`` and ``percentile`` activation range methods, labelled so;
* onnxruntime ``quantize_static`` (``tools/ort_quantize.py``: QDQ, per-channel, MinMax, after
  ``quant_pre_process``).

    python tools/captcha_bench.py [--cache ~/.cache/cet-onnx-bench] [--eval 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from bench_common import CET_VERSION, ROOT, cpu_name, interleaved_ms, model_file_bytes, session
from wheel_models import fetch_wheel_member

PACKAGE = "captcha-whisperer"
RUNS = {"cet-onnx (default: W8A8, mse ranges)": [], "cet-onnx --avg-bits 4": ["--avg-bits", "4"],
        # not defaults: how much the activation range method alone moves W8A8
        "cet-onnx --calib-method minmax (W8A8)": ["--calib-method", "minmax"],
        "cet-onnx --calib-method percentile (W8A8)": ["--calib-method", "percentile"]}


def fetch(cache: Path) -> tuple[Path, dict]:
    """The model, and the wheel's Python package unpacked beside it (for its preprocessing and decoding)."""
    model, info = fetch_wheel_member(PACKAGE, "captcha_whisperer-*.whl", "captcha_whisperer/models/captcha_crnn.onnx",
                                     "captcha_crnn.onnx", cache)
    pkg = cache / "captcha_pkg"
    if not (pkg / "captcha_whisperer" / "recognizer.py").is_file():
        wheel = cache / "wheels" / info["wheel"]
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith("captcha_whisperer/") and name.endswith(".py"):
                    z.extract(name, pkg)
    sys.path.insert(0, str(pkg))
    return model, info


def _font(size: int):
    from PIL import ImageFont

    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
                 "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def render(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``count`` captchas as the model's input ``[count, 3, 60, 160]`` (BGR, 0..255), and their texts."""
    from PIL import Image, ImageDraw

    from captcha_whisperer.constants import INPUT_HEIGHT, INPUT_WIDTH, LABELS
    from captcha_whisperer.preprocess import preprocess_array

    rng = np.random.default_rng(seed)
    alphabet = LABELS[:-1]
    images, texts = [], []
    for _ in range(count):
        text = "".join(rng.choice(list(alphabet), size=int(rng.integers(4, 7))))
        bg = tuple(int(v) for v in rng.integers(200, 256, 3))
        img = Image.new("RGB", (INPUT_WIDTH, INPUT_HEIGHT), bg)
        draw = ImageDraw.Draw(img)
        x = int(rng.integers(4, 14))
        for ch in text:
            size = int(rng.integers(26, 34))
            glyph = Image.new("RGBA", (size + 10, size + 14), (0, 0, 0, 0))
            colour = tuple(int(v) for v in rng.integers(0, 120, 3)) + (255,)
            ImageDraw.Draw(glyph).text((3, 2), ch, font=_font(size), fill=colour)
            glyph = glyph.rotate(float(rng.uniform(-20, 20)), expand=True)
            img.paste(glyph, (x, int(rng.integers(0, 14))), glyph)
            x += int(size * rng.uniform(0.55, 0.8))
        for _ in range(int(rng.integers(2, 5))):
            pts = [tuple(int(v) for v in (rng.integers(0, INPUT_WIDTH), rng.integers(0, INPUT_HEIGHT))) for _ in range(2)]
            draw.line(pts, fill=tuple(int(v) for v in rng.integers(50, 200, 3)), width=int(rng.integers(1, 3)))
        for _ in range(150):
            draw.point((int(rng.integers(0, INPUT_WIDTH)), int(rng.integers(0, INPUT_HEIGHT))),
                       fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        images.append(preprocess_array(np.asarray(img)[:, :, ::-1])[0])
        texts.append(text)
    return np.stack(images).astype(np.float32), texts


def read(path: Path, images: np.ndarray) -> list[str]:
    """Texts the model at ``path`` reads (the wheel's greedy CTC decoding), in batches of 32."""
    from captcha_whisperer.recognizer import decode

    sess = session(path)
    texts: list[str] = []
    for i in range(0, len(images), 32):
        texts += decode(sess.run(None, {"image": images[i:i + 32]})[0])[0]
    return texts


def _cet(model: Path, calib: Path, out: Path, args: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cet_onnx.cli", "quantize", str(model), "-o", str(out), "--calib",
                    str(calib), "-q", "--no-cache", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, json.loads(out.with_suffix(".report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/cet-onnx-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "tools/results/captcha")
    ap.add_argument("--table", type=Path, default=ROOT / "tools/results/captcha.md")
    ap.add_argument("--eval", type=int, default=300)
    args = ap.parse_args()
    model, info = fetch(args.cache)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    calib_x, _ = render(128, seed=1)
    eval_x, truth = render(args.eval, seed=2)
    calib = out / "calib.npz"
    np.savez(calib, image=calib_x)
    ref = read(model, eval_x)
    rows = []
    for name, extra in RUNS.items():
        path = out / f"{name.split('(')[0].strip().replace(' ', '_').replace('-', '')}{len(rows)}.onnx"
        wall, report = _cet(model, calib, path, extra)
        rows.append({"run": name, "path": path, "wall_s": wall,
                     "kernels": report.get("kernels", {}).get("ops", {})})
    import ort_quantize

    ort_path = out / "ort_static.onnx"
    t0 = time.perf_counter()
    ort_quantize.quantize(model, ort_path, calib)
    rows.append({"run": "onnxruntime quantize_static (QDQ, per-channel, MinMax)", "path": ort_path,
                 "wall_s": time.perf_counter() - t0})
    float_sess = session(model)
    feed = {"image": eval_x[:1]}
    for row in rows:
        texts = read(row["path"], eval_x)
        row["agreement"] = float(np.mean([a == b for a, b in zip(texts, ref)]))
        row["size_ratio"] = model_file_bytes(model) / model_file_bytes(row["path"])
        (fp32_ms, q_ms), _ = interleaved_ms([float_sess, session(row["path"])], feed)
        row["latency_ratio"] = q_ms / fp32_ms
    truth_acc = float(np.mean([a == b for a, b in zip(ref, truth)]))
    lines = ["# Captcha CRNN + CTC (`captcha-whisperer` wheel)", "",
             f"cet-onnx {CET_VERSION}, {cpu_name()}; `python tools/captcha_bench.py`; model {info['wheel']}, "
             f"sha256 {info['model_sha256'][:12]}…. {args.eval} rendered captchas (seed 2), calibration on 128 others "
             f"(seed 1). The float model reads {truth_acc:.1%} of them exactly right (rendered, not its training "
             "distribution); agreement below is exact-string agreement with the float model's reading.", "",
             "| run | exact-string agreement with FP32 | file × smaller | latency × FP32 (batch 1) | wall s |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['agreement']:.1%} | {r['size_ratio']:.2f} | {r['latency_ratio']:.2f} "
                     f"| {r['wall_s']:.1f} |")
    args.table.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
