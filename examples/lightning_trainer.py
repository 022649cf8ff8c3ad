"""gradwatch in a Lightning Trainer: a tanh classifier fed raw, unscaled features.

The features are in the thousands (think salaries or pixel sums), so the first tanh layer sits in
its flat tails and passes almost no gradient back. gradwatch names the layer and the fix;
``--standardize`` applies it.

python examples/lightning_trainer.py                  # TensorBoard logs in runs/lightning
python examples/lightning_trainer.py --standardize
python examples/lightning_trainer.py --steps 40 --logdir none
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise SystemExit(
            'this example needs PyTorch Lightning: pip install -e ".[lightning]" '
            "(or pip install lightning)"
        ) from None

from gradwatch import GradWatchCallback


def raw_features(n=4096, seed=0):
    """Three classes told apart by two features that live around 3000 +- 1000."""
    g = torch.Generator().manual_seed(seed)
    x = 3000 + 1000 * torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 3000).long() + (x[:, 1] > 3000).long()
    return x, y


class Classifier(pl.LightningModule):
    def __init__(self, lr=0.05):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)
        )
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--standardize", action="store_true", help="apply the remedy")
    parser.add_argument("--logdir", default="runs/lightning", help="'none' for no logger")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y = raw_features()
    if args.standardize:
        x = (x - x.mean(0)) / x.std(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)

    watch = GradWatchCallback(every_n_steps=25)
    logger = False
    if args.logdir != "none":
        logger = pl.loggers.TensorBoardLogger(
            args.logdir, name="standardized" if args.standardize else "raw"
        )
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[watch],
        logger=logger,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(), loader)
    print(watch.report)
    print(f"final loss {trainer.callback_metrics['loss'].item():.3f}")
    return watch.report, trainer.callback_metrics["loss"].item()


if __name__ == "__main__":
    main()
