//! Bad input and failures: each gets a clear error naming the problem.

use std::time::Duration;

use crate::fixture::{federation, keyed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_are_refused_with_what_to_change() {
    let fed = federation(2).await;
    let mut client = fed.client().await;
    let dp = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6)";
    let cases = [
        ("SELEC COUNT(*) FROM person".to_string(), "syntax error"),
        (
            format!("{dp} COUNT(*) FROM persons"),
            "table persons is not in the network catalog",
        ),
        (format!("{dp} COUNT(*) FROM person WHERE yob > 1950"), "yob"),
        (
            format!("{dp} year_of_birth, COUNT(*) FROM person GROUP BY gender_concept_id"),
            "year_of_birth is neither",
        ),
        (
            format!("{dp} person_id FROM person"),
            "person_id is neither a GROUP BY key",
        ),
        (
            format!(
                "{dp} COUNT(*) FROM person WHERE year_of_birth > (SELECT AVG(year_of_birth) FROM person)"
            ),
            "scalar subquery over person-level tables",
        ),
        (
            format!("{dp} MAX(year_of_birth) FROM person"),
            "MAX on private values is not allowed",
        ),
        (
            "SELECT COUNT(*) FROM person".to_string(),
            "needs the DP clause",
        ),
        (
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1) COUNT(*) FROM person"
                .to_string(),
            "needs delta > 0",
        ),
        (
            format!("{dp} COUNT(*) OVER () FROM person"),
            "window functions",
        ),
    ];
    for (sql, want) in cases {
        let err = client
            .run(&sql, Some("test"))
            .await
            .expect_err(&sql)
            .to_string();
        assert!(err.contains(want), "{sql}\n  gave: {err}\n  want: {want}");
    }
    fed.federation.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_is_down_is_named() {
    let mut fed = federation(2).await;
    let mut client = fed.client().await;
    let sql = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) COUNT(*) AS n FROM person";
    client.run(sql, Some("test")).await.expect("both nodes up");

    let down = fed.federation.nodes.pop().expect("a node");
    let name = down.label.trim_start_matches("node ").to_string();
    down.kill().await.expect("kill node");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let err = client
        .run(sql, Some("test"))
        .await
        .expect_err("a node is down")
        .to_string();
    assert!(err.contains(&name), "error should name {name}: {err}");
    fed.federation.stop().await.expect("clean stop");
}

/// Expressions that fail on some rows never fail a DP query in a way that
/// quotes a row: casts are made safe (TRY_CAST) and divisors NULLIF(d, 0),
/// so those rows count as NULL; what could still fail on a value (a
/// function off the allowlist, integer division by a column) is refused
/// before any node runs it, nothing charged, without quoting a value
/// (issue 13, shapes 5 and 6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_expressions_never_quote_a_row() {
    let fed = federation(2).await;
    let mut client = fed.client().await;
    let ctx = crate::fixture::plain_gibleed().await;
    let dp = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6)";
    let persons = crate::fixture::single_i64(
        &crate::fixture::plain(&ctx, "SELECT COUNT(*) FROM person").await,
    );
    for condition in [
        // person_source_value holds UUIDs: no value converts.
        "CAST(person_source_value AS BIGINT) IS NULL",
        "person_source_value::BIGINT IS NULL",
        "CAST(year_of_birth AS DOUBLE) / (gender_concept_id - gender_concept_id) IS NULL",
        "CAST(year_of_birth AS DOUBLE) % (gender_concept_id - gender_concept_id) IS NULL",
    ] {
        let sql = format!("{dp} COUNT(*) AS n FROM person WHERE {condition}");
        let answer = client.run(&sql, Some("test")).await.expect(&sql);
        assert_eq!(
            crate::fixture::single_i64(&answer.batches),
            persons,
            "{condition}"
        );
    }
    let spent = |batches: &[arrow::array::RecordBatch]| keyed(batches, 1, &["spent_rho"]);
    let before = spent(
        &client
            .run("SHOW PRIVACY BUDGET FOR STUDY test", Some("test"))
            .await
            .expect("show budget")
            .batches,
    );
    let refused = [
        (
            "to_timestamp(person_source_value) > TIMESTAMP '2000-01-01 00:00:00'",
            "to_timestamp may fail on some rows",
        ),
        (
            "year_of_birth / (gender_concept_id - gender_concept_id) IS NULL",
            "divide as floating point",
        ),
        ("person_source_value = 5", "quoted literal"),
        (
            "make_date(year_of_birth, 1, 1) > DATE '2000-01-01'",
            "make_date",
        ),
    ];
    let source =
        std::fs::read_to_string(crate::fixture::gibleed().join("PERSON.csv")).expect("PERSON.csv");
    for (condition, want) in refused {
        let sql = format!("{dp} COUNT(*) AS n FROM person WHERE {condition}");
        let err = client
            .run(&sql, Some("test"))
            .await
            .expect_err(condition)
            .to_string();
        assert!(err.contains(want), "{condition}: {err}");
        for line in source.lines().skip(1) {
            let value = line.split(',').nth(11).expect("person_source_value");
            assert!(!err.contains(value), "the error quotes {value}: {err}");
        }
    }
    // Refused before any node ran them: nothing was charged.
    let after = spent(
        &client
            .run("SHOW PRIVACY BUDGET FOR STUDY test", Some("test"))
            .await
            .expect("show budget")
            .batches,
    );
    for site in ["site-a", "site-b"] {
        assert_eq!(before[site][0], after[site][0], "{site}: nothing charged");
    }
    fed.federation.stop().await.expect("clean stop");
}

/// The node binary refuses to start on a broken catalog, naming the file,
/// the column and the problem: here a value that is not a number, 20,000
/// rows into the file (every row of a text source is parsed at start). The
/// value itself is not shown: errors and logs never carry row data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_broken_catalog_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut csv = String::from(
        "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n",
    );
    for p in 0..20_000 {
        csv.push_str(&format!("{p},8507,1950,0,0\n"));
    }
    csv.push_str("20000,8532,nineteen-fifty,0,0\n");
    std::fs::write(dir.path().join("person.csv"), csv).expect("csv");
    let key = confer_protocol::signing::Identity::generate()
        .expect("key")
        .public_hex();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"n\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ncoordinator_key = \"{key}\"\n\
             [tables.person]\npath = \"person.csv\"\nprivacy_unit = \"person_id\"\n"
        ),
    )
    .expect("node.toml");
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_confer"))
        .args(["node", "--insecure-loopback", "--config"])
        .arg(&config)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the node must exit, not serve")
        .expect("run confer node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("table person (")
            && stderr.contains("person.csv")
            && stderr.contains("values do not match the declared types")
            && stderr
                .contains("line 20001, column year_of_birth: a value that is not a valid Int64"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("nineteen"),
        "row data in the error: {stderr}"
    );
}

/// Long operator chains and oversized statements are refused with what to
/// change; chains up to the limit are planned; no process aborts (a chain
/// of 400 terms used to overflow a server's stack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_and_long_statements_never_abort_a_server() {
    let fed = federation(2).await;
    let mut client = fed.client().await;
    let dp = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6)";
    let ors = |n: usize, column: &str| {
        (0..n)
            .map(|i| format!("{column} = {i}"))
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    let plus = |n: usize| vec!["year_of_birth"; n].join(" + ");
    // At the limit: planned and answered (or refused by the dialect's own
    // rules), by the coordinator and the nodes alike.
    for sql in [
        format!(
            "{dp} COUNT(*) AS n FROM person WHERE {}",
            ors(240, "year_of_birth")
        ),
        format!("{dp} COUNT(*) AS n FROM person WHERE {} > 0", plus(480)),
        format!(
            "SELECT COUNT(*) FROM concept WHERE {}",
            ors(240, "concept_id")
        ),
    ] {
        let _ = client.run(&sql, Some("test")).await;
    }
    // Beyond it, or too long: refused before planning.
    let err = client
        .run(
            &format!("{dp} COUNT(*) AS n FROM person WHERE {} > 0", plus(600)),
            Some("test"),
        )
        .await
        .expect_err("too many operators")
        .to_string();
    assert!(err.contains("at most 500 are accepted"), "{err}");
    let long = format!(
        "{dp} COUNT(*) AS n FROM person WHERE year_of_birth IN ({})",
        vec!["1"; 140_000].join(", ")
    );
    let err = client
        .run(&long, Some("test"))
        .await
        .expect_err("too long")
        .to_string();
    assert!(err.contains("bytes long"), "{err}");
    // Larger than any request: refused as it is decoded, before the token
    // is read.
    let huge = format!(
        "{dp} COUNT(*) AS n FROM person WHERE year_of_birth IN ({})",
        vec!["1"; 2_000_000].join(", ")
    );
    let err = client
        .run(&huge, Some("test"))
        .await
        .expect_err("too large")
        .to_string();
    assert!(err.contains("too large"), "{err}");
    // Everyone is still up.
    let answer = client
        .run(&format!("{dp} COUNT(*) AS n FROM person"), Some("test"))
        .await
        .expect("servers alive");
    assert_eq!(
        answer.batches.iter().map(|b| b.num_rows()).sum::<usize>(),
        1
    );
    fed.federation.stop().await.expect("clean stop");
}

/// Garbage tickets: the coordinator says what to send instead of a decode
/// error, and a node audits a burst of them as one record (and one summary
/// once its window ends), so nobody without the coordinator's key can grow
/// its audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_tickets_get_a_clear_answer_and_one_audit_record() {
    use arrow_flight::Ticket;
    use arrow_flight::flight_service_client::FlightServiceClient;
    let fed = federation(1).await;
    let connect = |url: String| async move {
        tonic::transport::Endpoint::from_shared(url)
            .expect("url")
            .connect()
            .await
            .expect("connect")
    };
    let mut coordinator = FlightServiceClient::new(connect(fed.federation.url()).await);
    let err = coordinator
        .do_get(Ticket::new(b"\xff\xff garbage".to_vec()))
        .await
        .expect_err("garbage ticket");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("GetFlightInfo"), "{}", err.message());

    // Planned statements are capped per user: past the cap the oldest is
    // forgotten, with a message that says what to do.
    let mut sql =
        arrow_flight::sql::client::FlightSqlServiceClient::new(connect(fed.federation.url()).await);
    sql.set_token(fed.federation.tokens["tester"].clone());
    sql.set_header(confer_coordinator::service::STUDY_HEADER, "test");
    let count = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) COUNT(*) AS n FROM person";
    let mut tickets = Vec::new();
    for _ in 0..=confer_coordinator::service::MAX_STATEMENTS_PER_USER {
        let info = sql.execute(count.to_string(), None).await.expect("planned");
        tickets.push(info.endpoint[0].ticket.clone().expect("ticket"));
    }
    let err = match sql.do_get(tickets[0].clone()).await {
        Ok(_) => panic!("the oldest is forgotten"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("unknown or expired"), "{err}");
    let newest = tickets[tickets.len() - 1].clone();
    let fetch =
        |sql: &mut arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
         ticket: Ticket| {
            let mut sql = sql.clone();
            async move {
                use futures::TryStreamExt;
                let stream = sql.do_get(ticket).await.expect("the newest is kept");
                stream
                    .try_collect::<Vec<arrow::array::RecordBatch>>()
                    .await
                    .expect("answer")
            }
        };
    let first = fetch(&mut sql, newest.clone()).await;
    // A client's retry of the same statement is the same task: the node
    // answers from its ledger, charging nothing more.
    let ledger = fed
        .federation
        .work_dir
        .join("state")
        .join("site-a")
        .join("ledger.sqlite");
    let debits = || -> (i64, f64) {
        rusqlite::Connection::open(&ledger)
            .expect("ledger")
            .query_row("SELECT COUNT(*), SUM(rho) FROM releases", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("sum")
    };
    let before = debits();
    let again = fetch(&mut sql, newest).await;
    assert_eq!(debits(), before, "a retry is not charged again");
    let columns = |b: &[arrow::array::RecordBatch]| -> Vec<arrow::array::ArrayRef> {
        b.iter().flat_map(|b| b.columns().to_vec()).collect()
    };
    assert_eq!(
        columns(&first),
        columns(&again),
        "a retry gets the same answer"
    );

    let node = &fed.federation.nodes[0];
    let mut client = FlightServiceClient::new(connect(format!("http://{}", node.addr)).await);
    let audit = fed
        .federation
        .work_dir
        .join("state")
        .join("site-a")
        .join("ledger.sqlite");
    let unverified = || -> i64 {
        rusqlite::Connection::open(&audit)
            .expect("ledger")
            .query_row(
                "SELECT COUNT(*) FROM audit WHERE task_id IS NULL AND decision = 'refused'",
                [],
                |r| r.get(0),
            )
            .expect("count")
    };
    let before = unverified();
    for i in 0..50 {
        let err = client
            .do_get(Ticket::new(format!("garbage {i}").into_bytes()))
            .await
            .expect_err("garbage ticket");
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{}",
            err.message()
        );
    }
    assert!(
        unverified() - before <= 1,
        "50 garbage tickets wrote {} audit records",
        unverified() - before
    );
    fed.federation.stop().await.expect("clean stop");
}
