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
    with gradwatch.GradWatch(model, options=chosen) as gw:
        assert gw.options is chosen  # taken as it is: checked once, when it was made
    with pytest.raises(TypeError, match=r"given instead of the options one by one.*\['warn'\]"):
        gradwatch.GradWatch(model, options=chosen, warn=False)
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
    with pytest.raises(TypeError, match="GradWatchCallback.. got an unexpected keyword argument"):
        GradWatchCallback(log_every=3)
    with pytest.warns(DeprecationWarning, match="every_n_steps by keyword"):
        assert GradWatchCallback(4).options.every_n_steps == 4
    import inspect

    assert set(inspect.signature(GradWatchCallback).parameters) == {
        "curvature_loss",
        *_option_names(),
    }


def _option_names():
    return [f.name for f in dataclasses.fields(Options)]


def test_the_options_table_in_the_docs_is_made_from_the_declarations():
    from pathlib import Path

    from gradwatch.options import options_markdown

    usage = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    assert options_markdown() in usage  # regenerate with gradwatch.options.options_markdown()
    for name in _option_names():
        assert f"| `{name}` |" in options_markdown()


def test_the_constructors_show_every_option_in_their_signature_and_docstring():
    import inspect

    shown = inspect.signature(gradwatch.GradWatch, eval_str=True).parameters
    assert shown["weight_norm_every"].annotation is int  # a type a tool can read
    for name in _option_names():
        assert shown[name].default == Options.__dataclass_fields__[name].default, name
        assert f"\n        {name}: " in gradwatch.GradWatch.__doc__, name
    assert "{options}" not in gradwatch.GradWatch.__doc__
    assert {"optimizer", "scaler", "curvature_loss", "log_dir"} <= set(shown)


def test_an_unknown_option_names_itself_and_the_options():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'every_n_step'.*weight_norm"):
        gradwatch.GradWatch(model, every_n_step=5)


def test_options_by_position_still_work_with_a_deprecation_warning():
    model = nn.Sequential(nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(DeprecationWarning, match="every_n_steps, optimizer by keyword"):
        gw = gradwatch.GradWatch(model, None, None, 7, opt)
    with gw:
        assert gw.every_n_steps == 7 and gw.optimizer is opt
    with pytest.raises(TypeError, match="multiple values for argument 'optimizer'"):
        gradwatch.GradWatch(model, None, None, 7, opt, optimizer=opt)
    with pytest.raises(TypeError, match="multiple values for argument 'every_n_steps'"):
        gradwatch.GradWatch(model, None, None, 7, every_n_steps=3)


def test_the_demo_command_takes_the_options_a_terminal_can_give(capsys):
    from gradwatch.cli.command import build_parser, main
    from gradwatch.options import cli_options

    flags = [flag for flag, *_ in cli_options()]
    assert flags == ["--every-n-steps", "--nan-strategy", "--weight-norm-every"]
    args = build_parser().parse_args(["demo", "--weight-norm-every", "3"])
    assert args.weight_norm_every == 3 and args.every_n_steps is None
    assert main(["demo", "--no-logdir", "--weight-norm-every", "0"]) == 2
    assert "weight_norm_every must be a positive int, got 0" in capsys.readouterr().err
