use super::*;

fn v1(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS notes (body TEXT NOT NULL)")
}

fn v2(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("ALTER TABLE notes ADD COLUMN at_ms INTEGER NOT NULL DEFAULT 0")
}

fn broken(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("ALTER TABLE notes ADD COLUMN tag TEXT; ALTER TABLE nowhere ADD COLUMN x")
}

const ONE: Schema = Schema {
    kind: "node ledger",
    application_id: NODE_LEDGER_ID,
    legacy_tables: &["notes"],
    migrations: &[Migration {
        what: "notes",
        apply: v1,
    }],
};

const TWO: Schema = Schema {
    migrations: &[
        Migration {
            what: "notes",
            apply: v1,
        },
        Migration {
            what: "note times",
            apply: v2,
        },
    ],
    ..ONE
};

fn version(path: &Path) -> (i64, i64) {
    let conn = Connection::open(path).expect("open");
    (
        conn.query_row("PRAGMA application_id", [], |r| r.get(0))
            .expect("id"),
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version"),
    )
}

#[test]
fn a_new_file_is_created_at_the_current_version_without_a_backup() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("sub/store.sqlite");
    assert_eq!(inspect(&path, &TWO).expect("inspect"), Found::Missing);
    let opened = open(&path, &TWO).expect("open");
    assert_eq!((opened.from, opened.version), (0, 2));
    assert!(opened.backup.is_none());
    drop(opened);
    assert_eq!(version(&path), (i64::from(NODE_LEDGER_ID), 2));
    assert_eq!(inspect(&path, &TWO).expect("inspect"), Found::Current(2));
    // Opening again changes nothing.
    let again = open(&path, &TWO).expect("reopen");
    assert_eq!((again.from, again.version), (2, 2));
    assert!(again.backup.is_none());
}

#[test]
fn an_older_file_is_copied_aside_then_upgraded_keeping_its_rows() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("store.sqlite");
    {
        let opened = open(&path, &ONE).expect("open v1");
        opened
            .conn
            .execute("INSERT INTO notes (body) VALUES ('kept')", [])
            .expect("insert");
    }
    assert_eq!(
        inspect(&path, &TWO).expect("inspect"),
        Found::Older { from: 1, to: 2 }
    );
    let opened = open(&path, &TWO).expect("upgrade");
    assert_eq!((opened.from, opened.version), (1, 2));
    let body: (String, i64) = opened
        .conn
        .query_row("SELECT body, at_ms FROM notes", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("row");
    assert_eq!(body, ("kept".to_string(), 0));
    let backup = opened.backup.clone().expect("a backup");
    assert_eq!(
        backup.file_name().and_then(|n| n.to_str()),
        Some("store.sqlite.schema-v1.bak")
    );
    // The backup is the old file: version 1, same rows, readable by the old
    // binary.
    assert_eq!(version(&backup), (i64::from(NODE_LEDGER_ID), 1));
    let old = open(&backup, &ONE).expect("old binary opens the backup");
    let n: i64 = old
        .conn
        .query_row("SELECT COUNT(*) FROM notes", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 1);
}

#[test]
fn a_file_written_before_versions_is_upgraded_from_zero() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("store.sqlite");
    {
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(
            "CREATE TABLE notes (body TEXT NOT NULL); INSERT INTO notes VALUES ('old');",
        )
        .expect("legacy");
    }
    assert_eq!(
        inspect(&path, &TWO).expect("inspect"),
        Found::Older { from: 0, to: 2 }
    );
    let opened = open(&path, &TWO).expect("upgrade");
    assert_eq!(opened.from, 0);
    assert!(opened.backup.is_some());
    drop(opened);
    assert_eq!(version(&path), (i64::from(NODE_LEDGER_ID), 2));
}

#[test]
fn a_newer_file_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("store.sqlite");
    drop(open(&path, &TWO).expect("open v2"));
    let before = std::fs::read(&path).expect("read");
    let err = open(&path, &ONE).expect_err("an older binary refuses");
    let text = err.to_string();
    assert!(
        matches!(
            err,
            StoreError::Newer {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("written by a newer confer"), "{text}");
    assert!(text.contains("reads versions up to 1"), "{text}");
    assert!(inspect(&path, &ONE).is_err());
    assert_eq!(std::fs::read(&path).expect("read"), before);
}

#[test]
fn another_kind_of_store_is_refused_and_named() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("store.sqlite");
    let coordinator = Schema {
        kind: "coordinator store",
        application_id: COORDINATOR_STORE_ID,
        legacy_tables: &["users"],
        ..ONE
    };
    drop(open(&path, &coordinator).expect("open"));
    let text = open(&path, &ONE).expect_err("refused").to_string();
    assert!(
        text.contains("holds a confer coordinator store, not a confer node ledger"),
        "{text}"
    );

    // Unversioned: recognised by its tables.
    let legacy = dir.path().join("legacy.sqlite");
    Connection::open(&legacy)
        .expect("open")
        .execute_batch("CREATE TABLE users (name TEXT)")
        .expect("table");
    let text = open(&legacy, &ONE).expect_err("refused").to_string();
    assert!(
        text.contains("coordinator store written before schema versions"),
        "{text}"
    );

    // Someone else's.
    let other = dir.path().join("other.sqlite");
    Connection::open(&other)
        .expect("open")
        .execute_batch("CREATE TABLE invoices (id INTEGER)")
        .expect("table");
    let text = open(&other, &ONE).expect_err("refused").to_string();
    assert!(
        text.contains("another program's database (tables invoices)"),
        "{text}"
    );
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("store.sqlite");
    std::fs::write(
        &path,
        "name = \"site-a\"\nthis is a config, not a database\n",
    )
    .expect("write");
    let err = open(&path, &ONE).expect_err("refused");
    assert!(matches!(err, StoreError::NotSqlite { .. }), "{err}");
    assert!(err.to_string().contains("is not a SQLite database"));
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        "name = \"site-a\"\nthis is a config, not a database\n"
    );
    assert!(matches!(
        inspect(&path, &ONE),
        Err(StoreError::NotSqlite { .. })
    ));
}

#[test]
fn a_failed_migration_leaves_the_file_as_it_was() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("store.sqlite");
    drop(open(&path, &ONE).expect("open v1"));
    let bad = Schema {
        migrations: &[
            Migration {
                what: "notes",
                apply: v1,
            },
            Migration {
                what: "tags",
                apply: broken,
            },
        ],
        ..ONE
    };
    let err = open(&path, &bad).expect_err("fails");
    let text = err.to_string();
    assert!(text.contains("at \"tags\""), "{text}");
    assert!(text.contains("the file is unchanged"), "{text}");
    assert_eq!(version(&path).1, 1);
    // The half-applied step did not stick: the column is not there.
    let conn = Connection::open(&path).expect("open");
    assert!(conn.prepare("SELECT tag FROM notes").is_err());
    // And the good upgrade still works afterwards.
    drop(conn);
    assert_eq!(open(&path, &TWO).expect("upgrade").version, 2);
}
