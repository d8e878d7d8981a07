"""Who may call the API: the auth matrix, CSRF on sessions, tokens and their command."""

import hashlib
import re
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from api.auth import CSRF_FAILED, FORBIDDEN
from api.errors import UNAUTHORIZED
from api.models import ApiToken, IdempotencyRecord
from tests.factories import StaffFactory, UserFactory

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
        self.command("revoke", first.prefix)
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
