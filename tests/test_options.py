"""The options GradWatch and the Lightning callback share: declared and checked once."""

import dataclasses
import pickle

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.options import Options


def test_options_are_checked_when_made_and_cannot_change_after():
    assert Options().thresholds == gradwatch.Thresholds()
    with pytest.raises(TypeError, match="include must be a list of glob patterns"):
        Options(include="encoder.*")
    with pytest.raises(ValueError, match=r"nan_strategy must be one of \('warn', 'raise'\)"):
        Options(nan_strategy="ignore")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Options().warn = False


def test_a_watcher_reads_its_options_and_pickles_them():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    chosen = Options(every_n_steps=7, weight_norm_every=3, sync_dist=False)
    with gradwatch.GradWatch(model, **chosen.as_kwargs()) as gw:
        assert gw.options == chosen
        assert (gw.every_n_steps, gw.weight_norm_every, gw.sync_dist) == (7, 3, False)
        copy = pickle.loads(pickle.dumps(gw))
    assert copy.options == chosen


def test_a_watcher_pickled_before_options_existed_still_loads():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    with gradwatch.GradWatch(model, every_n_steps=1) as gw:
        model(torch.randn(4, 2)).sum().backward()
        gw.step()
        old = {  # what __getstate__ returned then: a dict of four options
            "state": gw.state_dict(),
            "options": {
                "every_n_steps": 5,
                "thresholds": gradwatch.Thresholds(),
                "sync_dist": True,
                "nan_strategy": "warn",
            },
        }
    copy = gradwatch.GradWatch.__new__(gradwatch.GradWatch)
    copy.__setstate__(old)
    assert copy.every_n_steps == 5 and copy.weight_norm_every == 10
    assert copy.current_step == 1 and copy.report.step == 0


def test_the_callback_takes_the_same_options():
    pytest.importorskip("lightning")
    from gradwatch import GradWatchCallback

    callback = GradWatchCallback(every_n_steps=3, nan_strategy="raise")
    assert callback.options == Options(every_n_steps=3, nan_strategy="raise")
    with pytest.raises(TypeError, match="weight_norm_every must be a positive int"):
        GradWatchCallback(weight_norm_every=2.5)
