"""Pooled PostgreSQL connections survive a database restart.

A restart or a failover ends every backend; the pool still holds their
connections and would hand them out dead, one failed request (a 500) each until
the pool has cycled them all. The pool checks a connection before handing it
out (``check``), and at the first dead one replaces every dead idle one.
"""

import psycopg
import pytest
from django.db import connection
from django.test import Client
from psycopg import sql

from shop.settings import check_pooled_connection, database_from_env
from tests.factories import ProductFactory, StaffFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_postgresql_pool_checks_connections_before_use(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgres://shop@db.example/shop")
    pool = database_from_env()["OPTIONS"]["pool"]
    assert pool["check"] is check_pooled_connection


def terminate_other_backends() -> int:
    """What a restart does to the pool: end every backend of the test database but one's own.

    From a connection of its own, outside the pool; returns how many ended.
    """
    settings = connection.settings_dict
    with psycopg.connect(
        dbname=settings["NAME"],
        user=settings["USER"],
        password=settings["PASSWORD"],
        host=settings["HOST"],
        port=settings["PORT"] or None,
        autocommit=True,
    ) as admin:
        ended = admin.execute(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).fetchone()[0]
    return ended


def test_requests_after_the_pooled_backends_were_terminated():
    if connection.vendor != "postgresql" or connection.pool is None:
        pytest.skip("needs PostgreSQL and its connection pool")
    product = ProductFactory()
    client = Client(raise_request_exception=False)
    client.force_login(StaffFactory())
    assert client.get("/products/").status_code == 200
    # The test client keeps the request's connection; a server returns it to
    # the pool when the request ends (CONN_MAX_AGE is 0 with the pool).
    connection.close()
    # A busy pool: every connection it may hold open and idle.
    pool = connection.pool
    lent = [pool.getconn() for _ in range(pool.max_size)]
    for conn in lent:
        pool.putconn(conn)
    assert pool.get_stats()["pool_available"] == pool.max_size

    assert terminate_other_backends() >= pool.max_size

    for _ in range(pool.max_size + 1):  # more requests than the pool holds connections
        response = client.get("/products/")
        assert response.status_code == 200
        assert product.sku in response.content.decode()
        connection.close()
