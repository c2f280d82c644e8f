#!/usr/bin/env bash
# Runs once, when the postgres container initialises its data directory: the Incentives table,
# walcache's role (REPLICATION, SELECT on the table) and the publication, created by the owner.
set -euo pipefail
walcache_password="$(cat "${WALCACHE_PASSWORD_FILE:-/run/secrets/walcache-postgres-password}")"
psql -v ON_ERROR_STOP=1 --username postgres --dbname "$POSTGRES_DB" -v pw="$walcache_password" <<'SQL'
CREATE TABLE courier_performance (
  courier_id      bigint PRIMARY KEY,
  city            text NOT NULL,
  zone            text,
  tier            text NOT NULL,
  rating          numeric(3,2),
  deliveries      integer NOT NULL DEFAULT 0,
  on_time_rate    double precision NOT NULL,
  acceptance_rate double precision,
  cancellations   integer NOT NULL DEFAULT 0,
  active          boolean NOT NULL DEFAULT true,
  notes           text,
  updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE ROLE walcache LOGIN REPLICATION PASSWORD :'pw';
GRANT SELECT ON courier_performance TO walcache;
CREATE PUBLICATION walcache FOR TABLE courier_performance
  WITH (publish = 'insert, update, delete, truncate');
SQL
