"""Helpers shared by the commands: argument types and the usage-error type."""

from __future__ import annotations

import argparse

from ..configs import QuantConfig, config_from_name


class UsageError(Exception):
    """A bad combination of arguments: reported like an argparse error, exit status 2."""


def config_name(text: str) -> str:
    """argparse type: a name from :data:`lowbit.configs.NAMED_CONFIGS`."""
    try:
        config_from_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def config_spec(text: str) -> tuple[str, QuantConfig]:
    """argparse type: ``NAME`` or ``NAME:GROUP_SIZE`` (e.g. ``int4-weight-only:32``) -> (text, config)."""
    name, _, group = text.partition(":")
    try:
        if group and not group.isdigit():
            raise ValueError(f"expected NAME or NAME:GROUP_SIZE with an integer group size; received {text!r}")
        return text, config_from_name(name, int(group) if group else None)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def int_at_least(minimum: int):
    """argparse type factory: an int >= ``minimum``."""

    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}; received {text!r}")
        return int(text)

    parse.__name__ = f"int_at_least_{minimum}"
    return parse

