"""Arguments users get wrong: the one did-you-mean check used for every named choice (models, keywords, config
keys and values), and the error type of all such mistakes."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class ArgumentError(ValueError):
    """An argument a user got wrong: a name or value that is not one of its choices (a model, a keyword, a tag),
    or arguments that do not go together."""


class UnknownArgument(ArgumentError, TypeError):
    """A keyword argument a function does not take: a ``TypeError``, as Python's own, and an ``ArgumentError``."""


def did_you_mean(value, choices: Iterable) -> str:
    """`` Did you mean 'x'?`` for the choice closest to ``value``, or an empty string."""
    close = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_choice(name: str, value, choices: Iterable) -> None:
    """Raise ``ArgumentError('name=value is not supported; choose one of ...')`` unless ``value`` is a choice."""
    choices = tuple(choices)
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        message = f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}"
        raise ArgumentError(message + (f".{hint}" if hint else ""))
