//! Prerequisite checks, shared by `walcache-producer check` (a full report for the operator)
//! and session start-up (the first failure stops the daemon with the same message).
//!
//! Each finding names the problem and the fix: "wal_level is replica" -> "set wal_level =
//! logical in postgresql.conf and restart Postgres".

use std::fmt;
use std::sync::Arc;

use walcache_common::kafka::{Metadata, TopicFacts, describe_topic};
use walcache_schemas::FieldKind;

use crate::ProducerError;
use crate::binding::{TableRuntime, pg_type_fits, pg_type_is_toastable};
use crate::config::{PgConnection, ProducerConfig};
use crate::postgres::{Control, quote_ident};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub problem: String,
    pub fix: String,
}

/// Everything a check found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, level: Level, problem: impl Into<String>, fix: impl Into<String>) {
        self.findings.push(Finding { level, problem: problem.into(), fix: fix.into() });
    }

    fn ok(&mut self, what: impl Into<String>) {
        self.add(Level::Ok, what, "");
    }

    pub fn failed(&self) -> bool {
        self.findings.iter().any(|f| f.level == Level::Fail)
    }

    pub fn first_failure(&self) -> Option<&Finding> {
        self.findings.iter().find(|f| f.level == Level::Fail)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            let tag = match finding.level {
                Level::Ok => "ok  ",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            if finding.fix.is_empty() {
                writeln!(f, "{tag} {}", finding.problem)?;
            } else {
                writeln!(f, "{tag} {}\n     -> {}", finding.problem, finding.fix)?;
            }
        }
        Ok(())
    }
}

/// Runs every check: configuration, Postgres, Kafka. Connection failures are findings too.
pub async fn run_check(config: &ProducerConfig) -> Report {
    let mut report = Report::default();
    if let Err(e) = config.validate() {
        report.add(Level::Fail, e.to_string(), "fix the configuration file or WALCACHE_* variables");
        return report;
    }
    report.ok("configuration parses and validates");
    let tables: Vec<Arc<TableRuntime>> = match config.table_specs() {
        Ok(specs) => specs.into_iter().enumerate().filter_map(|(i, s)| TableRuntime::new(i, s).map(Arc::new)).collect(),
        Err(e) => {
            report.add(Level::Fail, e.to_string(), "fix [[tables]]");
            return report;
        }
    };
    match config.pg_connection() {
        Err(e) => report.add(Level::Fail, e.to_string(), "fix postgres.url"),
        Ok(pg) => match Control::connect(&pg, "walcache-producer-check").await {
            Err(e) => report.add(
                Level::Fail,
                format!("cannot connect to Postgres at {}: {}", pg.describe(), error_chain(&e)),
                "check postgres.url, the password (WALCACHE_POSTGRES__PASSWORD or postgres.password_file) and pg_hba.conf",
            ),
            Ok(control) => {
                report.ok(format!("connected to Postgres at {}", pg.describe()));
                if let Err(e) = postgres_checks(&control, &pg, config, &tables, &mut report).await {
                    report.add(Level::Fail, format!("checking Postgres failed: {}", error_chain(&e)), "see the error");
                }
            }
        },
    }
    kafka_checks(config, &tables, &mut report).await;
    report
}

/// Start-up gate: the first failure becomes a definite error.
pub async fn require_streaming_prerequisites(
    control: &Control,
    pg: &PgConnection,
    config: &ProducerConfig,
    tables: &[Arc<TableRuntime>],
) -> Result<(), ProducerError> {
    let mut report = Report::default();
    postgres_checks(control, pg, config, tables, &mut report).await?;
    for f in report.findings.iter().filter(|f| f.level == Level::Warn) {
        tracing::warn!(problem = %f.problem, fix = %f.fix, "prerequisite warning");
    }
    match report.first_failure() {
        Some(f) => Err(ProducerError::Prerequisite { problem: f.problem.clone(), fix: f.fix.clone() }),
        None => Ok(()),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

async fn postgres_checks(
    control: &Control,
    pg: &PgConnection,
    config: &ProducerConfig,
    tables: &[Arc<TableRuntime>],
    report: &mut Report,
) -> Result<(), ProducerError> {
    let db = control.client();
    let q = |what: &'static str| move |e| ProducerError::pg(what, e);

    let wal_level: String = db.query_one("SHOW wal_level", &[]).await.map_err(q("reading wal_level"))?.get(0);
    if wal_level == "logical" {
        report.ok("wal_level = logical");
    } else {
        report.add(
            Level::Fail,
            format!("wal_level is '{wal_level}', logical decoding needs 'logical'"),
            "set wal_level = logical in postgresql.conf and restart Postgres",
        );
    }

    let slot = &config.postgres.slot;
    let row = db
        .query_one(
            "SELECT current_setting('max_replication_slots')::int, current_setting('max_wal_senders')::int, \
             (SELECT count(*)::int FROM pg_replication_slots), \
             (SELECT count(*)::int FROM pg_replication_slots WHERE slot_name = $1)",
            &[slot],
        )
        .await
        .map_err(q("reading replication settings"))?;
    let (max_slots, max_senders, used, ours): (i32, i32, i32, i32) = (row.get(0), row.get(1), row.get(2), row.get(3));
    if max_senders < 1 {
        report.add(
            Level::Fail,
            "max_wal_senders is 0",
            "set max_wal_senders to at least 1 (10 is common) and restart Postgres",
        );
    }
    if ours == 0 && used >= max_slots {
        report.add(
            Level::Fail,
            format!("all {max_slots} replication slots are in use, none left for {slot}"),
            "raise max_replication_slots (restart needed) or drop unused slots with pg_drop_replication_slot",
        );
    } else {
        report.ok(format!("replication slots: {used} of {max_slots} used"));
    }

    let row = db
        .query_one("SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user", &[])
        .await
        .map_err(q("reading the role"))?;
    let (superuser, replication): (bool, bool) = (row.get(0), row.get(1));
    if superuser || replication {
        report.ok(format!("role {} may replicate", pg.user));
    } else {
        report.add(
            Level::Fail,
            format!("role {} lacks the REPLICATION attribute", pg.user),
            format!("run ALTER ROLE {} REPLICATION (as a superuser)", quote_ident(&pg.user)),
        );
    }

    let publication = &config.postgres.publication;
    let pub_row = db
        .query_opt(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(q("reading pg_publication"))?;
    if let Some(r) = &pub_row {
        let ops: [(bool, &str); 4] =
            [(r.get(1), "insert"), (r.get(2), "update"), (r.get(3), "delete"), (r.get(4), "truncate")];
        let missing: Vec<&str> = ops.iter().filter(|(on, _)| !on).map(|(_, n)| *n).collect();
        if !missing.is_empty() {
            // The slot would be confirmed past changes it never saw: refuse.
            report.add(
                Level::Fail,
                format!(
                    "publication {publication} does not publish {}: those changes would never reach the cache",
                    missing.join(", ")
                ),
                format!("ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete, truncate')"),
            );
        }
        if r.get::<_, bool>(0) {
            report.add(
                Level::Fail,
                format!("publication {publication} is FOR ALL TABLES: changes to tables walcache is not configured for would stop it"),
                format!("use a publication of the configured tables only: DROP PUBLICATION {publication} (walcache creates it)"),
            );
        }
    }

    for table in tables {
        table_checks(control, pg, config, table, pub_row.is_some(), report).await?;
    }

    if let Some(info) = control.slot_info(slot).await? {
        if info.plugin.as_deref() != Some("pgoutput") || info.database.as_deref() != Some(pg.database.as_str()) {
            report.add(
                Level::Fail,
                format!("slot {slot} exists for database {:?} with plugin {:?}", info.database, info.plugin),
                "choose another postgres.slot, or drop that slot if nothing uses it",
            );
        } else {
            report.ok(format!(
                "slot {slot} exists (confirmed {})",
                info.confirmed_flush.map_or("-".into(), |l| l.to_string())
            ));
        }
    } else {
        report.ok(format!("slot {slot} will be created on first start (with an initial snapshot)"));
    }
    Ok(())
}

async fn table_checks(
    control: &Control,
    pg: &PgConnection,
    config: &ProducerConfig,
    table: &TableRuntime,
    publication_exists: bool,
    report: &mut Report,
) -> Result<(), ProducerError> {
    let db = control.client();
    let name = &table.qualified;
    let row = db
        .query_opt(
            "SELECT c.oid::int8, c.relreplident::text, has_table_privilege(c.oid, 'SELECT'), \
                    pg_has_role(c.relowner, 'USAGE'), has_database_privilege(current_database(), 'CREATE') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.spec.schema, &table.spec.name],
        )
        .await
        .map_err(|e| ProducerError::pg("reading pg_class", e))?;
    let Some(row) = row else {
        report.add(
            Level::Fail,
            format!("table {name} does not exist in database {}", pg.database),
            "create the table, or fix tables.table in the configuration",
        );
        return Ok(());
    };
    let oid: i64 = row.get(0);
    let identity: String = row.get(1);
    let (can_select, owns, can_create): (bool, bool, bool) = (row.get(2), row.get(3), row.get(4));
    if !can_select {
        report.add(
            Level::Fail,
            format!("role {} may not SELECT from {name} (the initial snapshot reads it)", pg.user),
            format!("GRANT SELECT ON {name} TO {}", quote_ident(&pg.user)),
        );
    }

    let columns = db
        .query(
            "SELECT attname::text, atttypid::int8, attnotnull FROM pg_attribute \
             WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(|e| ProducerError::pg("reading pg_attribute", e))?;
    let column = |n: &str| columns.iter().find(|r| r.get::<_, String>(0) == n);
    let contract = table.spec.contract;
    let mut mismatches = 0;
    let mut toastable = Vec::new();
    for field in &table.version.row.fields {
        let Some(col) = column(&field.name) else {
            report.add(
                Level::Fail,
                format!(
                    "{name} has no column {}, which contract {} v{} requires",
                    field.name, contract.name, table.version.version
                ),
                "add the column, or pin an older contract version with tables.contract_version",
            );
            mismatches += 1;
            continue;
        };
        let type_oid = col.get::<_, i64>(1) as u32;
        if !pg_type_fits(type_oid, &field.kind) {
            report.add(
                Level::Fail,
                format!(
                    "{name}.{} has type oid {type_oid}, which cannot feed contract field {} ({})",
                    field.name,
                    field.name,
                    field.kind.describe()
                ),
                "change the column type or the contract",
            );
            mismatches += 1;
        }
        if field.nullable.is_none() && !col.get::<_, bool>(2) {
            report.add(
                Level::Warn,
                format!("{name}.{} allows NULL but contract {} requires a value", field.name, contract.name),
                "rows with NULL there go to the dead-letter topic; add NOT NULL once the data is clean",
            );
        }
        if pg_type_is_toastable(type_oid) && !matches!(field.kind, FieldKind::Decimal { .. }) {
            toastable.push(field.name.clone());
        }
    }
    if mismatches == 0 {
        report.ok(format!("{name} has every column of contract {} v{}", contract.name, table.version.version));
    }

    let key_fields: Vec<String> = contract.key_plan.fields.iter().map(|f| f.name.clone()).collect();
    let identity_index_columns = |primary: bool| async move {
        let flag = if primary { "indisprimary" } else { "indisreplident" };
        db.query_opt(
            &format!(
                "SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1::int8::oid AND i.{flag} GROUP BY i.indexrelid"
            ),
            &[&oid],
        )
        .await
        .map(|r| r.and_then(|r| r.get::<_, Option<Vec<String>>>(0)))
        .map_err(|e| ProducerError::pg("reading the replica identity index", e))
    };
    let fix_identity = format!(
        "ALTER TABLE {name} REPLICA IDENTITY DEFAULT with a primary key on ({}), or REPLICA IDENTITY FULL",
        key_fields.join(", ")
    );
    match identity.as_str() {
        "n" => report.add(
            Level::Fail,
            format!("{name} has REPLICA IDENTITY NOTHING: updates and deletes would carry no key"),
            fix_identity,
        ),
        "f" => report.ok(format!("{name} has REPLICA IDENTITY FULL")),
        kind => {
            let cols = identity_index_columns(kind == "d").await?;
            match cols {
                None => report.add(
                    Level::Fail,
                    format!("{name} has no primary key, so deletes would carry no key"),
                    fix_identity,
                ),
                Some(cols) if cols != key_fields => report.add(
                    Level::Fail,
                    format!(
                        "{name}'s replica identity is ({}) but contract {} is keyed by ({})",
                        cols.join(", "),
                        contract.name,
                        key_fields.join(", ")
                    ),
                    fix_identity,
                ),
                Some(_) => {
                    report.ok(format!("{name}'s replica identity matches the key ({})", key_fields.join(", ")));
                    if !toastable.is_empty() {
                        report.add(
                            Level::Warn,
                            format!(
                                "{name} stores values over about 2 kB of {} out of line (TOAST); an update that leaves such a value unchanged does not carry it",
                                toastable.join(", ")
                            ),
                            format!(
                                "the producer re-reads such a value by key, which is exact only while the row has not changed again; \
                                 otherwise the update is set aside (unchanged_toast) and the key reads unknown until its next change. \
                                 ALTER TABLE {name} REPLICA IDENTITY FULL carries the values in the stream"
                            ),
                        );
                    }
                }
            }
        }
    }

    let publication = &config.postgres.publication;
    if publication_exists {
        let listed = db
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[publication, &table.spec.schema, &table.spec.name],
            )
            .await
            .map_err(|e| ProducerError::pg("reading pg_publication_tables", e))?;
        if listed.is_none() && !owns {
            report.add(
                Level::Fail,
                format!("publication {publication} lacks {name} and role {} may not add it", pg.user),
                format!("as the table owner: ALTER PUBLICATION {publication} ADD TABLE {name}"),
            );
        } else if listed.is_none() {
            report.ok(format!("{name} will be added to publication {publication}"));
        }
    } else if !(owns && can_create) {
        report.add(
            Level::Fail,
            format!("publication {publication} does not exist and role {} may not create it for {name}", pg.user),
            format!("as the table owner: CREATE PUBLICATION {publication} FOR TABLE {name}"),
        );
    }
    Ok(())
}

async fn kafka_checks(config: &ProducerConfig, tables: &[Arc<TableRuntime>], report: &mut Report) {
    let kafka = &config.kafka;
    let metadata = match Metadata::new(kafka, "walcache-producer-check") {
        Ok(m) => m,
        Err(e) => {
            report.add(Level::Fail, e.to_string(), "fix kafka.properties");
            return;
        }
    };
    match metadata.ping().await {
        Ok(brokers) => report.ok(format!("reached Kafka at {} ({brokers} brokers)", kafka.bootstrap_servers)),
        Err(e) => {
            report.add(
                Level::Fail,
                format!("cannot reach Kafka at {}: {}", kafka.bootstrap_servers, error_chain(&e)),
                "check kafka.bootstrap_servers, the network and kafka.properties (security.protocol, sasl.*)",
            );
            return;
        }
    }
    let t = &config.topics;
    // (topic, the cleanup policy it needs, the partitions walcache gives it)
    let mut topics: Vec<(&str, &str, i32)> =
        tables.iter().map(|table| (table.spec.topic.as_str(), "compact", t.partitions)).collect();
    topics.push((t.watermarks.as_str(), "compact", 1));
    topics.push((t.dead_letter.as_str(), "delete", 1));
    for (topic, policy, partitions) in topics {
        match describe_topic(kafka, &metadata, topic).await {
            Ok(None) => report.ok(format!(
                "topic {topic} will be created ({partitions} partitions, replication factor {}, min.insync.replicas {}, {policy})",
                t.replication_factor,
                t.effective_min_insync_replicas()
            )),
            Ok(Some(facts)) => existing_topic_checks(config, topic, policy, partitions, &facts, report),
            Err(e) => report.add(Level::Warn, format!("cannot describe topic {topic}: {e}"), ""),
        }
    }
}

/// What is unsafe about a topic that already exists: walcache leaves existing topics as they
/// are, so `check` is where an operator learns that acks=all means one copy, or that a table
/// topic deletes rows a restoring consumer needs.
fn existing_topic_checks(
    config: &ProducerConfig,
    topic: &str,
    policy: &str,
    partitions: i32,
    facts: &TopicFacts,
    report: &mut Report,
) {
    let t = &config.topics;
    let alter = |setting: &str| {
        format!("kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config {setting}")
    };
    let mut problems = 0;
    if facts.partitions as i32 != partitions {
        report.add(
            Level::Warn,
            format!("topic {topic} has {} partitions, walcache would create it with {partitions}", facts.partitions),
            "existing topics are left as they are; the partition count only matters at creation",
        );
        problems += 1;
    }
    if (facts.replication_factor as i32) < t.replication_factor {
        report.add(
            Level::Warn,
            format!(
                "topic {topic} has replication factor {}, below topics.replication_factor ({}): losing {} broker(s) loses changes already confirmed to Postgres",
                facts.replication_factor,
                t.replication_factor,
                facts.replication_factor
            ),
            "reassign its partitions to more brokers (kafka-reassign-partitions.sh), or lower topics.replication_factor knowingly",
        );
        problems += 1;
    }
    if let Some(why) = &facts.configs_unreadable {
        report.add(
            Level::Warn,
            format!(
                "cannot read the configs of topic {topic} ({why}): cleanup.policy and min.insync.replicas unchecked"
            ),
            "grant DescribeConfigs on the topic to this principal",
        );
        return;
    }
    let actual_policy = facts.configs.get("cleanup.policy").map_or("delete", String::as_str);
    if policy == "compact" && !actual_policy.split(',').any(|p| p.trim() == "compact") {
        report.add(
            Level::Fail,
            format!(
                "topic {topic} has cleanup.policy={actual_policy}: rows older than its retention vanish, and a consumer restoring from it builds an incomplete view"
            ),
            alter("cleanup.policy=compact"),
        );
        problems += 1;
    }
    let min_isr: i32 = facts.configs.get("min.insync.replicas").and_then(|v| v.parse().ok()).unwrap_or(1);
    if facts.replication_factor >= 2 && min_isr < 2 {
        report.add(
            Level::Warn,
            format!("topic {topic} has min.insync.replicas={min_isr}: acks=all is satisfied by a single copy"),
            alter("min.insync.replicas=2"),
        );
        problems += 1;
    }
    if problems == 0 {
        report.ok(format!(
            "topic {topic} exists ({} partitions, replication factor {}, min.insync.replicas {min_isr}, {actual_policy})",
            facts.partitions, facts.replication_factor
        ));
    }
}
