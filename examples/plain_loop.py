"""gradwatch around a plain PyTorch loop: a broken deep net and its remedied version.

python examples/plain_loop.py                 # 20 layers, 200 steps
python examples/plain_loop.py --steps 20 --depth 6 --logdir runs/example
"""

import argparse

import torch
import torch.nn.functional as F

import gradwatch
from gradwatch.cli.demo import broken_mlp, remedied_mlp, synthetic_data


def train(model, x, y, steps, log_dir=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # Measure every 10th optimizer step (and step 0); findings also arrive as GradWatchWarning.
    with gradwatch.GradWatch(model, log_dir=log_dir, every_n_steps=10) as gw:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (128,))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            gw.step()  # after backward (after scaler.unscale_ under AMP), before zero_grad
            optimizer.step()
            optimizer.zero_grad()
    print(f"final loss {loss.item():.3f}")
    return gw.report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--logdir", default=None, help="write TensorBoard runs here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x, y = synthetic_data()
    reports = {}
    for name, make in (("broken", broken_mlp), ("remedied", remedied_mlp)):
        print(f"== {name}: {args.depth} x (Linear, {'Sigmoid' if name == 'broken' else 'ReLU'})")
        log_dir = f"{args.logdir}/{name}" if args.logdir else None
        reports[name] = train(make(args.depth, args.width), x, y, args.steps, log_dir)
        print(reports[name], end="\n\n")
    return reports


if __name__ == "__main__":
    main()
