"""The OpenAPI schema, fuzzed with schemathesis; the docs page is self-contained.

schemathesis generates requests for every operation from ``/api/openapi.json``
(valid and invalid ones) and sends them, with a staff token, through Django's
WSGI application: no generated request may get a 5xx, and every answer must
match the schema (status code, content type, body).
"""

import re

import pytest
import schemathesis
from django.contrib.staticfiles import finders
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.test import Client
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.main import api
from api.models import ApiToken
from tests.factories import StaffFactory

schema = schemathesis.openapi.from_dict(api.get_openapi_schema())

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture
def staff_token(db):
    _, secret = ApiToken.issue(StaffFactory())
    return secret


@pytest.fixture
def wsgi_app():
    """Django's WSGI application, built under the test settings (plain HTTP).

    Its requests stay in the test's transaction, as with Django's test client:
    the handler's end-of-request hook would close the connection that holds it.
    """
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield WSGIHandler()
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_generated_request_gets_a_server_error(case, staff_token, wsgi_app):
    response = case.call(app=wsgi_app, headers={"Authorization": f"Bearer {staff_token}"})
    case.validate_response(response, checks=CHECKS)


def test_docs_load_nothing_from_the_internet():
    page = Client().get("/api/docs")
    assert page.status_code == 200
    html = page.content.decode()
    assert "//" not in re.sub(r"<!--.*?-->", "", html).replace('"url": "/api/openapi.json"', "")
    assert '"validatorUrl": null' in html  # Swagger UI's online validator badge is off
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) == 5  # stylesheet, two icons, two scripts
    for asset in assets:
        assert asset.startswith("/static/ninja/"), asset
        assert finders.find(asset.removeprefix("/static/")), asset
