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
    pub async fn contract_view(&self) -> BTreeMap<i64, Map<String, Json>> {
        let registry = Registry::builtin().expect("registry");
        let row_plan = &registry.contract("courier_performance").expect("contract").latest().row;
        let select = row_plan.fields.iter().map(|f| format!("{}::text", f.name)).collect::<Vec<_>>().join(", ");
        let client = self.client().await;
        let messages = client
            .simple_query(&format!("SET TimeZone = 'UTC'; SELECT {select} FROM courier_performance"))
            .await
            .expect("read table");
        let mut out = BTreeMap::new();
        let mut buf = Vec::new();
        'rows: for m in messages {
            let SimpleQueryMessage::Row(row) = m else {
                continue;
            };
            buf.clear();
            for (i, field) in row_plan.fields.iter().enumerate() {
                let ok = match row.get(i) {
                    Some(text) => field.write_text(&mut buf, text.as_bytes()),
                    None => field.write_null(&mut buf),
                };
                if ok.is_err() {
                    continue 'rows;
                }
            }
            let json = row_plan.row_to_json(&buf).expect("decode our own row");
            let id = json["courier_id"].as_i64().expect("id");
            out.insert(id, json);
        }
        out
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
