"""The real thing: a `tensorboard` server on a loopback port serves what gradwatch wrote."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch

from .helpers import zoo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, **params) -> bytes:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}{query}", timeout=10) as r:
        return r.read()


@pytest.fixture
def served_run(tmp_path):
    model = zoo.mlp(nn.Sigmoid, depth=10, width=32)
    x, y = torch.randn(32, 32), torch.randint(0, 10, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradWatchWarning)
        with gradwatch.GradWatch(model, log_dir=tmp_path / "broken", every_n_steps=1) as gw:
            for _ in range(3):
                F.cross_entropy(model(x), y).backward()
                gw.step()
                model.zero_grad()
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                tags = json.loads(get(port, "/data/plugin/scalars/tags"))
                if tags.get("broken"):
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tensorboard did not serve the run: {server.stderr.read()[-2000:]!r}")
            time.sleep(0.5)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_tensorboard_serves_scalars_layout_text_and_image(served_run):
    port = served_run
    scalars = json.loads(get(port, "/data/plugin/scalars/tags"))["broken"]
    assert "gradwatch/global/grad_norm" in scalars
    assert "gradwatch_1_signal_ratio_log10/0" in scalars
    points = json.loads(
        get(port, "/data/plugin/scalars/scalars", run="broken", tag="gradwatch/global/grad_norm")
    )
    assert [p[1] for p in points] == [0, 1, 2]

    layout = json.loads(get(port, "/data/plugin/custom_scalars/layout"))
    titles = [c["title"] for c in layout["category"]]
    assert titles[0] == "gradwatch: overview"
    assert "gradwatch: saturation (fraction of flat activations)" in titles

    text_tags = json.loads(get(port, "/data/plugin/text/tags"))["broken"]
    assert text_tags == ["gradwatch/findings/text_summary"]  # no JSON in the Text tab
    text = json.loads(
        get(port, "/data/plugin/text/text", run="broken", tag="gradwatch/findings/text_summary")
    )
    assert "vanishing" in text[0]["text"] and "relu-family" in text[0]["text"]

    images = json.loads(get(port, "/data/plugin/images/tags"))["broken"]
    assert "gradwatch/gradient_flow" in images
    entries = json.loads(
        get(port, "/data/plugin/images/images", run="broken", tag="gradwatch/gradient_flow")
    )
    assert [e["step"] for e in entries] == [0, 2]  # the first logging step, then at close
    png = get(port, "/data/plugin/images/" + entries[-1]["query"].join(["individualImage?", ""]))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
