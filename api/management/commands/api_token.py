"""Create, list and revoke API tokens."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from api.models import PREFIX_LENGTH, ApiToken

NO_USER = "no user named {username!r}"
NOT_STAFF = "{username} is not an active staff user: the API accepts only those"
NO_TOKEN = "no token with id or prefix {ident!r}"
TOO_SHORT = (
    "{ident!r} is neither a token id nor a prefix: a prefix has {length} characters "
    "(see `api_token list`)"
)
AMBIGUOUS = "{count} tokens start with {prefix!r}: {matches}; give the id of the one to revoke"
ALREADY_REVOKED = "token #{id} was already revoked"


class Command(BaseCommand):
    help = (
        "Manage API tokens. `create USERNAME [--name NAME]` prints a new token once "
        "(only its SHA-256 digest is stored); `list` shows tokens; `revoke ID|PREFIX` "
        "disables one."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, title="actions")
        create = actions.add_parser(
            "create", help="Create a token for an active staff user and print it."
        )
        create.add_argument("username", type=str, help="The user the token acts as.")
        create.add_argument("--name", type=str, default="", help="What the token is for.")
        listing = actions.add_parser("list", help="List tokens (never their secrets).")
        listing.add_argument("--all", action="store_true", help="Include revoked tokens.")
        revoke = actions.add_parser("revoke", help="Revoke a token by id or prefix.")
        revoke.add_argument(
            "ident",
            type=str,
            help=f"The token's id, or its prefix (its first {PREFIX_LENGTH} characters, as "
            "`list` shows them). A prefix may start with '-': then write -- before it.",
        )

    def handle(self, *args, action: str, **options) -> None:
        getattr(self, f"handle_{action}")(**options)

    def handle_create(self, *, username: str, name: str, **options) -> None:
        user = get_user_model()._default_manager.filter(username=username).first()
        if user is None:
            raise CommandError(NO_USER.format(username=username))
        if not (user.is_active and user.is_staff):
            raise CommandError(NOT_STAFF.format(username=username))
        token, secret = ApiToken.issue(user, name=name)
        if options["verbosity"] >= 1:
            self.stderr.write(f"Token #{token.pk} for {username} (shown once, store it now):")
        self.stdout.write(secret)

    def handle_list(self, *, all: bool, **options) -> None:
        tokens = ApiToken.objects.select_related("user").order_by("id")
        for token in tokens if all else tokens.active():
            state = f"revoked {token.revoked_at:%Y-%m-%d %H:%M}" if token.revoked_at else "active"
            self.stdout.write(
                f"{token.pk}\t{token.prefix}\t{token.user.get_username()}\t"
                f"{token.name or '-'}\t{token.created_at:%Y-%m-%d %H:%M}\t{state}"
            )

    def handle_revoke(self, *, ident: str, **options) -> None:
        tokens = ApiToken.objects.select_related("user").order_by("id")
        by_id = tokens.filter(pk=int(ident)) if ident.isdigit() else tokens.none()
        if (token := by_id.first()) is None:  # an id wins over a prefix
            if len(ident) < PREFIX_LENGTH:
                raise CommandError(TOO_SHORT.format(ident=ident, length=PREFIX_LENGTH))
            prefix = ident[:PREFIX_LENGTH]
            found = list(tokens.filter(prefix=prefix))
            if not found:
                raise CommandError(NO_TOKEN.format(ident=ident))
            if len(found) > 1:
                matches = ", ".join(f"#{t.pk} ({t.user.get_username()})" for t in found)
                raise CommandError(
                    AMBIGUOUS.format(count=len(found), prefix=prefix, matches=matches)
                )
            token = found[0]
        if not ApiToken.objects.filter(pk=token.pk).revoke():
            raise CommandError(ALREADY_REVOKED.format(id=token.pk))
        if options["verbosity"] >= 1:
            self.stdout.write(f"Token #{token.pk} ({token.prefix}) revoked.")
