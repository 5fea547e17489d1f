//! Mutual TLS and authentication with real processes: a network CA, a node
//! that accepts only the coordinator's certificate, clients authenticating
//! by token or certificate, roles, and certificates that must be refused
//! (another CA, expired) with a clear log line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use confer_cli::ConnectArgs;
use confer_cli::children::{Launch, ServerChild};
use confer_cli::client::Client;
use confer_coordinator::service::custom;
use confer_coordinator::store::{Role, SqliteStore, Store, Study, now_ms};
use confer_protocol::signing::Identity;
use confer_transport::pki::{self, CertKind, IssueRequest};

const CONFER: &str = env!("CARGO_BIN_EXE_confer");
const SQL: &str = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1e9, delta = 1e-6) \
                   gender_concept_id, COUNT(*) AS n FROM person GROUP BY gender_concept_id";

fn issue(dir: &Path, kind: CertKind, name: &str, days: i64) -> (PathBuf, PathBuf) {
    let hosts = ["127.0.0.1".to_string()];
    let issued = pki::issue(
        dir,
        &IssueRequest {
            kind,
            name,
            hosts: if kind == CertKind::Client {
                &[]
            } else {
                &hosts
            },
            days,
            replace: false,
        },
    )
    .expect("issue");
    (issued.cert, issued.key)
}

fn tls_section(cert: &Path, key: &Path, ca: &Path, client_certs: &str) -> String {
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\nclient_certs = \"{client_certs}\"\n",
        cert.display().to_string(),
        key.display().to_string(),
        ca.display().to_string()
    )
}

async fn node(dir: &Path, name: &str, tls: &str, coordinator_key: &str) -> ServerChild {
    let node_dir = dir.join(name);
    std::fs::create_dir_all(&node_dir).expect("dir");
    let mut csv = String::from(
        "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n",
    );
    for p in 0..40 {
        csv.push_str(&format!(
            "{p},{},1970,0,0\n",
            if p % 4 == 0 { 8507 } else { 8532 }
        ));
    }
    std::fs::write(node_dir.join("person.csv"), csv).expect("csv");
    let config = node_dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ncoordinator_key = \"{coordinator_key}\"\n\n\
             [policy]\napproval = \"auto\"\ndefault_study_budget = {{ rho = 1e15, delta = 0.5 }}\nnode_budget = {{ rho = 1e16 }}\n\n{tls}\n\
             [tables.person]\npath = \"person.csv\"\nprivacy_unit = \"person_id\"\n\
             [tables.person.columns]\ngender_concept_id = {{ domain = [8507, 8532] }}\n"
        ),
    )
    .expect("config");
    ServerChild::launch(&Launch {
        program: Path::new(CONFER),
        role: "node",
        label: &format!("node {name}"),
        config: &config,
        log_level: "warn",
        insecure_loopback: false,
        log_file: Some(&node_dir.join("node.log")),
    })
    .await
    .expect("TLS node starts")
}

async fn coordinator(
    dir: &Path,
    name: &str,
    tls: &str,
    nodes: &[(&str, &ServerChild)],
) -> ServerChild {
    let cdir = dir.join(name);
    std::fs::create_dir_all(&cdir).expect("dir");
    std::fs::copy(dir.join("coordinator.key"), cdir.join("coordinator.key")).expect("key");
    let mut text = format!(
        "[coordinator]\nlisten = \"127.0.0.1:0\"\nsigning_key = \"coordinator.key\"\nstate = \"state.sqlite\"\n\
         node_timeout_secs = 10\nretries = 0\n\n{tls}\n"
    );
    for (site, child) in nodes {
        text.push_str(&format!(
            "[[nodes]]\nname = \"{site}\"\nurl = \"https://{}\"\n",
            child.addr
        ));
    }
    let config = cdir.join("coordinator.toml");
    std::fs::write(&config, text).expect("config");
    let store = SqliteStore::open(&cdir.join("state.sqlite")).expect("store");
    for (user, role) in [
        ("admin", Role::Admin),
        ("tester", Role::Researcher),
        ("carol", Role::Researcher),
    ] {
        let token = store.add_user(user, role).expect("user");
        std::fs::write(cdir.join(format!("{user}.token")), token).expect("token");
    }
    store
        .create_study(&Study {
            name: "test".into(),
            title: "TLS test".into(),
            principal_investigator: "tester".into(),
            members: vec!["carol".into()],
            tables: vec![],
            requested_epsilon: 1.0,
            requested_delta: 1e-6,
            ethics_ref: "T-1".into(),
            min_sites: None,
            created_ms: now_ms(),
            created_by: "admin".into(),
        })
        .expect("study");
    ServerChild::launch(&Launch {
        program: Path::new(CONFER),
        role: "coordinator",
        label: name,
        config: &config,
        log_level: "warn",
        insecure_loopback: false,
        log_file: Some(&cdir.join("coordinator.log")),
    })
    .await
    .expect("TLS coordinator starts")
}

fn token(dir: &Path, coordinator: &str, user: &str) -> String {
    std::fs::read_to_string(dir.join(coordinator).join(format!("{user}.token"))).expect("token")
}

fn connect(
    coordinator: &ServerChild,
    ca: &Path,
    token: Option<String>,
    cert: Option<(PathBuf, PathBuf)>,
) -> ConnectArgs {
    ConnectArgs {
        coordinator: Some(format!("https://{}", coordinator.addr)),
        token,
        ca: Some(ca.to_path_buf()),
        cert: cert.as_ref().map(|c| c.0.clone()),
        key: cert.map(|c| c.1),
    }
}

async fn wait_for_log(path: &Path, needle: &str) -> String {
    for _ in 0..50 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_tokens_certificates_and_roles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (ca_dir, other_dir) = (d.join("pki"), d.join("other-pki"));
    let ca = pki::init(&ca_dir, "test network", 30).expect("ca").cert;
    let other_ca = pki::init(&other_dir, "another network", 30)
        .expect("other ca")
        .cert;
    let key = Identity::generate().expect("key");
    let public = key.save(&d.join("coordinator.key")).expect("save key");

    let (node_cert, node_key) = issue(&ca_dir, CertKind::Node, "site-a", 30);
    let site_a = node(
        d,
        "site-a",
        &tls_section(&node_cert, &node_key, &ca, "required"),
        &public,
    )
    .await;
    // A node of another network, listed by mistake (or an impostor): its
    // certificate comes from another CA. (An honest node refuses to start
    // with a certificate its own tls.ca did not sign, so this one names
    // the other network's CA.)
    let (rogue_cert, rogue_key) = issue(&other_dir, CertKind::Node, "site-b", 30);
    let site_b = node(
        d,
        "site-b",
        &tls_section(
            &rogue_cert,
            &rogue_key,
            &other_dir.join("ca.pem"),
            "required",
        ),
        &public,
    )
    .await;

    let (coord_cert, coord_key) = issue(&ca_dir, CertKind::Coordinator, "coordinator", 30);
    let coord = coordinator(
        d,
        "coord",
        &tls_section(&coord_cert, &coord_key, &ca, "optional"),
        &[("site-a", &site_a), ("site-b", &site_b)],
    )
    .await;

    // A researcher with a token over TLS: site-a answers, site-b's certificate is refused.
    let mut tester = Client::connect_with(&connect(
        &coord,
        &ca,
        Some(token(d, "coord", "tester")),
        None,
    ))
    .await
    .expect("connect");
    let err = tester
        .run(SQL, Some("test"))
        .await
        .expect_err("site-b refused")
        .to_string();
    assert!(
        err.contains("site-b") && err.contains("not issued by this network's CA"),
        "{err}"
    );
    let sql_one_site = SQL.replace("delta = 1e-6", "delta = 1e-6, min_sites = 1");
    let answer = tester
        .run(&sql_one_site, Some("test"))
        .await
        .expect("site-a answers");
    assert_eq!(
        answer.batches.iter().map(|b| b.num_rows()).sum::<usize>(),
        2
    );

    // No credentials: refused. A researcher cannot use admin actions.
    let mut nobody = Client::connect_with(&connect(&coord, &ca, None, None))
        .await
        .expect("connect");
    let err = nobody
        .run(&sql_one_site, Some("test"))
        .await
        .expect_err("no credentials")
        .to_string();
    assert!(err.contains("no credentials"), "{err}");
    let err = tester
        .action(custom::STUDY_CREATE, b"{}".to_vec())
        .await
        .expect_err("researcher is not admin")
        .to_string();
    assert!(err.contains("needs the admin role"), "{err}");

    // A client certificate registered to carol authenticates her without a token.
    let carol_cert = issue(&ca_dir, CertKind::Client, "carol", 30);
    let out = std::process::Command::new(CONFER)
        .args([
            "coordinator",
            "user",
            "add",
            "--name",
            "carol2",
            "--role",
            "researcher",
            "--cert",
        ])
        .arg(&carol_cert.0)
        .arg("--config")
        .arg(d.join("coord").join("coordinator.toml"))
        .output()
        .expect("user add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut by_cert = Client::connect_with(&connect(&coord, &ca, None, Some(carol_cert)))
        .await
        .expect("connect");
    let who = by_cert
        .action(custom::WHOAMI, Vec::new())
        .await
        .expect("whoami");
    assert_eq!(who["name"], "carol2");

    // Plaintext to a TLS coordinator does not work.
    let plain = Client::connect(
        &format!("http://{}", coord.addr),
        Some(&token(d, "coord", "tester")),
    )
    .await;
    if let Ok(mut plain) = plain {
        assert!(plain.run(&sql_one_site, Some("test")).await.is_err());
    }

    // A coordinator with a certificate from another CA, and one with an
    // expired certificate, are refused by the node, which says why in its log.
    let (stranger_cert, stranger_key) = issue(&other_dir, CertKind::Coordinator, "stranger", 30);
    let stranger = coordinator(
        d,
        "stranger",
        &tls_section(&stranger_cert, &stranger_key, &ca, "optional"),
        &[("site-a", &site_a)],
    )
    .await;
    let mut c = Client::connect_with(&connect(
        &stranger,
        &other_ca,
        Some(token(d, "stranger", "tester")),
        None,
    ))
    .await
    .expect("connect");
    assert!(c.run(SQL, Some("test")).await.is_err());
    let log = wait_for_log(
        &d.join("site-a").join("node.log"),
        "not issued by this network's CA",
    )
    .await;
    assert!(
        log.contains("refused TLS connection") && log.contains("not issued by this network's CA"),
        "{log}"
    );

    // (The expired coordinator's health checks reach the node at start-up.)
    let (old_cert, old_key) = issue(&ca_dir, CertKind::Coordinator, "expired", -1);
    let expired = coordinator(
        d,
        "expired",
        &tls_section(&old_cert, &old_key, &ca, "optional"),
        &[("site-a", &site_a)],
    )
    .await;
    let log = wait_for_log(&d.join("site-a").join("node.log"), "has expired").await;
    assert!(log.contains("certificate has expired"), "{log}");

    // Secure aggregation over mutual TLS: no key is pinned; each node
    // proves its secure-aggregation key with its certificate, and its peer
    // checks the certificate against the network CA (issue 13, shape 12).
    let (c_cert, c_key) = issue(&ca_dir, CertKind::Node, "site-c", 30);
    let site_c = node(
        d,
        "site-c",
        &tls_section(&c_cert, &c_key, &ca, "required"),
        &public,
    )
    .await;
    let pair = coordinator(
        d,
        "pair",
        &tls_section(&coord_cert, &coord_key, &ca, "optional"),
        &[("site-a", &site_a), ("site-c", &site_c)],
    )
    .await;
    let mut researcher =
        Client::connect_with(&connect(&pair, &ca, Some(token(d, "pair", "tester")), None))
            .await
            .expect("connect");
    let secure = SQL.replace("delta = 1e-6)", "delta = 1e-6, aggregation = 'secure')");
    let answer = researcher
        .run(&secure, Some("test"))
        .await
        .expect("a secure sum over certificate-proven keys");
    // Each node's noise share keeps a standard deviation of at least 1/2,
    // whatever epsilon: the sum is exact within a few units.
    let counts = crate::fixture::keyed(&answer.batches, 1, &["n"]);
    assert!((counts["8507"][0] - 20.0).abs() <= 5.0, "{counts:?}");
    assert!((counts["8532"][0] - 60.0).abs() <= 5.0, "{counts:?}");

    for child in [coord, stranger, expired, pair, site_a, site_b, site_c] {
        child
            .stop(Duration::from_secs(10))
            .await
            .expect("clean stop");
    }
}
