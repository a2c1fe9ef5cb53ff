//! The SQLite schema, brought up to date at open. The bookkeeping is sqlx's own
//! (`_sqlx_migrations`: version, description, SHA-384 of the SQL), which the SQLite store used
//! before it moved to rusqlite, so a data directory moves between builds either way.

use std::collections::HashMap;
use std::time::Instant;

use rusqlite::Connection;
use sha2::{Digest, Sha384};

use crate::store::StoreError;

/// The migrations, in order: version, description, SQL.
const MIGRATIONS: [(i64, &str, &str); 5] = [
    (
        1,
        "records",
        include_str!("../../../migrations/sqlite/0001_records.sql"),
    ),
    (
        2,
        "secrets",
        include_str!("../../../migrations/sqlite/0002_secrets.sql"),
    ),
    (
        3,
        "webhooks",
        include_str!("../../../migrations/sqlite/0003_webhooks.sql"),
    ),
    (
        4,
        "channel history",
        include_str!("../../../migrations/sqlite/0004_channel_history.sql"),
    ),
    (
        5,
        "publish keys",
        include_str!("../../../migrations/sqlite/0005_publish_keys.sql"),
    ),
];

const BOOKKEEPING: &str = "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    success BOOLEAN NOT NULL,
    checksum BLOB NOT NULL,
    execution_time BIGINT NOT NULL
)";

/// Applies the migrations the database lacks, each in its own transaction; refuses a database
/// whose applied migrations differ from these or come from a newer build.
pub(super) fn run(connection: &mut Connection) -> Result<(), StoreError> {
    connection.execute_batch(BOOKKEEPING)?;
    let applied: HashMap<i64, (bool, Vec<u8>)> = {
        let mut statement =
            connection.prepare("SELECT version, success, checksum FROM _sqlx_migrations")?;
        statement
            .query_map([], |row| Ok((row.get(0)?, (row.get(1)?, row.get(2)?))))?
            .collect::<Result<_, _>>()?
    };
    let known = MIGRATIONS.map(|(version, _, _)| version);
    if let Some(newer) = applied.keys().find(|version| !known.contains(version)) {
        return Err(StoreError::Schema(format!(
            "the database has migration {newer}, which this build does not know: it was opened \
             by a newer duplex"
        )));
    }
    for (version, description, sql) in MIGRATIONS {
        let checksum = Sha384::digest(sql).to_vec();
        match applied.get(&version) {
            Some((true, applied)) if *applied == checksum => continue,
            Some((true, _)) => {
                return Err(StoreError::Schema(format!(
                    "migration {version} ({description}) was applied with different SQL"
                )));
            }
            Some((false, _)) => {
                return Err(StoreError::Schema(format!(
                    "migration {version} ({description}) failed earlier; the database needs repair"
                )));
            }
            None => {
                let started = Instant::now();
                let transaction = connection.transaction()?;
                transaction.execute_batch(sql)?;
                transaction.execute(
                    "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
                     execution_time) VALUES (?1, ?2, TRUE, ?3, ?4)",
                    (
                        version,
                        description,
                        &checksum,
                        i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX),
                    ),
                )?;
                transaction.commit()?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::run;
    use crate::store::StoreError;

    #[test]
    fn migrations_apply_once_and_refuse_a_changed_or_newer_schema() {
        let mut connection = Connection::open_in_memory().expect("open");
        run(&mut connection).expect("first run");
        run(&mut connection).expect("a second run changes nothing");
        let applied: i64 = connection
            .query_row("SELECT COUNT(*) FROM _sqlx_migrations", [], |row| {
                row.get(0)
            })
            .expect("count");
        assert_eq!(applied, super::MIGRATIONS.len() as i64);
        connection
            .execute("INSERT INTO records (collection, id, version, created_us, updated_us, doc) VALUES ('c', 'a', 1, 0, 0, '{}')", [])
            .expect("the records table is there");

        connection
            .execute(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
                 execution_time) VALUES (99, 'later', TRUE, x'00', 0)",
                [],
            )
            .expect("insert");
        let newer = run(&mut connection).expect_err("a newer database is refused");
        assert!(
            matches!(&newer, StoreError::Schema(why) if why.contains("newer")),
            "{newer:?}"
        );
        connection
            .execute("DELETE FROM _sqlx_migrations WHERE version = 99", [])
            .expect("delete");

        connection
            .execute(
                "UPDATE _sqlx_migrations SET checksum = x'00' WHERE version = 1",
                [],
            )
            .expect("update");
        let changed = run(&mut connection).expect_err("changed SQL is refused");
        assert!(
            matches!(&changed, StoreError::Schema(why) if why.contains("different SQL")),
            "{changed:?}"
        );
    }
}
