"""The API page's curl examples run, as written, against a live server.

The examples are the ``curl`` commands of the ```sh blocks under the
"## Calling it" heading of docs/api.md (up to the next "## " heading). Each runs in order
with ``http://127.0.0.1:8000`` replaced by the live server and ``$TOKEN`` by
a staff token; ``$JOB_ID`` and ``$LOG_ID`` are the ids from the most recent
answer that had them. Every command must succeed (curl ``--fail``: a 2xx).
"""

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

from django.conf import settings as django_settings

from api.models import ApiToken
from tests.factories import StaffFactory

# The page holding the examples; API_DOCS points elsewhere for a local check.
PAGE = Path(os.environ.get("API_DOCS") or django_settings.BASE_DIR / "docs" / "api.md")
HEADING = "## Calling it"
HOST = "http://127.0.0.1:8000"


def page_curl_commands(text: str) -> list[list[str]]:
    """The curl commands of the ```sh blocks in the "Calling it" section, as argument lists.

    A command goes on over backslash-newlines and over newlines inside quotes.
    """
    found = re.search(rf"^{HEADING}\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert found, f"{PAGE} has no '{HEADING}' section"
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", found.group(1), flags=re.MULTILINE | re.DOTALL):
        pending = ""
        for line in block.splitlines():
            pending += line + "\n"
            if line.endswith("\\"):
                continue
            try:
                words = shlex.split(re.sub(r"\\\n\s*", " ", pending), comments=True)
            except ValueError:
                continue  # a quote is still open: the command goes on
            if words[:1] == ["curl"]:
                commands.append(words)
            pending = ""
    return commands


def test_api_page_curl_examples_run(live_server):
    commands = page_curl_commands(PAGE.read_text())
    assert len(commands) >= 6, commands
    _, token = ApiToken.issue(StaffFactory())
    variables = {"TOKEN": token}
    for command in commands:
        shown = shlex.join(command)
        assert "$TOKEN" in shown or "/api/" not in shown, f"no token in: {shown}"
        words = []
        for word in command:
            word = word.replace(HOST, live_server.url)
            for name, value in variables.items():
                word = word.replace(f"${name}", value)
            assert not re.search(r"\$[A-Z_]+", word), f"unknown variable in: {shown}"
            words.append(word)
        done = subprocess.run(
            [*words, "--fail-with-body", "--silent", "--show-error"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{shown}\n{done.stdout}\n{done.stderr}"
        try:
            answer = json.loads(done.stdout)
        except ValueError:
            continue  # /metrics speaks Prometheus text
        if isinstance(answer, dict):
            if "status_url" in answer:
                variables["JOB_ID"] = answer["id"]
            if "log_id" in answer:
                variables["LOG_ID"] = str(answer["log_id"])
