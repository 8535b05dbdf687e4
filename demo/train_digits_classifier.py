"""Train the demo's offline feature detector: a small CNN classifier of the 16x16 digits (deterministic).

    python -m demo.train_digits_classifier        # -> demo/digits-classifier.weights.pt, prints held-out accuracy

The data are the demo's own (scikit-learn's digits through dataset_tool.py, see demo/digits.py). A fixed seeded
split holds out a quarter of the images; training sees the rest with random one-pixel shifts. Everything runs on
one CPU thread with deterministic algorithms and explicit generators, so a rebuild reproduces the shipped file's
accuracy (bit-identical weights on the same CPU kind; other CPUs may differ in the last float bits).
The file is written in the weights-only format of ``formats.export``; ``fid.py --detector=PATH`` accepts it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import click
import torch
import torch.nn.functional as F

import dnnlib
from cli import common as cli

from demo.digits import REPO_ROOT, load_digits_dataset, make_digits_dataset, split_indices
from evaluation.digits_classifier import DigitsClassifier, accuracy
from formats.export import export_weights

DEFAULT_OUT = os.path.join(REPO_ROOT, 'demo', 'digits-classifier.weights.pt')
TEST_FRACTION = 0.25
SPLIT_SEED = 0
#: Written into the file explicitly, so the file documents the architecture whatever the class defaults become.
ARCHITECTURE = dict(img_resolution=16, channels=[16, 32], feature_dim=64, num_classes=10)
MAX_SHIFT = 1  # pixels; digits in the data are not perfectly centred, samples from a model even less


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image [B, C, H, W] by up to MAX_SHIFT pixels in each direction, filling with zeros."""
    padded = F.pad(images, [MAX_SHIFT] * 4)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, [images.shape[0], 2], generator=generator)
    h, w = images.shape[2:]
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def train(images: torch.Tensor, labels: torch.Tensor, epochs: int, batch: int, lr: float,
          seed: int) -> DigitsClassifier:
    """Adam with cosine decay on cross-entropy; ``images`` uint8 [N, 1, 16, 16], ``labels`` int64 [N]."""
    torch.manual_seed(seed)  # initial weights (this script's own process)
    net = DigitsClassifier(**ARCHITECTURE)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * -(-images.shape[0] // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for epoch in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        total = 0.0
        for start in range(0, images.shape[0], batch):
            idx = order[start:start + batch]
            loss = F.cross_entropy(net(random_shift(images[idx], generator)), labels[idx])
            net.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * idx.numel()
        if (epoch + 1) % 10 == 0 or epoch == 0:
            print(f'epoch {epoch + 1:3d}  loss {total / images.shape[0]:.4f}', flush=True)
    return net.eval().requires_grad_(False)


@click.command()
@click.option('--out', 'out_path', default=DEFAULT_OUT, show_default=True, metavar='PATH',
              help='Weights-only file to write')
@click.option('--workdir', default=None, metavar='DIR', help='Where the dataset ZIP is made  [default: a temp dir]')
@click.option('--epochs', default=40, show_default=True, type=click.IntRange(min=1))
@click.option('--batch', default=64, show_default=True, type=click.IntRange(min=1))
@click.option('--lr', default=2e-3, show_default=True, type=cli.float_range(min=0, min_open=True))
@click.option('--seed', default=0, show_default=True, type=int, help='Initial weights, shuffling and shifts')
def main(out_path: str, workdir: Optional[str], epochs: int, batch: int, lr: float, seed: int) -> None:
    """Train the digits classifier used as the demo's offline feature detector and report held-out accuracy."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    with tempfile.TemporaryDirectory() as scratch:
        dataset = make_digits_dataset(workdir or scratch)
        images, labels = load_digits_dataset(dataset)
    train_idx, test_idx = split_indices(images.shape[0], TEST_FRACTION, SPLIT_SEED)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    print(f'{train_idx.numel()} training and {test_idx.numel()} held-out images (split seed {SPLIT_SEED})')
    net = train(images[train_idx], labels[train_idx], epochs=epochs, batch=batch, lr=lr, seed=seed)
    train_acc = accuracy(net, images[train_idx], labels[train_idx])
    test_acc = accuracy(net, images[test_idx], labels[test_idx])
    print(f'accuracy: training {train_acc:.4f}, held-out {test_acc:.4f} ({test_idx.numel()} images)')
    metadata = dict(trained_by='demo.train_digits_classifier', epochs=epochs, batch=batch, lr=lr, seed=seed,
                    split_seed=SPLIT_SEED, test_fraction=TEST_FRACTION, num_train=int(train_idx.numel()),
                    num_test=int(test_idx.numel()), heldout_accuracy=round(test_acc, 4))
    export_weights(net, out_path, metadata=metadata)
    print(f'Wrote {out_path} ({os.path.getsize(out_path) / 1024:.0f} KiB)')


if __name__ == '__main__':
    main()
