# walcache: `make demo` runs the pipeline on a local environment, `make test` runs every test.
# Both install what is missing (Postgres server packages, the tansu broker) on first use.

CARGO ?= cargo
TEST_ENV := .walcache/test
TEST_BROKER_MAINTENANCE := 30days

.PHONY: demo test tools build lint bench env-up env-down clean

tools:
	deploy/local/install-tools.sh

build:
	$(CARGO) build --workspace --bins --examples

demo: tools build
	$(CARGO) run --quiet -p walcache-tests --bin walcache-demo

# One fresh environment for the whole run (destroyed after it: tansu slows down as its sqlite
# storage fills up); every test gets its own database, slot and topics. The broker does not
# compact during the run, so a test can demand every committed change's own event.
test: tools
	WALCACHE_BROKER_MAINTENANCE_INTERVAL=$(TEST_BROKER_MAINTENANCE) deploy/local/walcache-env up --dir $(TEST_ENV)
	$(CARGO) build --workspace --bins --tests
	status=0; WALCACHE_TEST_ENV_DIR=$(CURDIR)/$(TEST_ENV) $(CARGO) test --workspace --no-fail-fast || status=$$?; \
	  deploy/local/walcache-env destroy --dir $(TEST_ENV); exit $$status

# Code, then every file under deploy/ with a real validator (hadolint, docker-compose,
# systemd-analyze, promtool, kustomize + kubernetes-validate), installed on first use.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	deploy/local/install-tools.sh lint
	deploy/check.sh

# Figures against the brief's baselines, measured side by side in one run (docs/benchmarks.md).
bench: tools
	deploy/local/install-tools.sh redis
	$(CARGO) run --release -p walcache-tests --bin walcache-bench -- $(BENCH_ARGS)

env-up:
	deploy/local/walcache-env up

env-down:
	deploy/local/walcache-env down

clean:
	-deploy/local/walcache-env destroy --dir $(TEST_ENV)
	-deploy/local/walcache-env destroy --dir .walcache/demo
	$(CARGO) clean
