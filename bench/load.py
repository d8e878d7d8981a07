"""The load test behind ``manage.py bench_load`` (method: docs/deploy.md).

A batch met by a transport failure or a 409 is sent again with the same key, up to
``ATTEMPTS`` times: the idempotency record makes a repeat return the first answer,
never a second write.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from urllib.parse import urlsplit

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import Permission
from django.db.models import Count, Sum

from api.models import ApiToken, IdempotencyRecord
from batching.engine import chunked
from batching.models import BatchProcessingLog
from bench.report import percentile
from products.models import Category, Product, ProductView

POST = "POST /api/product-views/bulk"
READ = "GET /api/batch-logs"
ENDPOINTS = (POST, READ)
POST_PATH = "/api/product-views/bulk"
READ_PATH = "/api/batch-logs?page_size=20"
# The client's permissions: what the two endpoints declare (api.auth.needs).
PERMISSIONS = (("products", "add_productview"), ("batching", "view_batchprocessinglog"))
ATTEMPTS = 3
USERS = 50
PRODUCTS = 10_000


@dataclass
class Namespace:
    """One run's rows: its tag prefixes every username, sku and session id."""

    tag: str
    staff_id: int
    token: str
    user_ids: list[int]
    product_ids: list[int]

    @property
    def session_prefix(self) -> str:
        return f"{self.tag}-"


def prepare(users: int = USERS, products: int = PRODUCTS) -> Namespace:
    """A staff user holding exactly the two endpoints' permissions, its token, users, products."""
    tag = f"load-{uuid.uuid4().hex[:10]}"
    User = get_user_model()
    password = make_password(None)  # nobody logs in as these
    staff = User.objects.create(username=f"{tag}-client", password=password, is_staff=True)
    for app_label, codename in PERMISSIONS:
        staff.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    _, secret = ApiToken.issue(staff, name=f"bench_load {tag}")
    names = [f"{tag}-{number}" for number in range(users)]
    User.objects.bulk_create([User(username=name, password=password) for name in names])
    category = Category.objects.create(name=tag)
    skus = [f"{tag}-{number:03d}" for number in range(products)]
    Product.objects.bulk_create(
        Product(sku=sku, name=sku, category=category, price=Decimal("10.00"), stock_quantity=100)
        for sku in skus
    )
    user_ids = dict(User.objects.filter(username__in=names).values_list("username", "pk"))
    product_ids = dict(Product.objects.filter(category=category).values_list("sku", "pk"))
    return Namespace(
        tag=tag,
        staff_id=staff.pk,
        token=secret,
        user_ids=[user_ids[name] for name in names],
        product_ids=[product_ids[sku] for sku in skus],
    )


@dataclass
class Tally:
    """What the clients saw: latencies and statuses per endpoint, errors, what was posted."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {e: [] for e in ENDPOINTS})
    statuses: dict[str, Counter] = field(default_factory=lambda: {e: Counter() for e in ENDPOINTS})
    errors: list[str] = field(default_factory=list)
    posted_rows: int = 0
    posted_batches: int = 0
    log_ids: list[int] = field(default_factory=list)  # the posted batches' runs
    keys: list[str] = field(default_factory=list)  # the posted batches' Idempotency-Keys
    failed_log_ids: list[int] = field(default_factory=list)  # runs answered without the batch
    elapsed: float = 0.0

    def merge(self, other: Tally) -> None:
        for endpoint in ENDPOINTS:
            self.latencies[endpoint].extend(other.latencies[endpoint])
            self.statuses[endpoint].update(other.statuses[endpoint])
        for name in ("errors", "log_ids", "keys", "failed_log_ids"):
            getattr(self, name).extend(getattr(other, name))
        self.posted_rows += other.posted_rows
        self.posted_batches += other.posted_batches

    def server_errors(self, endpoint: str) -> int:
        return sum(n for status, n in self.statuses[endpoint].items() if status >= 500)


class Client:
    """One client: a keep-alive connection, and its own sequence of batches."""

    def __init__(self, number: int, url: str, namespace: Namespace, batch: int, timeout: float):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.number, self.namespace, self.batch, self.timeout = number, namespace, batch, timeout
        self.tally = Tally()
        self.connection: http.client.HTTPConnection | None = None
        self.headers = {"Authorization": f"Bearer {namespace.token}"}
        self.random = random.Random(number)  # the same rows for the same client, run after run

    def run(self, start: threading.Barrier, deadline_box: list[float]) -> None:
        """Post and read in turn until the deadline: a request still unanswered at the
        deadline finishes; none starts after it."""
        self.warm_up()
        start.wait()
        sequence = 0
        while time.monotonic() < deadline_box[0]:
            self.post(sequence)
            sequence += 1
            if time.monotonic() >= deadline_box[0]:
                break
            self.read()
        if self.connection is not None:
            self.connection.close()

    def warm_up(self) -> None:
        """One read before the clock starts, not counted: the connection is open and each
        server worker has imported its URLs and API (seconds on a loaded machine)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request("GET", READ_PATH, headers=self.headers)
            connection.getresponse().read()
        except (OSError, http.client.HTTPException):
            connection.close()
            return  # the timed requests will tell
        self.connection = connection

    def rows(self, sequence: int) -> list[dict]:
        users, products = self.namespace.user_ids, self.namespace.product_ids
        first = sequence * self.batch
        return [
            {
                "user_id": users[(self.number + index) % len(users)],
                "product_id": self.random.choice(products),
                "session_id": f"{self.namespace.tag}-{self.number}-{first + index}",
                "interaction_type": "view",
            }
            for index in range(self.batch)
        ]

    def post(self, sequence: int) -> None:
        body = json.dumps(self.rows(sequence)).encode()
        key = f"{self.namespace.tag}-{self.number}-{sequence}"
        headers = {**self.headers, "Content-Type": "application/json", "Idempotency-Key": key}
        for _ in range(ATTEMPTS):
            answer = self.request(POST, "POST", POST_PATH, body, headers)
            if answer is None:
                continue
            status, payload = answer
            if status == 409:
                time.sleep(0.05)  # the first attempt is still running: its answer will come
                continue
            result = _object(payload)
            if status == 200 and result.get("written") == self.batch and not result.get("errors"):
                self.tally.posted_batches += 1
                self.tally.posted_rows += self.batch
                self.tally.log_ids.append(result["log_id"])
                self.tally.keys.append(key)
                return
            if isinstance(result.get("log_id"), int):  # a run that failed: removed afterwards
                self.tally.failed_log_ids.append(result["log_id"])
            if status == 200:  # the request was served, the batch was not written whole
                self.tally.errors.append(f"{POST}: batch answered {payload[:300]!r}")
            return

    def read(self) -> None:
        answer = self.request(READ, "GET", READ_PATH, None, self.headers)
        if answer is not None and answer[0] == 200 and "items" not in _object(answer[1]):
            self.tally.errors.append(f"{READ}: no items in {answer[1][:300]!r}")

    def request(
        self, endpoint: str, method: str, path: str, body: bytes | None, headers: dict
    ) -> tuple[int, bytes] | None:
        """(status, body), or None after a transport error; any answer but 200 is an error."""
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        began = time.perf_counter()
        try:
            self.connection.request(method, path, body=body, headers=headers)
            response = self.connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.tally.errors.append(f"{endpoint}: {type(exc).__name__}: {exc}")
            self.connection.close()
            self.connection = None
            return None
        self.tally.latencies[endpoint].append(time.perf_counter() - began)
        self.tally.statuses[endpoint][response.status] += 1
        if response.status != 200:
            self.tally.errors.append(f"{endpoint}: HTTP {response.status}: {payload[:300]!r}")
        return response.status, payload


def _object(payload: bytes) -> dict:
    try:
        value = json.loads(payload)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def run_clients(
    url: str, namespace: Namespace, *, clients: int, seconds: float, batch: int, timeout: float
) -> Tally:
    """Run the clients for ``seconds``; their merged tally."""
    workers = [Client(number, url, namespace, batch, timeout) for number in range(clients)]
    start = threading.Barrier(clients + 1)
    deadline_box = [math.inf]
    threads = [
        threading.Thread(target=worker.run, args=(start, deadline_box), daemon=True)
        for worker in workers
    ]
    for thread in threads:
        thread.start()
    start.wait()  # every client has warmed up
    began = time.monotonic()
    deadline_box[0] = began + seconds
    for thread in threads:
        thread.join()
    tally = Tally(elapsed=time.monotonic() - began)
    for worker in workers:
        tally.merge(worker.tally)
    return tally


def verify(namespace: Namespace, tally: Tally) -> list[str]:
    """What is wrong with the stored rows, given what was posted (empty: all stored once)."""
    views = ProductView.objects.filter(session_id__startswith=namespace.session_prefix)
    stored = views.aggregate(rows=Count("pk"), sessions=Count("session_id", distinct=True))
    products = Product.objects.filter(category__name=namespace.tag)
    counted = products.aggregate(n=Sum("view_count"))["n"] or 0
    # Each posted batch's key: one record, holding that batch's answer.
    answered = IdempotencyRecord.objects.filter(user_id=namespace.staff_id, status_code=200)
    records = sum(answered.filter(key__in=keys).count() for keys in chunked(iter(tally.keys), 1000))
    rows, twice, posted = stored["rows"], stored["rows"] - stored["sessions"], tally.posted_rows
    keys, runs, batches = len(set(tally.keys)), len(set(tally.log_ids)), tally.posted_batches
    checks = {
        f"{rows:,} view rows stored for {posted:,} posted": rows == posted,
        f"{twice:,} view rows repeat another row's session id": not twice,
        f"the products' view_count adds up to {counted:,}, not the {posted:,} rows posted": (
            counted == posted
        ),
        f"{records:,} idempotency records answered 200 for {keys:,} distinct keys of "
        f"{batches:,} batches posted": keys == records == batches,
        f"{runs:,} distinct batch runs answered {batches:,} batches": runs == batches,
    }
    return [problem for problem, ok in checks.items() if not ok]


def remove(namespace: Namespace, log_ids: Iterable[int]) -> None:
    """Delete the run's namespace: views, products, users, token, records, batch runs."""
    for ids in chunked(iter(sorted(set(log_ids))), 1000):
        BatchProcessingLog.objects.filter(pk__in=ids).delete()
    ProductView.objects.filter(product__category__name=namespace.tag).delete()
    Product.objects.filter(category__name=namespace.tag).delete()
    Category.objects.filter(name=namespace.tag).delete()
    # The users' cascade takes the token and the idempotency records.
    get_user_model().objects.filter(username__startswith=namespace.session_prefix).delete()


def rows(tally: Tally) -> list[tuple[str, ...]]:
    """Per endpoint: requests, requests/s, p50, p99 and max latency (ms), errors, 5xx."""
    table = []
    for endpoint in ENDPOINTS:
        latencies = [latency * 1000 for latency in tally.latencies[endpoint]]
        figures = [
            len(latencies) / tally.elapsed if tally.elapsed else 0.0,
            percentile(latencies, 50) or 0.0,
            percentile(latencies, 99) or 0.0,
            max(latencies, default=0.0),
        ]
        errors = str(sum(1 for error in tally.errors if error.startswith(endpoint)))
        cells = (f"{figure:,.1f}" for figure in figures)
        table.append(
            (endpoint, f"{len(latencies):,}", *cells, errors, str(tally.server_errors(endpoint)))
        )
    return table


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min), {five:.1f} (5 min)"
