"""Property-based tests of every command's options: whatever a user types (NaN, inf, negatives, huge numbers, empty
and odd strings, words where numbers belong), the command either takes it or stops with exit 2 and one line naming
the option, never a traceback; and a training run that takes its numbers never saves a non-finite model."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal, get_args, get_origin

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domainlm import config as cfglib
from domainlm.errors import DomainLMError

COMMANDS = {
    "prepare": ("domainlm.data.prepare", "PrepareConfig", {"input": ["a.txt"], "out": "o", "tokenizer": "t"}),
    "merge": ("domainlm.data.merge", "MergeConfig", {"stores": ["a", "b"], "out": "o"}),
    "pretrain": ("domainlm.pretrain.config", "PretrainConfig", {"corpus": "c", "out": "o", "model": "m"}),
    "finetune": ("domainlm.classify.config", "FinetuneConfig", {"train": "t.jsonl", "out": "o", "model": "m"}),
    "evaluate": ("domainlm.classify.config", "EvaluateConfig", {"model": "m", "data": "d.jsonl", "out": "o"}),
    "predict": ("domainlm.classify.config", "PredictConfig", {"model": "m"}),
    "distill": (
        "domainlm.distill.config",
        "DistillConfig",
        {"teacher": "t", "student": "s", "train": "t.jsonl", "out": "o"},
    ),
    "export": ("domainlm.serve.config", "ExportConfig", {"model": "m", "out": "o"}),
    "serve": ("domainlm.serve.config", "ServeConfig", {"model": "m"}),
    "demo": ("domainlm.demo", "DemoConfig", {}),
    "console": ("domainlm.console.settings", "ConsoleConfig", {"home": "h"}),
}

ODD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1.0, 1e308, -1e-308, 5e-324, 2.0, 0.999999])
ODD_INTS = st.sampled_from([-1, 0, 1, 2**63, -(2**63), 10**12, 3])
ODD_TEXT = st.one_of(
    st.sampled_from(["", " ", "nan", "inf", "-1", "1e999", "0x10", "真", "a,b", "../x", "\x00", "yes"]),
    st.text(max_size=12),
)


def _config(command: str):
    import importlib

    module, name, required = COMMANDS[command]
    return getattr(importlib.import_module(module), name), required


def _value_for(hint):
    tp = hint
    if get_origin(tp) in (typing.Union, __import__("types").UnionType):
        tp = next(a for a in get_args(tp) if a is not type(None))
    if tp is float:
        return st.one_of(ODD_FLOATS, st.floats(allow_nan=True, allow_infinity=True), ODD_TEXT)
    if tp is int:
        return st.one_of(ODD_INTS, st.integers(), ODD_TEXT, ODD_FLOATS)
    if tp is bool:
        return st.one_of(st.booleans(), ODD_TEXT)
    if get_origin(tp) is Literal:
        return st.one_of(st.sampled_from(get_args(tp)), ODD_TEXT, st.booleans())
    if get_origin(tp) is list:
        return st.one_of(st.lists(st.one_of(ODD_INTS, ODD_TEXT), max_size=3), ODD_TEXT)
    return ODD_TEXT


def _finite_where_required(cfg) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not f.metadata.get("inf"):
            assert math.isfinite(value), f"{f.name} = {value} passed"


@pytest.mark.parametrize("command", sorted(COMMANDS))
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_value_of_any_option_is_taken_or_refused_in_one_line(command, data):
    cls, required = _config(command)
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
    chosen = data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique_by=lambda f: f.name))
    values = {**required, **{f.name: data.draw(_value_for(hints[f.name]), label=f.name) for f in chosen}}
    try:
        cfg = cfglib.load(cls, None, values)
    except DomainLMError as e:
        message = str(e)
        assert message and "\n" not in message.strip() and "Traceback" not in message
        return
    _finite_where_required(cfg)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data())
def test_the_console_form_checks_give_a_message_per_bad_field(command, data):
    """The console's form check (check_values) never raises and names each bad field under its own key."""
    cls, required = _config(command)
    hints = typing.get_type_hints(cls)
    field = data.draw(
        st.sampled_from([f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])])
    )
    value = data.draw(_value_for(hints[field.name]))
    cfg, errors = cfglib.check_values(cls, {**required, field.name: value})
    assert (cfg is None) == bool(errors)
    assert all(isinstance(m, str) and m and "\n" not in m for m in errors.values())
    if cfg is not None:
        _finite_where_required(cfg)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_cli_stops_a_bad_flag_in_one_line(command, capsys):
    """argparse's own refusals (a choice that is not one) are one line too, as every other bad input."""
    from domainlm.cli import main

    with pytest.raises(SystemExit) as done:
        main(
            [
                command,
                "--precision" if command in ("pretrain", "finetune", "distill", "serve") else "--no-such-flag",
                "bogus",
            ]
        )
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: domainlm")


# ---- the numbers a training run takes never give a non-finite model -----------------------------------------------

TRAINING = st.fixed_dictionaries(
    {},
    optional={
        "learning_rate": st.sampled_from([1e-9, 1e-3, 0.5, 1.0]),
        "adam_beta1": st.sampled_from([0.0, 0.5, 0.999999]),
        "adam_beta2": st.sampled_from([0.0, 0.9, 0.999999]),
        "adam_epsilon": st.sampled_from([1e-30, 1e-8, 1.0]),
        "max_grad_norm": st.sampled_from([1e-9, 1.0, math.inf]),
        "layer_lr_decay": st.sampled_from([1e-6, 0.5, 1.0]),
        "weight_decay": st.sampled_from([0.0, 1.0]),
        "warmup_ratio": st.sampled_from([0.0, 1.0]),
    },
)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from tests.test_classify import make_rows, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("p") / "train.jsonl", make_rows(12, 1))


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(options=TRAINING)
def test_a_finetune_with_any_accepted_numbers_ends_finite_or_in_one_line(
    tmp_path_factory, tiny_model, rows, options, capsys
):
    from safetensors.numpy import load_file

    from domainlm.cli import main

    out = tmp_path_factory.mktemp("run") / "ft"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    capsys.readouterr()
    code = main(
        [
            "finetune",
            "--model",
            tiny_model,
            "--train",
            rows,
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--max-seq-len",
            "32",
            "--no-floor",
            "--precision",
            "fp32",
            *flags,
        ]
    )
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
        assert not (out / "model").exists()  # nothing saved as a result
        return
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert all(__import__("numpy").isfinite(w).all() for w in weights.values())
