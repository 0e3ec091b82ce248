#!/usr/bin/env python3
"""Train the bundled example model (small ResNet-style CNN on sklearn digits) and export it to ONNX.

Dependencies (not needed by cet_onnx itself, only to regenerate models/digits/):

    pip install torch==2.13.0 scikit-learn onnx onnxruntime numpy

(onnxscript is not needed: the model is exported with the TorchScript exporter, dynamo=False.)

Usage:

    python tools/train_digits_model.py --out models/digits --epochs 30 --seed 0

Outputs in --out:
    model.onnx           FP32, opset 17, input "image" [batch,1,8,8] float32, output "logits" [batch,10]
    calib.npz            {"image": float32 [256,1,8,8]}  -- drawn from the TRAINING split
    calib_labels.npy     int64 [256]
    eval.npz             {"image": float32 [N,1,8,8]}    -- the held-out test split
    eval_labels.npy      int64 [N]
    README.md            description, command, measured FP32 accuracy, preprocessing constants

The data is scikit-learn's bundled ``load_digits`` (1797 8x8 grayscale images, 16 grey
levels, 10 classes); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
import warnings
from collections import Counter

import numpy as np

N_TEST = 500
N_CALIB = 256
OPSET = 17


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def load_data(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    y = digits.target.astype(np.int64)

    rng = np.random.RandomState(seed)
    perm = rng.permutation(len(x))
    test_idx = np.sort(perm[:N_TEST])
    train_idx = np.sort(perm[N_TEST:])

    x_train, y_train = x[train_idx], y[train_idx]
    x_test, y_test = x[test_idx], y[test_idx]

    # Scalar normalisation constants from the training split only.
    mean = float(x_train.mean())
    std = float(x_train.std())

    def norm(a):
        return ((a - mean) / std).astype(np.float32)[:, None, :, :]

    return norm(x_train), y_train, norm(x_test), y_test, mean, std


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------
def build_model(width: int = 32):
    import torch.nn as nn

    def conv_bn(cin, cout, k=3, stride=1, groups=1):
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        )

    class BasicBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cb1 = conv_bn(c, c)
            self.relu1 = nn.ReLU()
            self.cb2 = conv_bn(c, c)
            self.relu2 = nn.ReLU()

        def forward(self, x):
            out = self.relu1(self.cb1(x))
            out = self.cb2(out)
            return self.relu2(out + x)

    class DepthwiseSeparable(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.dw = conv_bn(cin, cin, k=3, groups=cin)
            self.relu1 = nn.ReLU()
            self.pw = conv_bn(cin, cout, k=1)
            self.relu2 = nn.ReLU()

        def forward(self, x):
            return self.relu2(self.pw(self.relu1(self.dw(x))))

    class DigitsResNet(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.stem = conv_bn(1, w)
            self.stem_relu = nn.ReLU()
            self.block1 = BasicBlock(w)
            self.block2 = BasicBlock(w)
            self.down = conv_bn(w, 2 * w, stride=2)  # 8x8 -> 4x4
            self.down_relu = nn.ReLU()
            self.dwsep = DepthwiseSeparable(2 * w, 4 * w)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4 * w, 10)

        def forward(self, x):
            x = self.stem_relu(self.stem(x))
            x = self.block2(self.block1(x))
            x = self.down_relu(self.down(x))
            x = self.dwsep(x)
            x = self.pool(x)
            x = x.flatten(1)
            return self.fc(x)

    return DigitsResNet(width)


def fold_batchnorm(model):
    """Return an eval-mode copy with every Conv->BN pair folded into the Conv (BN -> Identity)."""
    import torch
    import torch.nn as nn

    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, nn.Sequential) and len(module) == 2 and \
                isinstance(module[0], nn.Conv2d) and isinstance(module[1], nn.BatchNorm2d):
            conv, bn = module[0], module[1]
            with torch.no_grad():
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                w = conv.weight * scale.reshape(-1, 1, 1, 1)
                b0 = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                b = (b0 - bn.running_mean) * scale + bn.bias
                new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                stride=conv.stride, padding=conv.padding,
                                dilation=conv.dilation, groups=conv.groups, bias=True)
                new.weight.copy_(w)
                new.bias.copy_(b)
            module[0] = new.eval()
            module[1] = nn.Identity()
    return model


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def set_determinism(seed: int):
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # tiny model: 1 thread is fast and makes results thread-count independent
    try:
        torch.use_deterministic_algorithms(True)
    except Exception:  # pragma: no cover
        pass
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def random_shift(xb, gen, max_shift=1):
    """Translate each image by up to +-max_shift pixels, filling with the background value."""
    import torch

    n = xb.shape[0]
    k = 2 * max_shift + 1
    pad = torch.nn.functional.pad(xb, (max_shift,) * 4, value=float(xb.min()))
    # All k*k shifted crops: [k*k, n, 1, 8, 8]; pick one per sample.
    crops = torch.stack([pad[:, :, dy:dy + 8, dx:dx + 8] for dy in range(k) for dx in range(k)])
    choice = torch.randint(0, k * k, (n,), generator=gen)
    return crops[choice, torch.arange(n)]


def train(model, x_train, y_train, epochs: int, seed: int, batch_size: int = 64):
    import torch
    import torch.nn as nn

    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(xt) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, epochs=epochs,
                                                steps_per_epoch=steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = random_shift(xt[idx], gen), yt[idx]
            opt.zero_grad()
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        if epoch == 0 or (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            print(f"epoch {epoch + 1:3d}/{epochs}  loss {loss_sum / total:.4f}  "
                  f"train acc {correct / total:.4f}")
    model.eval()
    return model


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------
def export_onnx(model, path: str):
    import onnx
    import torch

    dummy = torch.zeros(2, 1, 8, 8)
    # The legacy TorchScript exporter (dynamo=False, deprecated but present in torch 2.13)
    # emits opset 17 directly and maps AdaptiveAvgPool2d(1) to GlobalAveragePool. The dynamo
    # exporter needs opset >= 18 and emits ReduceMean, so it is deliberately not used here.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based export"
            torch.onnx.export(
                model, (dummy,), path,
                input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET, do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
                dynamo=False,
            )
    except TypeError as exc:
        raise SystemExit(f"torch.onnx.export(dynamo=False) unavailable ({exc}); "
                         "use torch==2.13.0 as documented at the top of this script")
    exporter = "TorchScript exporter, dynamo=False"

    # Re-save to guarantee one self-contained file (weights as plain initializers).
    onnx.save(onnx.load(path), path, save_as_external_data=False)
    return exporter


def check_graph(path: str):
    import onnx

    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    opset = {o.domain: o.version for o in m.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == OPSET, opset
    ops = Counter(n.op_type for n in m.graph.node)
    forbidden = {"BatchNormalization", "Dropout", "Identity"} & set(ops)
    assert not forbidden, f"unexpected ops in graph: {forbidden}"
    for t in m.graph.initializer:
        assert t.data_location != onnx.TensorProto.EXTERNAL, t.name
    assert [i.name for i in m.graph.input] == ["image"], [i.name for i in m.graph.input]
    assert [o.name for o in m.graph.output] == ["logits"], [o.name for o in m.graph.output]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8], dims
    odims = m.graph.output[0].type.tensor_type.shape.dim
    assert odims[0].dim_param and odims[1].dim_value == 10, odims
    n_params = int(sum(np.prod(t.dims) for t in m.graph.initializer))
    return ops, n_params


# --------------------------------------------------------------------------------------
def write_readme(out, *, command, acc, n_params, size, ops, mean, std, n_train, n_eval,
                 exporter, seed, epochs):
    op_lines = "\n".join(f"| {k} | {v} |" for k, v in sorted(ops.items()))
    text = f"""# digits — bundled example model

A small ResNet-style CNN classifying scikit-learn's bundled `load_digits` images
(8x8 grayscale handwritten digits, 10 classes). It is the example model used to
exercise cet-onnx: it contains the structures a quantizer meets in real CNNs
(3x3 convs with folded BatchNorm, residual `Add`s, a stride-2 conv, a depthwise
conv (`group` = channels) followed by a 1x1 pointwise conv, `GlobalAveragePool`,
`Flatten`, and a final `Gemm`).

## How it was made

```
{command}
```

Trained with PyTorch (AdamW + one-cycle LR, label smoothing 0.05, random +-1 pixel
shifts, seed {seed}, {epochs} epochs, deterministic on CPU), BatchNorm folded into the
convolutions in eval mode, exported with `torch.onnx.export` ({exporter}), opset {OPSET}.
The script verifies the ONNX model against PyTorch with onnxruntime (max abs diff
of logits < 1e-4) before writing this file.

- Parameters: {n_params:,} (all stored as ONNX initializers, no external data)
- File size: {size:,} bytes
- **FP32 accuracy on `eval.npz` (onnxruntime): {acc * 100:.2f}%** ({round(acc * n_eval)}/{n_eval})

Graph ops:

| op | count |
|----|-------|
{op_lines}

## Interface

- input `image`: float32 `[batch, 1, 8, 8]` (NCHW, dynamic batch)
- output `logits`: float32 `[batch, 10]` (un-normalised class scores; argmax = digit)

## Data files

| file | content |
|------|---------|
| `calib.npz` | key `image`: float32 `[{N_CALIB}, 1, 8, 8]`, {N_CALIB} samples from the **training** split (calibration set) |
| `calib_labels.npy` | int64 `[{N_CALIB}]`, labels aligned with `calib.npz` |
| `eval.npz` | key `image`: float32 `[{n_eval}, 1, 8, 8]`, the **held-out** test split (never used for training) |
| `eval_labels.npy` | int64 `[{n_eval}]`, labels aligned with `eval.npz` |

Split: a seeded permutation of the 1797 images; the first {n_eval} form the test split,
the remaining {n_train} the training split.

## Preprocessing

The arrays are already preprocessed; to prepare a new image `raw` (uint 0..16 as in
`load_digits().images`):

```
x = raw / 16.0                      # -> [0, 1]
x = (x - {mean:.6f}) / {std:.6f}    # scalar mean / std of the training split
x = x.reshape(1, 1, 8, 8).astype(np.float32)
```
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/digits")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    t0 = time.time()
    set_determinism(args.seed)
    os.makedirs(args.out, exist_ok=True)

    x_train, y_train, x_test, y_test, mean, std = load_data(args.seed)
    print(f"train {x_train.shape}, test {x_test.shape}, mean {mean:.6f}, std {std:.6f}")

    model = build_model()
    n_torch = sum(p.numel() for p in model.parameters())
    print(f"torch parameters (incl. BN): {n_torch}")
    train(model, x_train, y_train, args.epochs, args.seed)

    folded = fold_batchnorm(model)
    with torch.no_grad():
        ref_unfolded = model(torch.from_numpy(x_test)).numpy()
        ref = folded(torch.from_numpy(x_test)).numpy()
    print(f"BN folding max abs diff: {np.abs(ref - ref_unfolded).max():.2e}")
    torch_acc = float((ref.argmax(1) == y_test).mean())
    print(f"PyTorch test accuracy: {torch_acc:.4f}")

    model_path = os.path.join(args.out, "model.onnx")
    exporter = export_onnx(folded, model_path)
    ops, n_params = check_graph(model_path)
    size = os.path.getsize(model_path)

    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    onnx_logits = sess.run(["logits"], {"image": x_test})[0]
    diff = float(np.abs(onnx_logits - ref).max())
    print(f"onnxruntime vs PyTorch max abs diff: {diff:.2e}")
    assert diff < 1e-4, diff
    for bs in (1, 7):  # dynamic batch axis works
        out_bs = sess.run(["logits"], {"image": x_test[:bs]})[0]
        assert out_bs.shape == (bs, 10) and np.abs(out_bs - ref[:bs]).max() < 1e-4
    acc = float((onnx_logits.argmax(1) == y_test).mean())
    print(f"ONNX FP32 accuracy on eval ({len(y_test)} held-out samples): {acc:.4f}")

    # Calibration subset: deterministic draw from the training split.
    rng = np.random.RandomState(args.seed + 1)
    calib_idx = np.sort(rng.choice(len(x_train), N_CALIB, replace=False))
    np.savez(os.path.join(args.out, "calib.npz"), image=x_train[calib_idx].astype(np.float32))
    np.save(os.path.join(args.out, "calib_labels.npy"), y_train[calib_idx].astype(np.int64))
    np.savez(os.path.join(args.out, "eval.npz"), image=x_test.astype(np.float32))
    np.save(os.path.join(args.out, "eval_labels.npy"), y_test.astype(np.int64))

    cmd = "python tools/train_digits_model.py"
    cmd += f" --out {args.out} --epochs {args.epochs} --seed {args.seed}"
    write_readme(args.out, command=cmd, acc=acc, n_params=n_params, size=size, ops=ops,
                 mean=mean, std=std, n_train=len(y_train), n_eval=len(y_test),
                 exporter=exporter, seed=args.seed, epochs=args.epochs)

    print(f"ONNX parameters: {n_params}, file size {size} bytes")
    print("ops:", dict(sorted(ops.items())))
    print(f"done in {time.time() - t0:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
