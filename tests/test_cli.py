"""What the management commands share (``common.cli``): one argparse type for counts."""

from argparse import ArgumentTypeError

import pytest
from django.core.management import load_command_class

from common.cli import positive_int


def test_positive_int():
    assert positive_int("3") == 3
    with pytest.raises(ArgumentTypeError, match="must be at least 1, not 0"):
        positive_int("0")
    with pytest.raises(ValueError):
        positive_int("three")


@pytest.mark.parametrize(
    ("app", "command", "option"),
    [
        ("products", "import_products", "--chunk-size"),
        ("products", "warm_cache", "--chunk-size"),
        ("bench", "bench_cache", "--keys"),
        ("batching", "mark_interrupted_runs", "--stale-after"),
        ("jobs", "reap_jobs", "--stale-after"),
        ("api", "purge_idempotency_keys", "--older-than"),
    ],
)
def test_every_command_uses_the_one_positive_int(app, command, option):
    parser = load_command_class(app, command).create_parser("manage.py", command)
    action = next(action for action in parser._actions if option in action.option_strings)
    assert action.type is positive_int
