"""``bench.server.url_for``: the DATABASE_URL the benchmarks hand their child processes.

No database is opened: the URL is built from a settings dict and parsed back.
"""

from __future__ import annotations

import dj_database_url
import pytest

from bench.server import url_for

PARTS = ("NAME", "HOST", "PORT", "USER", "PASSWORD")


@pytest.mark.parametrize(
    "config",
    [
        {"NAME": "shop", "HOST": "/var/run/postgresql", "PORT": "", "USER": "u", "PASSWORD": ""},
        {"NAME": "shop", "HOST": "db", "PORT": 6543, "USER": "u", "PASSWORD": "p/w@x"},
        {
            "NAME": "a/b c",
            "HOST": "/tmp/sockets",
            "PORT": "5433",
            "USER": "me@home",
            "PASSWORD": "p/w@x:%y",
        },
    ],
)
def test_postgres_url_round_trips_through_dj_database_url(config):
    parsed = dj_database_url.parse(url_for("postgresql", config))
    expected = {**config, "PORT": int(config["PORT"] or 5432)}
    assert {part: parsed[part] for part in PARTS} == expected


def test_an_unset_host_is_localhost():
    config = {"NAME": "shop", "HOST": "", "PORT": "", "USER": "", "PASSWORD": ""}
    assert url_for("postgresql", config) == "postgres://@localhost:5432/shop"


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("/tmp/db.sqlite3", "sqlite:////tmp/db.sqlite3"),
        (":memory:", ""),
        ("file:memorydb?mode=memory&cache=shared", ""),
    ],
)
def test_sqlite_url(name, url):
    config = {"NAME": name, "HOST": "", "PORT": "", "USER": "", "PASSWORD": ""}
    assert url_for("sqlite", config) == url
