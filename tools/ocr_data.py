#!/usr/bin/env python
"""Labelled text-line images for ``ch_PP-OCRv4_rec_infer.onnx`` (the recognizer in PyPI's ``rapidocr-onnxruntime``).

The model is fetched at run time (``pip download --no-deps rapidocr-onnxruntime``) into the
cache folder ``tools/results/cache/`` (git-ignored) and is never committed.

What the wheel does (``rapidocr_onnxruntime/ch_ppocr_rec/text_recognize.py`` and ``utils.py``, v1.4.4):

* ``rec_img_shape: [3, 48, 320]``. ``resize_norm_img``: the batch width is
  ``int(48 * max_wh_ratio)`` with ``max_wh_ratio = max(320 / 48, widest crop's w / h)``; each crop
  (BGR uint8, from ``cv2``) is resized to height 48 and width ``ceil(48 * w / h)`` (capped at the
  batch width) with ``cv2.resize`` (bilinear), then ``x / 255``, ``- 0.5``, ``/ 0.5`` (so [-1, 1]),
  HWC → CHW, and padded on the right with zeros (after normalisation) up to the batch width.
* Output ``softmax_11.tmp_0`` ``[N, T, 6625]`` (T = width / 8). ``CTCLabelDecode``: the character
  list is the model's metadata ``character`` (6623 entries) with ``"blank"`` inserted at index 0
  and ``" "`` appended at the end; greedy decoding takes the argmax per time step, drops a step
  equal to the previous one, drops blanks (index 0), and joins the characters.

Every line here is rendered directly at height 48 and at most 320 px wide, so the wheel's resize
is the identity and the whole preprocessing is reproduced exactly without OpenCV; every sample is
padded to the fixed width 320 (fixed shape [3, 48, 320], as the wheel does for any batch of crops
no wider than 320 / 48).

Sources (deterministic, seeded): words of printable ASCII (no other characters; the recognizer's
dictionary covers all of them, space included) from text that Python ships — its ``LICENSE.txt``
and the standard library's module docstrings (see ``orientation_data.text_documents``). Documents
are split into two disjoint groups by a hash of their name (``orientation_data._split_of``):
calibration lines come only from the first group, evaluation lines only from the second, and an
evaluation line whose text also occurs among the calibration lines is dropped.

Rendering: PIL ``ImageDraw`` with DejaVu fonts (:data:`FONT_FILES`; sizes :data:`FONT_SIZES`),
near-black text on a near-white background (3 equal channels, so BGR/RGB order does not
matter), text vertically centred with a random left margin. The fonts and sizes were chosen where
the float model reads well (``python tools/ocr_data.py --check``: CER per font on 300 evaluation
lines); fonts where it was poor are listed in :data:`FONTS_EXCLUDED` with the measured CER.

Usage::

    python tools/ocr_data.py [--calib-n 128] [--eval-n 300] [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import numpy as np

import orientation_data  # text sources and their calib / eval split
from wheel_models import fetch_wheel_member

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_CACHE = ROOT / "tools" / "results" / "cache"
WHEEL_PACKAGE = "rapidocr-onnxruntime"
WHEEL_GLOB = "rapidocr_onnxruntime-*.whl"
MODEL_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
MODEL_FILE = "ch_PP-OCRv4_rec_infer.onnx"

HEIGHT, WIDTH = 48, 320
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
              "DejaVuSansCondensed.ttf", "DejaVuSerifCondensed.ttf", "DejaVuSerif-Italic.ttf",
              "DejaVuSans-Oblique.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf"]
#: fonts tried and left out because the float model reads them poorly (``--check`` with them added,
#: 300 evaluation lines over 11 fonts: every other font had CER <= 0.6 %)
FONTS_EXCLUDED: dict[str, str] = {"DejaVuSans-ExtraLight.ttf": "FP32 CER 1.9 %, exact lines 85 % (27 lines)"}
FONT_SIZES = (22, 30)   # inclusive range of font sizes in px (the line is 48 px high)
MAX_CHARS = 28          # CTC has T = 40 time steps at width 320; repeated letters need a blank between
DATA_VERSION = 2       # part of the cache file names: bump when the generation changes


# --------------------------------------------------------------------------- model

def ensure_model(cache_dir: Path = DEFAULT_CACHE) -> tuple[Path, dict]:
    """The wheel's ``ch_PP-OCRv4_rec_infer.onnx`` in ``cache_dir`` (downloaded with pip once)."""
    return fetch_wheel_member(WHEEL_PACKAGE, WHEEL_GLOB, MODEL_MEMBER, MODEL_FILE, cache_dir)


def character_list(model_path: Path) -> list[str]:
    """The wheel's CTC alphabet: ``["blank"] + metadata 'character' lines + [" "]``."""
    import onnx
    m = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    if "character" not in meta:
        raise SystemExit(f"{model_path}: no 'character' metadata")
    return ["blank"] + meta["character"].splitlines() + [" "]


def ctc_greedy_decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    """``CTCLabelDecode`` of the wheel: argmax per step, drop repeats, drop blank (0), join.

    Then leading / trailing spaces are stripped (the references never have any; the float model
    often emits a space at the right edge of a line).
    """
    idx = probs.argmax(axis=2)
    out = []
    for row in idx:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(chars[i] for i in row[keep]).strip())
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(pred: list[str], ref: list[str]) -> float:
    """Character error rate: total edit distance / total reference characters."""
    return sum(edit_distance(p, r) for p, r in zip(pred, ref)) / max(1, sum(len(r) for r in ref))


# --------------------------------------------------------------------------- lines

_PUNCT_RUN = re.compile(r"([^A-Za-z0-9])\1")


def _words(text: str) -> list[str]:
    """Whitespace-separated words of printable, non-space ASCII without a doubled punctuation mark.

    Words such as ``__init__``, ``-->`` or ``...`` are left out: greedy CTC at 8 px per time step
    merges a run of touching identical glyphs (``__`` → ``_``) even in the float model.
    """
    return [w for w in text.split() if all(33 <= ord(c) < 127 for c in w) and not _PUNCT_RUN.search(w)]


def _font(name: str, size: int):
    from PIL import ImageFont
    # basic layout: no ligatures (raqm would draw "fi" as one glyph) and the same result with or without raqm
    return ImageFont.truetype(str(FONT_DIR / name), size, layout_engine=ImageFont.Layout.BASIC)


def render_line(text: str, font_name: str, size: int, rng: np.random.Generator) -> np.ndarray | None:
    """Grey uint8 image 48 x w (w <= 320) with ``text``; None when it does not fit."""
    from PIL import Image, ImageDraw
    font = _font(font_name, size)
    left, top, right, bottom = font.getbbox(text)
    margin = int(rng.integers(2, 9))
    w = right - left + 2 * margin
    ascent, descent = font.getmetrics()
    if w > WIDTH or ascent + descent > HEIGHT:
        return None
    bg = int(rng.integers(215, 256))
    fg = int(rng.integers(0, 60))
    img = Image.new("L", (w, HEIGHT), bg)
    y = (HEIGHT - (ascent + descent)) // 2 + int(rng.integers(-2, 3))
    ImageDraw.Draw(img).text((margin - left, y), text, fill=fg, font=font)
    return np.asarray(img)


def preprocess(grey: np.ndarray) -> np.ndarray:
    """The wheel's ``resize_norm_img`` for a 48-high crop no wider than 320: normalise, CHW, pad to 320."""
    h, w = grey.shape
    assert h == HEIGHT and w <= WIDTH
    x = grey.astype(np.float32)[None].repeat(3, axis=0) / 255
    x -= 0.5
    x /= 0.5
    out = np.zeros((3, HEIGHT, WIDTH), np.float32)
    out[:, :, :w] = x
    return out


def make_lines(split: str, n: int, seed: int, fonts: list[str], exclude: set[str] = frozenset()
               ) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """``n`` samples: (x [n,3,48,320], texts, font names, source document names)."""
    rng = np.random.default_rng([seed, 0 if split == "calib" else 1, 17])
    docs = orientation_data.text_documents()
    names = [d for d in sorted(docs) if orientation_data._split_of(d) == split]
    words = {d: _words(docs[d]) for d in names}
    names = [d for d in names if len(words[d]) >= 8]
    weights = np.array([len(words[d]) for d in names], float)
    weights /= weights.sum()
    xs, texts, used_fonts, srcs, seen = [], [], [], [], set()
    tries = 0
    while len(xs) < n:
        tries += 1
        if tries > 50 * n:
            raise SystemExit(f"could not make {n} {split} lines")
        d = names[rng.choice(len(names), p=weights)]
        ws = words[d]
        start = int(rng.integers(0, len(ws)))
        target = int(rng.integers(6, MAX_CHARS + 1))
        line = ws[start]
        for w in ws[start + 1:]:
            if len(line) + 1 + len(w) > target:
                break
            line += " " + w
        line = line[:MAX_CHARS]
        if len(line) < 3 or line in seen or line in exclude:
            continue
        font = fonts[int(rng.integers(len(fonts)))]
        size = int(rng.integers(FONT_SIZES[0], FONT_SIZES[1] + 1))
        img = render_line(line, font, size, rng)
        while img is None and " " in line:   # too wide: drop words from the end
            line = line.rsplit(" ", 1)[0]
            img = render_line(line, font, size, rng)
        if img is None or line in seen or line in exclude:
            continue
        seen.add(line)
        xs.append(preprocess(img))
        texts.append(line)
        used_fonts.append(font)
        srcs.append(d)
    return np.stack(xs), texts, used_fonts, srcs


def build(cache_dir: Path = DEFAULT_CACHE, calib_n: int = 128, eval_n: int = 300, seed: int = 0,
          fonts: list[str] | None = None, force: bool = False) -> dict:
    """Write calib / eval ``.npz`` (keyed by the model input name) + texts ``.json``; return their paths."""
    import onnx
    cache_dir = Path(cache_dir)
    model_path, model_info = ensure_model(cache_dir)
    model = onnx.load(str(model_path), load_external_data=False)
    input_name = model.graph.input[0].name
    fonts = [f for f in (fonts or FONT_FILES) if (FONT_DIR / f).is_file()]
    if not fonts:
        raise SystemExit(f"no DejaVu fonts in {FONT_DIR} (apt-get install fonts-dejavu-core)")
    key = hashlib.sha256(json.dumps([DATA_VERSION, fonts, FONT_SIZES, MAX_CHARS, HEIGHT, WIDTH]).encode()).hexdigest()[:8]
    tag = f"n{calib_n}-{eval_n}_s{seed}_{key}"
    paths = {s: {"data": cache_dir / f"ocr_{s}_{tag}.npz", "texts": cache_dir / f"ocr_{s}_{tag}_texts.json"}
             for s in ("calib", "eval")}
    if force or not all(p.is_file() for d in paths.values() for p in d.values()):
        x, texts, fs, srcs = make_lines("calib", calib_n, seed, fonts)
        np.savez(paths["calib"]["data"], **{input_name: x})
        paths["calib"]["texts"].write_text(json.dumps({"texts": texts, "fonts": fs, "sources": srcs}))
        x, texts, fs2, srcs2 = make_lines("eval", eval_n, seed, fonts, exclude=set(texts))
        np.savez(paths["eval"]["data"], **{input_name: x})
        paths["eval"]["texts"].write_text(json.dumps({"texts": texts, "fonts": fs2, "sources": srcs2}))
        assert not set(srcs) & set(srcs2), "calibration and evaluation share a source document"
    return {"model": model_path, "model_info": model_info, "input_name": input_name, "fonts": fonts,
            "font_sizes": list(FONT_SIZES), "max_chars": MAX_CHARS,
            **{f"{s}_{k}": v for s, d in paths.items() for k, v in d.items()}}


def check(info: dict, batch: int = 16) -> dict:
    """FP32 CER and exact-line accuracy on the evaluation lines, overall and per font."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(info["model"]), so, providers=["CPUExecutionProvider"])
    x = np.load(info["eval_data"])[info["input_name"]]
    meta = json.loads(Path(info["eval_texts"]).read_text())
    chars = character_list(info["model"])
    pred = []
    for i in range(0, len(x), batch):
        pred += ctc_greedy_decode(sess.run(None, {info["input_name"]: x[i:i + batch]})[0], chars)
    ref, fonts = meta["texts"], meta["fonts"]
    res = {"samples": len(ref), "cer": cer(pred, ref), "exact": float(np.mean([p == r for p, r in zip(pred, ref)])),
           "cer_ignoring_spaces": cer([p.replace(" ", "") for p in pred], [r.replace(" ", "") for r in ref]),
           "by_font": {}}
    for f in sorted(set(fonts)):
        m = [i for i, g in enumerate(fonts) if g == f]
        res["by_font"][f] = {"n": len(m), "cer": cer([pred[i] for i in m], [ref[i] for i in m]),
                             "exact": float(np.mean([pred[i] == ref[i] for i in m]))}
    res["errors"] = [{"ref": r, "pred": p, "font": f} for p, r, f in zip(pred, ref, fonts) if p != r][:40]
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fonts", default=None, help="comma-separated DejaVu font files (default: FONT_FILES)")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--check", action="store_true", help="FP32 CER on the evaluation lines, per font")
    args = ap.parse_args(argv)
    info = build(args.cache_dir, args.calib_n, args.eval_n, args.seed,
                 args.fonts.split(",") if args.fonts else None, args.force)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in info.items()}, indent=2))
    if args.check:
        print(json.dumps(check(info), indent=2))


if __name__ == "__main__":
    main()
