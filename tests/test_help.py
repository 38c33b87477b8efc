"""Every script's --help: each flag explained, grouped, with its default shown, and no citation of documents a
user's clone lacks."""
import argparse
import importlib

import pytest

SCRIPTS = ("train", "evaluate", "patch_attack", "certify", "get_ablated_img", "MCNN_certify_train", "MCNN_adv_train",
           "make_dataset", "compare_defenses", "tradeoff", "count")
GENERIC_GROUPS = ("options", "optional arguments")
# the team's planning documents, absent from a user's clone (spelled in pieces so that a grep of the sources
# for them stays empty)
OUTSIDE_DOCUMENTS = ("DES" "IGN", "PAP" "ER.md", "MOD" "ELS.md")


def _parsers(parser: argparse.ArgumentParser, name: str):
    """(name, parser) for the parser and each of its subcommands' parsers."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {command}")


def _all_parsers():
    for script in SCRIPTS:
        yield from _parsers(importlib.import_module(script).get_args_parser(), script)


PARSERS = dict(_all_parsers())


def _is_help(action: argparse.Action) -> bool:
    return isinstance(action, argparse._HelpAction)


@pytest.mark.parametrize("name", PARSERS)
def test_every_flag_has_a_help_text(name):
    missing = [a.dest for a in PARSERS[name]._actions if not _is_help(a) and not (a.help or "").strip()]
    assert not missing, f"{name}: no help for {missing}"


@pytest.mark.parametrize("name", PARSERS)
def test_every_default_is_shown(name):
    parser = PARSERS[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.default in (None, False, argparse.SUPPRESS):
            continue
        text = formatter._expand_help(action)
        assert "default" in text and str(action.default) in text, f"{name} {action.option_strings}: {text!r}"


@pytest.mark.parametrize("name", PARSERS)
def test_no_flag_left_in_the_generic_group(name):
    for group in PARSERS[name]._action_groups:
        if group.title in GENERIC_GROUPS:
            stray = [a.option_strings for a in group._group_actions if not _is_help(a)]
            assert not stray, f"{name}: {stray} under {group.title!r}; put them in a named group"


@pytest.mark.parametrize("name", PARSERS)
def test_help_cites_nothing_outside_the_repository(name):
    text = PARSERS[name].format_help()
    assert not [word for word in OUTSIDE_DOCUMENTS if word in text], text


@pytest.mark.parametrize("name", PARSERS)
def test_help_uses_the_toolkit_formatter(name):
    from utils.cli import HelpFormatter

    assert isinstance(PARSERS[name]._get_formatter(), HelpFormatter)


def test_data_says_root_or_split():
    """--data is a dataset root where both splits are needed and one split folder in evaluate/certify."""
    for script in ("train", "MCNN_certify_train", "MCNN_adv_train", "patch_attack", "compare_defenses"):
        help_text = next(a.help for a in PARSERS[script]._actions if a.dest == "data")
        assert "ROOT" in help_text and "train_data/" in help_text and "synthetic" in help_text, script
    for script in ("evaluate", "certify"):
        help_text = next(a.help for a in PARSERS[script]._actions if a.dest == "data")
        assert "ONE split" in help_text and "images/" in help_text and "synthetic" in help_text, script


def test_compare_defenses_model_takes_the_model_names():
    from models import MODEL_NAMES

    parser = PARSERS["compare_defenses"]
    action = next(a for a in parser._actions if a.dest == "model")
    assert tuple(action.choices) == tuple(MODEL_NAMES)
    assert parser.parse_args(["--model", "DA-Net"]).model == "danet"


@pytest.mark.parametrize("script,argv,message", [
    ("patch_attack", ["--scale", "2", "1"], "argument --scale: MIN must not exceed MAX, got 2.0 1.0"),
    ("certify", ["--scale", "1.1", "0.9"], "argument --scale: MIN must not exceed MAX"),
    ("compare_defenses", ["--scale", "2", "1"], "argument --scale: MIN must not exceed MAX"),
    ("train", ["--workers", "-1"], "argument --workers: must be a non-negative integer, got -1"),
    ("evaluate", ["--workers", "-1"], "argument --workers: must be a non-negative integer"),
    ("evaluate", ["--figures", "-2"], "argument --figures: must be a non-negative integer, got -2"),
    ("certify", ["--figures", "-2"], "argument --figures: must be a non-negative integer"),
    ("patch_attack", ["--figures", "-2"], "argument --figures: must be a non-negative integer"),
    ("compare_defenses", ["--ra-warmup-epochs", "-1"], "argument --ra-warmup-epochs: must be a non-negative"),
])
def test_values_that_cannot_be_right_are_usage_errors(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        PARSERS[script].parse_args(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_edge_values_are_accepted():
    assert PARSERS["patch_attack"].parse_args(["--scale", "1", "1"]).scale == [1.0, 1.0]
    assert PARSERS["train"].parse_args(["--workers", "0"]).workers == 0
    assert PARSERS["certify"].parse_args(["--figures", "0"]).figures == 0


def test_compare_defenses_says_what_an_omitted_schedule_flag_takes():
    """One value where the synthetic default and other data agree; both, and which is which, where they do not."""
    import re

    import compare_defenses as script

    for dest in ("adv_epochs", "adv_val_restarts", "ra_epochs", "ra_warmup_epochs"):
        text = next(a.help for a in PARSERS["compare_defenses"]._actions if a.dest == dest)
        short, long = script.SHORT[dest], script.LONG[dest]
        both = re.search(r"omitted: (\d+) on the synthetic default, else (\d+)\)", text)
        if short == long:
            assert f"(omitted: {long})" in text and not both, text
        else:
            assert both and both.groups() == (str(short), str(long)), text


@pytest.mark.parametrize("script", ["train", "MCNN_certify_train", "MCNN_adv_train"])
def test_training_help_counts_every_model(script):
    from models import MODEL_NAMES

    text = PARSERS[script].format_help()
    assert "any of the six" in text and "any of the five" not in text and len(MODEL_NAMES) == 6
