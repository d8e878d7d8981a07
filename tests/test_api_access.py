"""Who may call the API: the access matrix, CSRF on sessions, tokens and their command."""

import hashlib
import re
from io import StringIO

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import URLResolver, get_resolver, reverse
from ninja.errors import AuthorizationError

from api.auth import CSRF_FAILED, FORBIDDEN, MISSING_PERMISSIONS, UNDECLARED, check
from api.errors import UNAUTHORIZED
from api.main import api
from api.models import ApiToken, IdempotencyRecord
from batching.models import BatchProcessingLog
from jobs.control import cancel_job
from jobs.models import Job
from tests.factories import BatchProcessingLogFactory, StaffFactory, UserFactory

pytestmark = pytest.mark.django_db

READ = "/api/batch-logs"
WRITE = "/api/product-views/bulk"


def write(client, **extra):
    return client.post(WRITE, data="[]", content_type="application/json", **extra)


def bearer(secret: str) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")


def session_with_csrf(user) -> tuple[Client, str]:
    """A logged-in browser that enforces CSRF, holding the token the docs page gave it."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.get("/api/docs").status_code == 200
    return client, client.cookies["csrftoken"].value


# -- the access matrix: every endpoint and page, every kind of caller ----------

# The model permissions each endpoint needs: the admin's for the same work.
NEEDS = {
    ("POST", "/api/product-views/bulk"): ("products.add_productview",),
    ("POST", "/api/recommendation-scores/bulk"): (
        "products.add_recommendationscore",
        "products.change_recommendationscore",
    ),
    ("POST", "/api/products/import"): ("products.add_product", "products.change_product"),
    ("POST", "/api/orders/batch"): ("orders.add_order",),
    ("GET", "/api/reports/sales"): ("orders.view_order",),
    ("GET", "/api/jobs/{job_id}"): ("jobs.view_job",),
    ("POST", "/api/jobs/{job_id}/cancel"): ("jobs.change_job",),
    ("POST", "/api/jobs/{job_id}/resume"): ("jobs.change_job",),
    ("GET", "/api/batch-logs"): ("batching.view_batchprocessinglog",),
    ("GET", "/api/batch-logs/{log_id}"): ("batching.view_batchprocessinglog",),
    ("GET", "/products/"): ("products.view_product",),  # a page: staff and the admin's rule
}
# What a route needs before it can serve its path parameters: a job to resume is cancelled.
READY = {("POST", "/api/jobs/{job_id}/resume"): lambda ids: cancel_job(ids["job_id"])}
# Open to anyone: they describe the API, or are probed by machines (docs/api.md).
OPEN = {
    ("GET", "/api/"),
    ("GET", "/api/docs"),
    ("GET", "/api/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/health"),
}
PAGES = {("GET", "/products/")}  # Django views, where a token is no credential
TOKEN, SESSION, PERMISSIONS = 1, 2, 2  # queries: token with user; session, user; perms, groups


def _routes(patterns, prefix=""):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            yield "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", prefix + str(pattern.pattern))


def served_routes() -> set[tuple[str, str]]:
    """(method, path) of every API operation and every other page, outside the admin."""
    operations = {
        (method.upper(), path)
        for path, methods in api.get_openapi_schema()["paths"].items()
        for method in methods
    }
    paths = {path for _, path in operations}
    pages = {
        ("GET", path)
        for path in _routes(get_resolver().url_patterns)
        if path not in paths and not path.startswith(("/admin/", "/__debug__/"))
    }
    return operations | pages


def named(permissions) -> list[Permission]:
    return [
        Permission.objects.get(content_type__app_label=app_label, codename=codename)
        for app_label, codename in (permission.split(".") for permission in permissions)
    ]


def grant(user, permissions):
    user.user_permissions.add(*named(permissions))
    return user


def staff_with(permissions=()):
    return grant(UserFactory(is_staff=True), permissions)


def session(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def token(user) -> Client:
    return bearer(ApiToken.issue(user)[1])


def send(client, method, path):
    if method == "POST":
        return client.post(path, data="[]", content_type="application/json")
    return client.get(path)


@pytest.fixture
def ids():
    """The path parameters: a job and a log that exist."""
    job = Job.objects.create(operation=BatchProcessingLog.Operation.ORDERS, partition_size=1)
    return {"job_id": job.pk, "log_id": BatchProcessingLogFactory().pk}


def test_every_endpoint_and_page_is_in_the_matrix():
    """A new endpoint or page fails here until its permissions are written in NEEDS."""
    assert served_routes() == set(NEEDS) | OPEN


class TestMatrix:
    """Each endpoint that needs permissions, for each kind of caller."""

    routes = pytest.mark.parametrize(("method", "path"), sorted(NEEDS))

    def refused(self, response, method, path, status, detail):
        """The API's JSON answer; a page sends who is not staff to the admin's login."""
        if (method, path) not in PAGES:
            assert response.status_code == status
            assert response.json() == {"detail": detail, "errors": []}
        elif status == 403 and detail != FORBIDDEN:
            assert response.status_code == 403
        else:
            assert response.status_code == 302
            assert response["Location"].startswith(reverse("admin:login"))

    @routes
    def test_anonymous_is_401(self, method, path, ids, django_assert_num_queries):
        with django_assert_num_queries(0):
            response = send(Client(), method, path.format(**ids))
        self.refused(response, method, path, 401, UNAUTHORIZED)

    @routes
    @pytest.mark.parametrize("login", [session, token])
    def test_user_who_is_not_staff_is_403_whatever_their_permissions(
        self, method, path, login, ids
    ):
        client = login(grant(UserFactory(), NEEDS[method, path]))
        response = send(client, method, path.format(**ids))
        status = 401 if (method, path) in PAGES and login is token else 403
        self.refused(response, method, path, status, FORBIDDEN)

    @routes
    @pytest.mark.parametrize(("login", "auth"), [(session, SESSION), (token, TOKEN)])
    def test_staff_without_permissions_is_403_before_anything_runs(
        self, method, path, login, auth, ids, django_assert_num_queries
    ):
        client = login(staff_with())
        if (method, path) in PAGES and login is token:
            auth, status = 0, 401  # no credential for a page: the login page
        else:
            auth, status = auth + PERMISSIONS, 403
        needs = NEEDS[method, path]
        with django_assert_num_queries(auth):  # the credentials and permissions, nothing else
            response = send(client, method, path.format(**ids))
        self.refused(
            response, method, path, status, MISSING_PERMISSIONS.format(missing=", ".join(needs))
        )

    @pytest.mark.parametrize(
        ("method", "path", "left_out"),
        [(*route, permission) for route in sorted(NEEDS) for permission in NEEDS[route]],
    )
    def test_each_permission_is_needed(self, method, path, left_out, ids):
        kept = [permission for permission in NEEDS[method, path] if permission != left_out]
        response = send(session(staff_with(kept)), method, path.format(**ids))
        self.refused(response, method, path, 403, MISSING_PERMISSIONS.format(missing=left_out))

    @pytest.mark.parametrize(
        ("method", "path", "login"),
        [
            (*route, login)
            for route in sorted(NEEDS)
            for login in ([session] if route in PAGES else [session, token])
        ],
    )
    def test_staff_with_exactly_the_permissions_is_served(self, method, path, login, ids):
        READY.get((method, path), lambda ids: None)(ids)
        response = send(login(staff_with(NEEDS[method, path])), method, path.format(**ids))
        assert response.status_code == 200

    @routes
    def test_permissions_through_a_group_count(self, method, path, ids):
        READY.get((method, path), lambda ids: None)(ids)
        group = Group.objects.create(name="operators")
        group.permissions.add(*named(NEEDS[method, path]))
        user = staff_with()
        user.groups.add(group)
        assert send(session(user), method, path.format(**ids)).status_code == 200

    @pytest.mark.parametrize(
        ("method", "path"),
        [route for route in sorted(NEEDS) if all(".view_" in p for p in NEEDS[route])],
    )
    def test_change_permission_grants_view_as_in_the_admin(self, method, path, ids):
        changes = [permission.replace(".view_", ".change_") for permission in NEEDS[method, path]]
        assert send(session(staff_with(changes)), method, path.format(**ids)).status_code == 200

    def test_permissions_cost_two_queries_a_request(self, django_assert_num_queries):
        client = token(staff_with(NEEDS["GET", "/api/batch-logs"]))
        with django_assert_num_queries(TOKEN + PERMISSIONS + 2):  # count, page
            assert client.get("/api/batch-logs").status_code == 200
        client = session(staff_with(NEEDS["GET", "/api/batch-logs"]))
        with django_assert_num_queries(SESSION + PERMISSIONS + 2):
            assert client.get("/api/batch-logs").status_code == 200


@pytest.mark.parametrize(("method", "path"), sorted(OPEN))
@pytest.mark.parametrize(
    "caller", [Client, lambda: session(UserFactory()), lambda: session(staff_with())]
)
def test_open_pages_need_no_credentials(method, path, caller, settings):
    settings.METRICS_TOKEN = ""
    assert send(caller(), method, path).status_code not in (302, 401, 403)


def test_an_endpoint_that_declares_no_permissions_is_refused_even_to_a_superuser():
    with pytest.raises(AuthorizationError, match=UNDECLARED):
        check(StaffFactory(), None)


class TestAnonymous:
    @pytest.mark.parametrize("send", [lambda c: c.get(READ), write])
    def test_is_401(self, send, django_assert_num_queries):
        with django_assert_num_queries(0):
            response = send(Client())
        assert response.status_code == 401
        assert response.json() == {"detail": UNAUTHORIZED, "errors": []}
        assert response["WWW-Authenticate"] == "Bearer"

    @pytest.mark.parametrize(
        "header", ["Bearer not-a-token", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc"]
    )
    def test_unknown_credentials_are_401(self, header):
        assert write(Client(HTTP_AUTHORIZATION=header)).status_code == 401

    def test_docs_and_schema_are_open(self):
        assert Client().get("/api/docs").status_code == 200
        assert Client().get("/api/openapi.json").status_code == 200


class TestSession:
    def test_plain_user_is_403(self):
        client, csrf = session_with_csrf(UserFactory())
        for response in (client.get(READ), write(client, HTTP_X_CSRFTOKEN=csrf)):
            assert response.status_code == 403
            assert response.json()["detail"] == FORBIDDEN

    def test_staff_reads_without_csrf(self, django_assert_num_queries):
        client, _ = session_with_csrf(StaffFactory())
        with django_assert_num_queries(2 + 2):  # session, user; count, page
            response = client.get(READ)
        assert response.status_code == 200

    def test_staff_write_needs_the_csrf_token(self):
        client, csrf = session_with_csrf(StaffFactory())
        refused = write(client)
        assert refused.status_code == 403
        assert refused.json()["detail"] == CSRF_FAILED
        assert write(client, HTTP_X_CSRFTOKEN="x" * 32).status_code == 403
        assert write(client, HTTP_X_CSRFTOKEN=csrf).status_code == 200

    def test_inactive_staff_session_is_anonymous(self):
        staff = StaffFactory()
        client, csrf = session_with_csrf(staff)
        staff.is_active = False
        staff.save()
        assert write(client, HTTP_X_CSRFTOKEN=csrf).status_code == 401


class TestToken:
    def test_staff_token_reads_and_writes_without_csrf(self, django_assert_num_queries):
        _, secret = ApiToken.issue(StaffFactory())
        client = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {secret}")
        with django_assert_num_queries(1 + 2):  # token with its user; count, page
            assert client.get(READ).status_code == 200
        assert write(client).status_code == 200

    def test_revoked_token_is_401(self):
        token, secret = ApiToken.issue(StaffFactory())
        assert write(bearer(secret)).status_code == 200
        ApiToken.objects.filter(pk=token.pk).revoke()
        assert write(bearer(secret)).status_code == 401

    @pytest.mark.parametrize("user", [lambda: UserFactory(), lambda: StaffFactory(is_active=False)])
    def test_token_of_a_user_who_is_not_active_staff_is_403(self, user):
        _, secret = ApiToken.issue(user())
        response = bearer(secret).get(READ)
        assert response.status_code == 403
        assert response.json() == {"detail": FORBIDDEN, "errors": []}

    def test_only_the_digest_is_stored(self):
        token, secret = ApiToken.issue(StaffFactory(), name="ci")
        assert token.digest == hashlib.sha256(secret.encode()).hexdigest()
        assert secret.startswith(token.prefix)
        assert len(secret) >= 43  # 32 random bytes
        stored = ApiToken.objects.values_list("name", "prefix", "digest").get()
        assert not any(secret in value for value in stored)


class TestTokenCommand:
    def command(self, *args) -> tuple[str, str]:
        out, err = StringIO(), StringIO()
        call_command("api_token", *args, stdout=out, stderr=err)
        return out.getvalue(), err.getvalue()

    def test_create_prints_a_working_token_once(self):
        StaffFactory(username="ops")
        out, err = self.command("create", "ops", "--name", "nightly import")
        secret = out.strip()
        assert "shown once" in err
        token = ApiToken.objects.get()
        assert (token.name, token.user.username) == ("nightly import", "ops")
        assert write(bearer(secret)).status_code == 200

    @pytest.mark.parametrize(
        ("username", "message"), [("ghost", "no user named 'ghost'"), ("plain", "not an active")]
    )
    def test_create_refuses(self, username, message):
        UserFactory(username="plain")
        with pytest.raises(CommandError, match=message):
            self.command("create", username)
        assert not ApiToken.objects.exists()

    def test_list_shows_prefixes_never_secrets(self):
        staff = StaffFactory(username="ops")
        kept, kept_secret = ApiToken.issue(staff, name="kept")
        gone, _ = ApiToken.issue(staff, name="gone")
        ApiToken.objects.filter(pk=gone.pk).revoke()
        out, _ = self.command("list")
        assert kept.prefix in out and "kept" in out and "ops" in out
        assert kept_secret not in out
        assert "gone" not in out
        assert "revoked" in self.command("list", "--all")[0]

    def test_revoke_by_prefix_and_by_id(self):
        staff = StaffFactory()
        first, first_secret = ApiToken.issue(staff)
        second, second_secret = ApiToken.issue(staff)
        # "--": one prefix in 32 starts with "-" (token_urlsafe's alphabet).
        self.command("revoke", "--", first.prefix)
        self.command("revoke", str(second.pk))
        assert write(bearer(first_secret)).status_code == 401
        assert write(bearer(second_secret)).status_code == 401
        with pytest.raises(CommandError, match="already revoked"):
            self.command("revoke", str(second.pk))

    def test_revoke_refuses_unknown_and_ambiguous(self):
        staff = StaffFactory(username="ops")
        first = ApiToken.objects.create(user=staff, prefix="abcd1111", digest="1")
        second = ApiToken.objects.create(user=staff, prefix="abcd1111", digest="2")
        ApiToken.objects.create(user=staff, prefix="abcd2222", digest="3")
        message = (
            f"2 tokens start with 'abcd1111': #{first.pk} (ops), #{second.pk} (ops); "
            "give the id of the one to revoke"
        )
        with pytest.raises(CommandError, match=re.escape(message)):
            self.command("revoke", "abcd1111")
        with pytest.raises(CommandError, match="no token with id or prefix 'zzzzzzzz'"):
            self.command("revoke", "zzzzzzzz")
        assert ApiToken.objects.active().count() == 3

    @pytest.mark.parametrize("ident", ["", "a", "abcd222", "99"])
    def test_revoke_refuses_a_prefix_shorter_than_a_prefix(self, ident):
        """Every token starts with "": a short prefix must not revoke whatever it matches."""
        ApiToken.objects.create(user=StaffFactory(), prefix="abcd2222", digest="1")
        with pytest.raises(CommandError, match="is neither a token id nor a prefix"):
            self.command("revoke", ident)
        assert ApiToken.objects.active().count() == 1

    def test_help(self, capsys):
        with pytest.raises(SystemExit):
            call_command("api_token", "--help")
        assert "create" in capsys.readouterr().out


class TestAdmin:
    def test_token_and_idempotency_lists(self):
        staff = StaffFactory()
        client = Client()
        client.force_login(staff)
        costs = []
        for _ in range(2):
            for number in range(3):
                token, _ = ApiToken.issue(staff)
                IdempotencyRecord.objects.create(user=staff, key=f"{token.pk}-{number}")
            with CaptureQueriesContext(connection) as queries:
                for path in ("/admin/api/apitoken/", "/admin/api/idempotencyrecord/"):
                    assert client.get(path).status_code == 200
            costs.append(len(queries))
        assert costs[0] == costs[1]  # twice the rows, the same queries
        response = client.post(
            "/admin/api/apitoken/",
            {"action": "revoke", "_selected_action": [token.pk]},
        )
        assert response.status_code == 302
        assert ApiToken.objects.active().count() == 5
