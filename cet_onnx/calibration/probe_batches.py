"""The probe batches: the first ``--probe-size`` calibration samples, batched for the probes and output checks.

Transformer exports are calibrated with every sample padded to one length; in the MiniLM calibration
set of ``tools/minilm_data.py`` 55 % of the positions are padding, and every probe pass paid for them.
Where the model takes a 2-D ``attention_mask`` whose sequence axis is dynamic, the probe samples are
ordered longest first and each batch is cut after its last token (:func:`padding.trim`: the mask and
every input shaped like it), so that a batch of short sentences runs short.

The cut is kept only where it is exact for this model, as checked on the float model:

* every output has one shape beyond the batch axis in the longest and in the shortest batch (a
  token-level output has not: its batches could not be joined, nor compared position by position), and
* the outputs of the most-cut batch equal those of the same batch uncut, to :data:`RTOL` of their
  largest magnitude (padding that reaches the tokens, a convolution over the sequence say, would not).

Otherwise the probe batches are the samples in their order, uncut. Labels follow their samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cet_onnx.calibration import padding
from cet_onnx.calibration.data import ModelInput, batched
from cet_onnx.prepared import Prepared
from cet_onnx.runner import Feed, make_session

#: how closely the cut batch's float outputs must match the uncut batch's (relative to the largest magnitude)
RTOL = 1e-4


@dataclass
class ProbeBatches:
    """The probe batches, their labels, and how many ``[batch, sequence]`` positions they run of the padded ones."""

    batches: list[Feed]
    labels: np.ndarray | None
    positions: int | None = None     # run, with the batches cut (None: not cut)
    padded: int | None = None        # the same samples as calibrated
    why_uncut: str | None = None     # why a model with an attention mask keeps its padding

    @property
    def samples(self) -> int:
        return _count(self.batches)

    def report(self) -> dict | None:
        """For the report: the positions run and padded, or why the batches keep their padding."""
        if self.positions is not None:
            return {"cut_after_last_token": True, "positions": self.positions, "of": self.padded}
        return None if self.why_uncut is None else {"cut_after_last_token": False, "why": self.why_uncut}


def probe_batches(p: Prepared, n: int) -> ProbeBatches:
    """The first ``n`` calibration samples in batches of ``p.batch_size``, cut after their last token where exact."""
    samples = list(p.calib_samples[:n])
    plain = batched(samples, p.batch_size, inputs=p.inputs)
    uncut = ProbeBatches(plain, _labels(p, None, plain))
    names = _cuttable(p.inputs, samples)
    if not names:
        return uncut
    order = np.argsort(-padding.lengths(samples), kind="stable")
    ordered = batched([samples[i] for i in order], p.batch_size, inputs=p.inputs)
    cut = [padding.trim(b, names) for b in ordered]
    run, padded = _positions(cut), _positions(ordered)
    if run >= padded:
        return uncut
    why = _inexact(p, cut[0], ordered[-1], cut[-1])
    if why is not None:
        uncut.why_uncut = why
        return uncut
    return ProbeBatches(cut, _labels(p, order, cut), run, padded)


def _labels(p: Prepared, order: np.ndarray | None, batches: Sequence[Feed]) -> np.ndarray | None:
    """``p.labels`` of the samples in ``batches`` (taken in ``order``; a fixed batch may drop the last few)."""
    if p.labels is None:
        return None
    labels = p.labels if order is None else p.labels[order]
    return labels[:_count(batches)]


def _count(batches: Sequence[Feed]) -> int:
    """Samples in ``batches`` (along axis 0 of each batch's first input)."""
    return sum(int(np.shape(next(iter(b.values())))[0]) for b in batches)


def _cuttable(inputs: Sequence[ModelInput], samples: Sequence[Feed]) -> list[str]:
    """The inputs to cut along the sequence axis (the mask among them), or none: no 2-D attention mask of one
    width, a sequence axis the model fixes, or no sample shorter than the padded width."""
    widths = padding.lengths(samples)
    if widths is None:
        return []
    declared = {i.name: i for i in inputs}
    names = padding.sequence_inputs(samples[0])
    mask = padding.mask_input(samples[0])
    dynamic = [k for k in names if k in declared and declared[k].rank_known and len(declared[k].shape) >= 2
               and not isinstance(declared[k].shape[1], int)]
    if mask not in dynamic or widths.min() >= np.shape(samples[0][mask])[1]:
        return []
    return dynamic


def _positions(batches: Sequence[Feed]) -> int:
    """``[batch, sequence]`` positions of the attention masks of ``batches``."""
    return sum(int(np.size(b[padding.mask_input(b)])) for b in batches)


def _inexact(p: Prepared, longest_cut: Feed, shortest: Feed, shortest_cut: Feed) -> str | None:
    """Why cutting changes what the float model computes (module docstring), or None when it does not."""
    session = make_session(p.model, p.providers)
    names = [o.name for o in session.get_outputs()]
    first, last, full = (session.run(names, f) for f in (longest_cut, shortest_cut, shortest))
    for name, a, b, c in zip(names, first, last, full):
        if np.shape(a)[1:] != np.shape(b)[1:] or np.shape(b) != np.shape(c):
            return f"output '{name}' follows the sequence length"
        if np.issubdtype(np.asarray(c).dtype, np.floating):
            c64, b64 = np.asarray(c, np.float64), np.asarray(b, np.float64)
            scale = max(float(np.abs(c64).max(initial=0.0)), 1e-12)
            if not float(np.abs(b64 - c64).max(initial=0.0)) <= RTOL * scale:
                return f"output '{name}' changes when the padding is cut (the padding reaches the tokens)"
        elif not np.array_equal(b, c):
            return f"output '{name}' changes when the padding is cut (the padding reaches the tokens)"
    return None
