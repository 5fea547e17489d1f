//! The bodies of confer's fuzz targets (`fuzz_targets/`), kept here so that
//! each target is one line and the fixtures are built once per process.
//!
//! Every body takes arbitrary bytes and drives real confer code as a
//! coordinator or a node would on input from the network. A refusal is a
//! correct answer; a panic, a stack overflow, a hang or runaway memory is a
//! finding (libFuzzer reports it with the input that caused it).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use confer_privacy::secagg::{
    ChaCha20Rng, Client, Config, SeedableRng, Server, SigningKey, VerifyingKey,
};
use confer_protocol::catalog::{
    CatalogInfo, ColumnInfo, ColumnType, Domain, DomainValue, TableInfo,
};
use confer_protocol::signing::Identity;
use confer_protocol::task::{Envelope, Task};
use confer_query::combine::SitePartial;
use confer_query::{Catalog, FederatedPlan, Statement};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fn col(name: &str, column_type: ColumnType) -> ColumnInfo {
    ColumnInfo {
        name: name.into(),
        column_type,
        bounds: None,
        domain: None,
        unique: false,
    }
}

/// An OMOP-like catalog: person (one row per unit, a public gender domain,
/// bounded year of birth), condition_occurrence (many rows per person) and
/// a public vocabulary table.
fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let int = ColumnType::Int64;
        let mut gender = col("gender_concept_id", int);
        gender.domain = Some(Domain::Values {
            values: vec![DomainValue::Int(8507), DomainValue::Int(8532)],
        });
        let mut year = col("year_of_birth", int);
        year.bounds = Some((1900.0, 2030.0));
        let person = TableInfo {
            name: "person".into(),
            privacy_unit: Some("person_id".into()),
            columns: vec![
                col("person_id", int),
                gender,
                year,
                col("care_site_id", int),
            ],
            one_row_per_unit: true,
        };
        let mut value = col("value_as_number", ColumnType::Float64);
        value.bounds = Some((0.0, 500.0));
        let condition = TableInfo {
            name: "condition_occurrence".into(),
            privacy_unit: Some("person_id".into()),
            columns: vec![
                col("condition_occurrence_id", int),
                col("person_id", int),
                col("condition_concept_id", int),
                col("condition_start_date", ColumnType::Date),
                value,
            ],
            one_row_per_unit: false,
        };
        let concept = TableInfo {
            name: "concept".into(),
            privacy_unit: None,
            columns: vec![
                col("concept_id", int),
                col("concept_name", ColumnType::Utf8),
            ],
            one_row_per_unit: false,
        };
        Catalog::for_node(&CatalogInfo {
            node: "site-a".into(),
            tables: vec![concept, condition, person],
        })
    })
}

/// Parses `sql` and compiles it as the coordinator and a node do.
pub fn dp_sql(sql: &str) {
    let Ok(statement) = confer_query::parse(sql) else {
        return;
    };
    let (Statement::Query(query) | Statement::ExplainPrivacy(query)) = statement else {
        return;
    };
    runtime().block_on(async {
        if query.options.is_none() {
            let _ = confer_query::public::public_query(&query, catalog()).await;
            return;
        }
        if let Ok(plan) = confer_query::compile(&query, catalog(), None).await {
            let _ = plan.output_schema();
            let _ = confer_query::compile(&query, catalog(), Some("site-a")).await;
        }
    });
}

fn identity() -> &'static Identity {
    static IDENTITY: OnceLock<Identity> = OnceLock::new();
    IDENTITY.get_or_init(|| Identity::generate().expect("a key"))
}

/// Reads an envelope as a node does; signs and verifies any task that parses.
pub fn task_envelope(data: &[u8]) {
    let key = identity();
    if let Ok(envelope) = Envelope::from_bytes(data) {
        let _ = envelope.task();
        // Nobody but the coordinator's key signs: a fuzzed envelope may
        // verify only if it carries a signature the key made.
        if let Ok(task) = key.public().verify(&envelope) {
            let again = key.sign(&task).expect("a verified task can be signed again");
            assert_eq!(again.payload, envelope.payload, "a forged envelope verified");
        }
    }
    if let Ok(task) = serde_json::from_slice::<Task>(data) {
        let envelope = key.sign(&task).expect("a task that parses can be signed");
        let verified = key
            .public()
            .verify(&envelope)
            .expect("what the coordinator signs verifies");
        assert_eq!(verified, task, "the signed task is not the task the node runs");
        let bytes = envelope.to_bytes().expect("an envelope encodes");
        let read = Envelope::from_bytes(&bytes).expect("an encoded envelope reads");
        assert_eq!(key.public().verify(&read).expect("verifies"), task);
    }
}

/// `msg` as JSON with `edits` applied (3 bytes each: a position and a new
/// byte; a position past the end truncates), parsed back; `None` when the
/// result is not a message of its type.
fn alter<T: Serialize + DeserializeOwned>(msg: &T, edits: &[u8]) -> Option<T> {
    let mut json = serde_json::to_vec(msg).ok()?;
    for edit in edits.chunks_exact(3) {
        let at = u16::from_le_bytes([edit[0], edit[1]]) as usize;
        if at >= json.len() {
            json.truncate(at % (json.len() + 1));
        } else {
            json[at] = edit[2];
        }
    }
    serde_json::from_slice(&json).ok()
}

/// A secure-aggregation session of 3 nodes where one message is altered:
/// `data[0]` picks the round (0 to 4) and the direction (bit 3: to a node),
/// `data[1]` the node, the rest edits the message's JSON.
pub fn secagg_messages(data: &[u8]) {
    const N: u32 = 3;
    if data.len() < 2 {
        return;
    }
    let round = data[0] % 5;
    let to_node = data[0] & 8 != 0;
    let who = u32::from(data[1]) % N;
    let edits = &data[2..];
    let hit = |r: u8, id: u32, to: bool| r == round && id == who && to == to_node;
    let Ok(config) = Config::new(N as usize, 32, 4, [7; 32]) else {
        return;
    };
    let keys: Vec<SigningKey> = (0..N).map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32])).collect();
    let identities: Arc<[VerifyingKey]> = keys.iter().map(SigningKey::verifying_key).collect();
    let Ok(mut server) = Server::new(config.clone(), identities.clone()) else {
        return;
    };
    let mut clients = BTreeMap::new();
    let mut rngs = BTreeMap::new();
    for (id, key) in keys.into_iter().enumerate() {
        let id = id as u32;
        let mut rng = ChaCha20Rng::from_seed([id as u8 + 9; 32]);
        let Ok((client, mut msg)) = Client::new(id, config.clone(), key, identities.clone(), &mut rng)
        else {
            return;
        };
        if hit(0, id, false) {
            match alter(&msg, edits) {
                Some(m) => msg = m,
                None => return,
            }
        }
        let _ = server.receive_advertise(msg);
        clients.insert(id, client);
        rngs.insert(id, rng);
    }
    let Ok(directories) = server.key_directories() else {
        return;
    };
    for (id, dir) in directories {
        let dir = if hit(1, id, true) {
            match alter(&dir, edits) {
                Some(d) => d,
                None => return,
            }
        } else {
            dir
        };
        let (Some(client), Some(rng)) = (clients.get_mut(&id), rngs.get_mut(&id)) else {
            continue;
        };
        let Ok(mut msg) = client.share_keys(&dir, rng) else {
            continue;
        };
        if hit(1, id, false) {
            match alter(&msg, edits) {
                Some(m) => msg = m,
                None => return,
            }
        }
        let _ = server.receive_shares(msg);
    }
    let Ok(forwarded) = server.forward_shares() else {
        return;
    };
    for (id, shares) in forwarded {
        let shares = if hit(2, id, true) {
            match alter(&shares, edits) {
                Some(s) => s,
                None => return,
            }
        } else {
            shares
        };
        let Some(client) = clients.get_mut(&id) else {
            continue;
        };
        let Ok(mut msg) = client.masked_input(&shares, &[u64::from(id) + 1; 4]) else {
            continue;
        };
        if hit(2, id, false) {
            match alter(&msg, edits) {
                Some(m) => msg = m,
                None => return,
            }
        }
        let _ = server.receive_masked_input(msg);
    }
    let Ok(set) = server.survivor_set() else {
        return;
    };
    for id in set.survivors.clone() {
        let set = if hit(3, id, true) {
            match alter(&set, edits) {
                Some(s) => s,
                None => return,
            }
        } else {
            set.clone()
        };
        let Some(client) = clients.get_mut(&id) else {
            continue;
        };
        let Ok(mut msg) = client.consistency(&set) else {
            continue;
        };
        if hit(3, id, false) {
            match alter(&msg, edits) {
                Some(m) => msg = m,
                None => return,
            }
        }
        let _ = server.receive_consistency(msg);
    }
    let Ok(request) = server.unmask_request() else {
        return;
    };
    for id in request.signatures.iter().map(|s| s.from).collect::<Vec<_>>() {
        let request = if hit(4, id, true) {
            match alter(&request, edits) {
                Some(r) => r,
                None => return,
            }
        } else {
            request.clone()
        };
        let Some(client) = clients.get_mut(&id) else {
            continue;
        };
        let Ok(mut msg) = client.unmask(&request) else {
            continue;
        };
        if hit(4, id, false) {
            match alter(&msg, edits) {
                Some(m) => msg = m,
                None => return,
            }
        }
        let _ = server.receive_unmask(msg);
    }
    let _ = server.finish();
}

/// A plan as the coordinator holds it, and a real release of it as a node
/// sends it (Arrow IPC stream bytes).
struct Released {
    plan: FederatedPlan,
    ipc: Vec<u8>,
}

fn released() -> &'static [Released] {
    static RELEASED: OnceLock<Vec<Released>> = OnceLock::new();
    RELEASED.get_or_init(|| runtime().block_on(build_releases()))
}

async fn build_releases() -> Vec<Released> {
    let info = CatalogInfo {
        node: "a".into(),
        tables: vec![TableInfo {
            name: "t".into(),
            privacy_unit: Some("person_id".into()),
            columns: vec![
                col("person_id", ColumnType::Int64),
                ColumnInfo {
                    domain: Some(Domain::Range { lo: 0, hi: 9 }),
                    ..col("g", ColumnType::Int64)
                },
                col("h", ColumnType::Int64),
                ColumnInfo {
                    bounds: Some((0.0, 100.0)),
                    ..col("v", ColumnType::Int64)
                },
            ],
            one_row_per_unit: false,
        }],
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Int64, false),
        Field::new("g", DataType::Int64, false),
        Field::new("h", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let persons: Vec<i64> = (0..20_000).collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(persons.iter().copied())),
            Arc::new(Int64Array::from_iter_values(persons.iter().map(|p| p % 10))),
            Arc::new(Int64Array::from_iter_values(persons.iter().map(|p| p % 7))),
            Arc::new(Int64Array::from_iter_values(persons.iter().map(|p| p % 101))),
        ],
    )
    .expect("batch");
    let ctx = confer_query::bounding::context();
    ctx.register_table(
        "t",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).expect("table")),
    )
    .expect("register");
    let mut out = Vec::new();
    for sql in [
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) \
         g, COUNT(*) AS n, SUM(v) AS s, AVG(v) AS m FROM t GROUP BY g",
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) \
         h, COUNT(DISTINCT person_id) AS n FROM t GROUP BY h",
    ] {
        let Ok(Statement::Query(parsed)) = confer_query::parse(sql) else {
            panic!("fixture query does not parse: {sql}");
        };
        let local = confer_query::compile(&parsed, &Catalog::for_node(&info), Some("a"))
            .await
            .expect("node plan");
        let batches = ctx
            .sql(&local.local_sql)
            .await
            .expect("local plan")
            .collect()
            .await
            .expect("local run");
        let release = confer_query::release::release(
            &local,
            &batches,
            "a",
            uuid::Uuid::new_v4(),
            &Default::default(),
        )
        .expect("release");
        let plan = confer_query::compile(
            &parsed,
            &Catalog::merge(std::slice::from_ref(&info)).expect("merge"),
            None,
        )
        .await
        .expect("coordinator plan");
        let mut ipc = Vec::new();
        {
            let mut writer =
                arrow::ipc::writer::StreamWriter::try_new(&mut ipc, &release.schema()).expect("ipc");
            writer.write(&release).expect("ipc");
            writer.finish().expect("ipc");
        }
        out.push(Released { plan, ipc });
    }
    out
}

/// Decodes a node's answer and checks and combines it as the coordinator
/// does. `data[0]`: bit 0 picks the query, bit 1 raw IPC (else edits of a
/// real release, 3 bytes each as in [`alter`]).
pub fn node_batches(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fixture = &released()[usize::from(mode & 1)];
    let bytes = if mode & 2 != 0 {
        rest.to_vec()
    } else {
        let mut bytes = fixture.ipc.clone();
        for edit in rest.chunks_exact(3) {
            let at = u16::from_le_bytes([edit[0], edit[1]]) as usize;
            if at < bytes.len() {
                bytes[at] = edit[2];
            } else {
                bytes.truncate(at % (bytes.len() + 1));
            }
        }
        bytes
    };
    // Arrow's IPC reader panics on some malformed buffers (reported
    // upstream); the coordinator catches that and sets the node's answer
    // aside (`fanout::NodeHandle::run`), and so does this target, so that
    // fuzzing goes on into confer's own checks.
    let decode = || {
        let reader =
            arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).ok()?;
        let schema = reader.schema();
        let batches = reader.collect::<Result<Vec<_>, _>>().ok()?;
        Some((schema, batches))
    };
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode));
    std::panic::set_hook(hook);
    let Ok(Some((schema, batches))) = decoded else {
        return;
    };
    let Ok(batch) = arrow::compute::concat_batches(&schema, &batches) else {
        return;
    };
    let partial = SitePartial {
        site: "a".into(),
        batch,
    };
    if confer_query::combine::check(&fixture.plan, &partial).is_ok() {
        let _ = confer_query::combine::combine(
            &fixture.plan,
            std::slice::from_ref(&partial),
            uuid::Uuid::new_v4(),
        );
    }
}
