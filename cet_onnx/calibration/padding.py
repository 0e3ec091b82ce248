"""Which positions of a token-level output hold real tokens: where the ``attention_mask`` input is not 0.

Transformer exports take an ``attention_mask`` ``[batch, sequence]`` (1: a token, 0: padding).
An output ``[batch, sequence, ...]`` (``last_hidden_state``, per-token logits) has vectors at
the padded positions too; nothing downstream reads them, but a mean over positions counts
them: in the MiniLM calibration set of ``tools/minilm_data.py`` 55 % of the positions are
padding. The probes' loss and the verification metrics count only the real positions.

Pure functions over arrays.
"""

from __future__ import annotations

from typing import Collection, Iterable, Mapping, Sequence

import numpy as np

#: input names read as an attention mask (the Hugging Face convention)
MASK_INPUTS = ("attention_mask",)


def mask_input(names: Iterable[str]) -> str | None:
    """The model input that is an attention mask, if any."""
    return next((n for n in names if n in MASK_INPUTS), None)


def batch_mask(batches: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray | None:
    """The attention mask over all ``batches`` (concatenated), or None when they have none or it is not 2-D."""
    name = mask_input(batches[0]) if batches else None
    if name is None or any(np.ndim(b[name]) != 2 for b in batches):
        return None
    widths = {np.shape(b[name])[1] for b in batches}
    return np.concatenate([np.asarray(b[name]) for b in batches]) if len(widths) == 1 else None


def real_positions(mask: np.ndarray | None, output: np.ndarray) -> np.ndarray | None:
    """Boolean ``[batch, sequence]``: the positions of ``output`` that hold tokens.

    None (count every position) unless ``output`` is token-level for this mask: at least 3-D,
    its first two axes the mask's shape, and at least one position a token.
    """
    if mask is None or np.ndim(output) < 3 or tuple(np.shape(output)[:2]) != mask.shape:
        return None
    real = np.asarray(mask) != 0
    return real if real.any() else None


def select(x: np.ndarray | None, positions: np.ndarray | None) -> np.ndarray | None:
    """``x`` at the real ``positions`` (``[count, ...]``); ``x`` itself when there is no mask or shapes differ."""
    if x is None or positions is None or tuple(np.shape(x)[:2]) != positions.shape:
        return x
    return np.asarray(x)[positions]


def counted(positions: np.ndarray | None) -> dict[str, int | str] | None:
    """For the report: how many positions a token-level metric counted, of how many (None: every position)."""
    if positions is None:
        return None
    return {"mask": MASK_INPUTS[0], "counted": int(positions.sum()), "of": int(positions.size)}


def lengths(samples: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray | None:
    """Per sample, the position after its last token (the width its row needs), or None unless every
    sample carries a 2-D attention mask of one width."""
    name = mask_input(samples[0]) if samples else None
    if name is None or any(np.ndim(s[name]) != 2 for s in samples) or \
            len({np.shape(s[name])[1] for s in samples}) != 1:
        return None
    return np.array([_width(np.asarray(s[name])) for s in samples])


def _width(mask: np.ndarray) -> int:
    """Columns up to the last one any row of ``mask`` has a token in (at least 1)."""
    used = np.flatnonzero((mask != 0).any(axis=0))
    return int(used[-1]) + 1 if used.size else 1


def _mask_2d(feed: Mapping[str, np.ndarray]) -> str | None:
    """The input of ``feed`` that is a 2-D ``[batch, sequence]`` attention mask, if any."""
    name = mask_input(feed)
    return name if name is not None and np.ndim(feed[name]) == 2 else None


def trim(feed: Mapping[str, np.ndarray], names: Collection[str]) -> dict[str, np.ndarray]:
    """``feed`` without the trailing positions that are padding in every row: the attention mask and each
    input in ``names`` (inputs shaped ``[batch, sequence, ...]`` like the mask) cut after the last token."""
    mask = _mask_2d(feed)
    if mask is None:
        return dict(feed)
    width = _width(np.asarray(feed[mask]))
    cut = set(names) | {mask}
    return {k: (np.ascontiguousarray(v[:, :width]) if k in cut else v) for k, v in feed.items()}


def sequence_inputs(feed: Mapping[str, np.ndarray]) -> list[str]:
    """Inputs of ``feed`` whose first two axes are the attention mask's ``[batch, sequence]`` (the mask included)."""
    mask = _mask_2d(feed)
    if mask is None:
        return []
    return [k for k, v in feed.items() if np.ndim(v) >= 2 and tuple(np.shape(v)[:2]) == np.shape(feed[mask])]


def token_mask(feed: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Where a batch with a 2-D attention mask holds tokens (boolean ``[batch, sequence]``), or None."""
    name = _mask_2d(feed)
    return None if name is None else np.asarray(feed[name]) != 0


def at_tokens(x: np.ndarray, tokens: np.ndarray | None) -> np.ndarray:
    """``x`` at the real tokens only, where it is laid out by position: ``[batch, sequence, ...]`` or
    flattened to ``[batch · sequence, ...]``; ``x`` itself otherwise (or without tokens)."""
    if tokens is None or not tokens.any() or np.ndim(x) < 2:
        return x
    if np.shape(x)[:2] == tokens.shape:
        return x[tokens]
    if np.shape(x)[0] == tokens.size and np.ndim(x) == 2:
        return x[tokens.reshape(-1)]
    return x
