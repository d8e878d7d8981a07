# make demo | make test | make bench | make lint | make serve
# DATABASE_URL=postgres://... switches any of them to PostgreSQL (SQLite otherwise).

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_DATABASE_URL ?= $(or $(DATABASE_URL),postgres://postgres@127.0.0.1:5432/shop)
BENCH_REDIS_URL ?= $(or $(REDIS_URL),redis://127.0.0.1:6379/6)

.PHONY: venv demo test test-portable bench bench-load serve lint format clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@python=$$(scripts/find-python) && echo "Using $$python" && \
		{ [ -x $(PY) ] || $$python -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	@touch $@

demo: venv
	$(PY) manage.py migrate --verbosity 0
	$(PY) manage.py load_sample_data
	$(PY) manage.py test_bulk_performance --size 1000

# The whole suite except the scale checks marked slow (those run in `make bench`),
# with the coverage of the project's packages ([tool.coverage.*] in pyproject.toml;
# below fail_under the run fails). Other targets run subsets: no coverage there;
# so does `make test PYTEST_ARGS="tests/test_x.py --no-cov"`.
test: venv
	$(PY) -m pytest -m "not slow" --cov --cov-report=term:skip-covered $(PYTEST_ARGS)

# The portable path (bulk_create, bulk_update, Case) on PostgreSQL, which the
# fast paths otherwise take there: the tests of the services, their
# properties, concurrency, faults, resume and dry runs, with BULK_PG_FAST_PATHS=0.
PORTABLE_TESTS := tests/test_services.py tests/test_properties.py tests/test_concurrency.py \
	tests/test_resume.py tests/test_resilience.py tests/test_repeats.py tests/test_engine.py \
	tests/test_dry_run.py tests/test_admin_import.py

test-portable: venv
	@case "$(DATABASE_URL)" in postgres*) ;; \
		*) echo "test-portable runs on PostgreSQL: set DATABASE_URL" >&2; exit 1;; esac
	BULK_PG_FAST_PATHS=0 $(PY) -m pytest -m "not slow" $(PORTABLE_TESTS) $(PYTEST_ARGS)

# Benchmarks on PostgreSQL: the slow scale tests, then the side-by-side figures
# recorded in BENCHMARKS.md, last the live shop's latency during bulk runs.
bench: venv
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) -m pytest -m slow $(PYTEST_ARGS)
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) manage.py migrate --verbosity 0
	rm -f BENCHMARKS.section-*.md
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) manage.py test_bulk_performance --size 1000 \
		--repeat 3 --markdown > BENCHMARKS.section-1.md
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) manage.py test_bulk_performance \
		--size views=100,scores=50,orders=10 --repeat 5 --markdown > BENCHMARKS.section-1a.md
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) manage.py bench_scale --sizes 10000,100000,1000000 --repeat 3 \
		--markdown BENCHMARKS.section-2.md --json docs/bench-scale.json \
		--chart docs/bench-throughput.svg --memory-chart docs/bench-memory.svg
	REDIS_URL=$(BENCH_REDIS_URL) $(PY) manage.py bench_cache --keys 10000 --markdown > BENCHMARKS.section-3.md
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) manage.py bench_live --repeat 3 \
		--markdown BENCHMARKS.section-4.md --json docs/bench-live.json --chart docs/bench-live.svg
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) manage.py bench_submit --sizes 100000,1000000 \
		--markdown BENCHMARKS.section-5.md
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) manage.py bench_workers --size 1000000 \
		--workers 1,2,4 --backends db,celery --markdown BENCHMARKS.section-6.md
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) manage.py bench_load --clients 50 --seconds 60 \
		--markdown > BENCHMARKS.section-7.md
	for section in BENCHMARKS.section-*.md; do cat $$section; echo; done > BENCHMARKS.md
	rm BENCHMARKS.section-*.md
	@cat BENCHMARKS.md

# The production server: static files collected into STATIC_ROOT, then gunicorn
# (gunicorn.conf.py: 127.0.0.1:8000, WEB_CONCURRENCY workers of WEB_THREADS
# threads). DEBUG is off unless set. Run `migrate` first; docs/deploy.md has the rest.
serve: venv
	$(PY) manage.py collectstatic --noinput --verbosity 0
	$(VENV)/bin/gunicorn shop.wsgi

# The production server under load alone (also the last section of `make bench`):
# 50 API clients for 60 s against gunicorn (bench_load starts it on a free
# loopback port), then every posted row counted. PostgreSQL, like `make bench`.
bench-load: venv
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) manage.py migrate --verbosity 0
	DATABASE_URL=$(BENCH_DATABASE_URL) $(PY) manage.py bench_load --clients 50 --seconds 60 --markdown

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) manage.py makemigrations --check --dry-run

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) db.sqlite3 db.sqlite3-* .pytest_cache .ruff_cache .hypothesis .mypy_cache .coverage
