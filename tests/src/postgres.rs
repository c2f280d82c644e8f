//! Test databases: one per test, with the `courier_performance` table of the contract.

use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};
use tokio::sync::OnceCell;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use walcache_schemas::{Lsn, Registry};

use crate::{Env, unique};

/// The Incentives table as a real service would have it: the contract's columns, without the
/// constraints the contract adds (legacy rows may break them).
pub const COURIER_TABLE: &str = "
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
)";

/// Contract `courier_performance` v2 as a SQL predicate, written from its .avsc: required
/// fields present, the tier one of the enum's symbols, numbers within `walcache.min/max`,
/// timestamps finite and in the common era (the table's own types do the rest).
pub const CONTRACT_HOLDS: &str = "courier_id IS NOT NULL AND city IS NOT NULL \
     AND tier IS NOT NULL AND tier::text IN ('bronze', 'silver', 'gold', 'platinum') \
     AND rating IS NOT NULL AND rating BETWEEN 0 AND 5 \
     AND deliveries IS NOT NULL AND deliveries >= 0 \
     AND on_time_rate IS NOT NULL AND on_time_rate BETWEEN 0 AND 1 \
     AND (acceptance_rate IS NULL OR acceptance_rate BETWEEN 0 AND 1) \
     AND cancellations IS NOT NULL AND cancellations >= 0 AND active IS NOT NULL \
     AND updated_at IS NOT NULL AND isfinite(updated_at) AND updated_at >= '0001-01-01 00:00:00+00'";

/// Connects to `database` of the shared cluster as the superuser.
pub async fn connect(env: &Env, database: &str) -> Client {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(env.pg_port)
        .user("postgres")
        .password(env.pg_password.as_str())
        .dbname(database)
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {database}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

static CLEANED: OnceCell<()> = OnceCell::const_new();

/// Drops what earlier runs left: inactive test slots, then test databases.
async fn clean_leftovers(env: &Env) {
    let admin = connect(env, "postgres").await;
    let _ = admin
        .batch_execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE NOT active AND slot_name LIKE 'tslot\\_%'",
        )
        .await;
    let dbs = admin
        .query(
            "SELECT datname::text FROM pg_database d WHERE datname LIKE 'tdb\\_%' \
             AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.database = d.datname)",
            &[],
        )
        .await
        .unwrap_or_default();
    for row in dbs {
        let name: String = row.get(0);
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
    }
}

/// A database of its own for one test.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub name: String,
    pub env: &'static Env,
}

impl TestDb {
    /// A fresh database with an empty courier_performance table.
    pub async fn create() -> TestDb {
        Self::create_in(Env::get()).await
    }

    pub async fn create_in(env: &'static Env) -> TestDb {
        Self::create_named(env, &unique("tdb")).await
    }

    /// A fresh database where `ddl` creates courier_performance in a shape of its own
    /// (generated columns, partitions, ...).
    pub async fn create_with_table(ddl: &str) -> TestDb {
        let env = Env::get();
        let db = Self::create_named(env, &unique("tdb")).await;
        db.client()
            .await
            .batch_execute(&format!("DROP TABLE courier_performance; {ddl}"))
            .await
            .unwrap_or_else(|e| panic!("create the table: {e}"));
        db
    }

    /// A fresh database called `name` (dropped first if it exists).
    pub async fn create_named(env: &'static Env, name: &str) -> TestDb {
        CLEANED.get_or_init(|| clean_leftovers(env)).await;
        let name = name.to_string();
        let admin = connect(env, "postgres").await;
        // Two statements: neither may run inside a (multi-statement) transaction.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await
            .unwrap_or_else(|e| panic!("drop database {name}: {e}"));
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        let db = TestDb { name, env };
        db.client().await.batch_execute(COURIER_TABLE).await.expect("create courier_performance");
        db
    }

    pub async fn client(&self) -> Client {
        connect(self.env, &self.name).await
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB` (the password comes from the env's file).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.env.pg_port, self.name)
    }

    /// Inserts clean rows with ids `from..from+count`.
    pub async fn seed(&self, from: i64, count: i64) {
        self.client()
            .await
            .execute(
                "INSERT INTO courier_performance (courier_id, city, zone, tier, rating, deliveries, on_time_rate, acceptance_rate, notes) \
                 SELECT g, (ARRAY['Lisbon','Porto','Braga'])[1 + g % 3], 'z' || (g % 7), \
                        (ARRAY['bronze','silver','gold','platinum'])[1 + (g % 4)::int], \
                        round((3 + (g % 200) / 100.0)::numeric, 2), (g % 500)::int, 0.8 + (g % 20) / 100.0, \
                        CASE WHEN g % 2 = 0 THEN 0.5 END, CASE WHEN g % 5 = 0 THEN 'note ' || g END \
                 FROM generate_series($1::int8, $1::int8 + $2::int8 - 1) g",
                &[&from, &count],
            )
            .await
            .expect("seed rows");
    }

    /// The table as the contract sees it: every row that satisfies the contract, as the JSON
    /// the query API would return. Rows that break the contract are left out (they belong on
    /// the dead-letter topic, not in the view).
    ///
    /// The oracle is Postgres itself, not the producer's parser: values are formatted by SQL
    /// (`to_char`, `numeric::text`, `json_build_object`) in a session that pins its own output
    /// settings, and validity is a SQL predicate written from the contract. A parser defect,
    /// or a setting that changes how Postgres prints a value, therefore shows up as a
    /// difference instead of vanishing on both sides.
    pub async fn contract_view(&self) -> BTreeMap<i64, Map<String, Json>> {
        self.contract_view_of("courier_performance").await
    }

    /// [`contract_view`](Self::contract_view) of another table with the same columns.
    pub async fn contract_view_of(&self, table: &str) -> BTreeMap<i64, Map<String, Json>> {
        let client = self.client().await;
        let messages = client
            .simple_query(&format!(
                "SET extra_float_digits = 1; \
                 SELECT json_build_object( \
                   'courier_id', courier_id, 'city', city, 'zone', zone, 'tier', tier::text, \
                   'rating', rating::text, 'deliveries', deliveries, 'on_time_rate', on_time_rate, \
                   'acceptance_rate', acceptance_rate, 'cancellations', cancellations, 'active', active, \
                   'notes', notes, \
                   'updated_at', to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))::text \
                 FROM {table} WHERE {CONTRACT_HOLDS}"
            ))
            .await
            .expect("read table");
        let mut out = BTreeMap::new();
        for m in messages {
            let SimpleQueryMessage::Row(row) = m else {
                continue;
            };
            let Json::Object(mut json) = serde_json::from_str(row.get(0).expect("row")).expect("json") else {
                panic!("json_build_object returned a non-object");
            };
            // Postgres prints a double that is a whole number as `1`: the contract holds a double.
            for field in ["on_time_rate", "acceptance_rate"] {
                if let Some(v) = json.get(field).and_then(Json::as_f64) {
                    json.insert(field.into(), serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number));
                }
            }
            let id = json["courier_id"].as_i64().expect("id");
            out.insert(id, json);
        }
        out
    }

    /// Keys of the rows that break the contract (they must be on the dead-letter topic).
    pub async fn contract_violations(&self) -> Vec<i64> {
        let client = self.client().await;
        let rows = client
            .query(&format!("SELECT courier_id FROM courier_performance WHERE NOT ({CONTRACT_HOLDS}) ORDER BY 1"), &[])
            .await
            .expect("read violations");
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// One row as the old synchronous path would read it (None when absent or invalid).
    pub async fn courier(&self, id: i64) -> Option<walcache_schemas::CourierPerformance> {
        let registry = Registry::builtin().expect("registry");
        let plan = &registry.contract("courier_performance").expect("contract").latest().row;
        let select = plan.fields.iter().map(|f| format!("{}::text", f.name)).collect::<Vec<_>>().join(", ");
        let client = self.client().await;
        let rows = client
            .simple_query(&format!(
                "SET TimeZone = 'UTC'; SELECT {select} FROM courier_performance WHERE courier_id = {id}"
            ))
            .await
            .expect("read row");
        let row = rows.into_iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })?;
        let mut buf = Vec::new();
        for (i, field) in plan.fields.iter().enumerate() {
            match row.get(i) {
                Some(text) => field.write_text(&mut buf, text.as_bytes()).ok()?,
                None => field.write_null(&mut buf).ok()?,
            }
        }
        serde_json::from_value(Json::Object(plan.row_to_json(&buf).ok()?)).ok()
    }

    pub async fn current_lsn(&self) -> Lsn {
        let text: String =
            self.client().await.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0);
        text.parse().expect("lsn parses")
    }

    /// The slot's confirmed_flush_lsn, if the slot exists.
    pub async fn slot_confirmed(&self, slot: &str) -> Option<Lsn> {
        let row = self
            .client()
            .await
            .query_opt("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .expect("slot");
        row.and_then(|r| r.get::<_, Option<String>>(0)).map(|t| t.parse().expect("lsn"))
    }
}
