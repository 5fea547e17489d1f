//! `confer node check` and `confer coordinator check` against real files
//! and a real node over mutual TLS: what passes, what fails with what to
//! change, and the exit codes scripts read (0 passed, 2 warnings, 1 a
//! failure).

use std::path::{Path, PathBuf};
use std::process::Command;

use confer_cli::children::{Launch, ServerChild};
use confer_protocol::signing::Identity;
use confer_transport::pki::{self, CertKind, IssueRequest};

const CONFER: &str = env!("CARGO_BIN_EXE_confer");

fn issue(dir: &Path, kind: CertKind, name: &str, days: i64) -> (PathBuf, PathBuf) {
    let issued = pki::issue(
        dir,
        &IssueRequest {
            kind,
            name,
            hosts: &["127.0.0.1".to_string()],
            days,
            replace: true,
        },
    )
    .expect("issue");
    (issued.cert, issued.key)
}

/// A node directory with a person table and node.toml (TLS with `cert`).
fn node_config(dir: &Path, name: &str, cert: &(PathBuf, PathBuf), ca: &Path, key: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("dir");
    let mut csv = String::from(
        "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n",
    );
    for p in 0..20 {
        csv.push_str(&format!(
            "{p},{},1970,0,0\n",
            if p % 2 == 0 { 8507 } else { 8532 }
        ));
    }
    std::fs::write(dir.join("person.csv"), csv).expect("csv");
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ncoordinator_key = \"{key}\"\n\n\
             [policy]\napproval = \"auto\"\ndefault_study_budget = {{ epsilon = 5, delta = 1e-6 }}\nnode_budget = {{ epsilon = 50, delta = 1e-6 }}\n\n\
             [tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\nclient_certs = \"required\"\n\n\
             [tables.person]\npath = \"person.csv\"\nprivacy_unit = \"person_id\"\n\
             [tables.person.columns]\ngender_concept_id = {{ domain = [8507, 8532] }}\n",
            cert.0.display().to_string(),
            cert.1.display().to_string(),
            ca.display().to_string()
        ),
    )
    .expect("config");
    config
}

/// Runs `confer <role> check --config <config>`: exit code and output.
fn check(role: &str, config: &Path) -> (i32, String) {
    let out = Command::new(CONFER)
        .args([role, "check", "--config"])
        .arg(config)
        .output()
        .expect("run confer");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_checks_say_what_to_change_with_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki_dir = d.join("pki");
    let ca = pki::init(&pki_dir, "test network", 30).expect("ca").cert;
    let key = Identity::generate().expect("key");
    let public = key.save(&d.join("coordinator.key")).expect("save");

    // A good node: everything passes, before its first start.
    let site_a = issue(&pki_dir, CertKind::Node, "site-a", 365);
    let config = node_config(&d.join("site-a"), "site-a", &site_a, &ca, &public);
    let (code, out) = check("node", &config);
    assert_eq!(code, 0, "{out}");
    for line in [
        "ok    config",
        "ok    tables",
        "1 table(s) load and pass the start-up checks",
        "ok    state directory",
        "writes reach the disk",
        "none yet: the node creates it",
        "node certificate \"site-a\" signed by the network CA",
        "0 failure(s)",
    ] {
        assert!(out.contains(line), "{line:?} in\n{out}");
    }

    // Running, on its port: the check names the port in use.
    let node = ServerChild::launch(&Launch {
        program: Path::new(CONFER),
        role: "node",
        label: "node site-a",
        config: &config,
        log_level: "warn",
        insecure_loopback: false,
        log_file: Some(&d.join("site-a.log")),
    })
    .await
    .expect("node starts");
    let text = std::fs::read_to_string(&config).expect("read");
    let pinned = d.join("site-a").join("pinned.toml");
    std::fs::write(
        &pinned,
        text.replacen("127.0.0.1:0", &node.addr.to_string(), 1),
    )
    .expect("write");
    let (code, out) = check("node", &pinned);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("node.listen = {} is in use", node.addr)),
        "{out}"
    );
    assert!(
        out.contains("ok    ledger"),
        "the ledger written at start verifies:\n{out}"
    );

    // The coordinator reaches it over mutual TLS, with the right name and clock.
    let coord_cert = issue(&pki_dir, CertKind::Coordinator, "coordinator", 365);
    let coordinator = d.join("coordinator.toml");
    let write_coordinator = |nodes: &str| {
        std::fs::write(
            &coordinator,
            format!(
                "[coordinator]\nlisten = \"127.0.0.1:0\"\nsigning_key = \"coordinator.key\"\nstate = \"state/coordinator.sqlite\"\n\n\
                 [tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\nclient_certs = \"optional\"\n\n{nodes}",
                coord_cert.0.display().to_string(),
                coord_cert.1.display().to_string(),
                ca.display().to_string()
            ),
        )
        .expect("write")
    };
    write_coordinator(&format!(
        "[[nodes]]\nname = \"site-a\"\nurl = \"https://{}\"\n",
        node.addr
    ));
    let (code, out) = check("coordinator", &coordinator);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("over mutual TLS") && out.contains("clocks agree"),
        "{out}"
    );
    assert!(
        out.contains(&public),
        "the public key nodes must hold:\n{out}"
    );
    // A node entry under another name, and a node that is down.
    write_coordinator(&format!(
        "[[nodes]]\nname = \"site-z\"\nurl = \"https://{}\"\n\n[[nodes]]\nname = \"site-b\"\nurl = \"https://127.0.0.1:9\"\n",
        node.addr
    ));
    let (code, out) = check("coordinator", &coordinator);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("answers as node \"site-a\""), "{out}");
    assert!(out.contains("FAIL  node site-b"), "{out}");
    node.stop(std::time::Duration::from_secs(10))
        .await
        .expect("stops");

    // A ledger of the previous release's format (no schema version): the
    // check tries the upgrade on a copy and leaves the file as it is.
    let ledger = d.join("site-a").join("state").join("ledger.sqlite");
    let raw = |sql: &str| -> i64 {
        let conn = rusqlite::Connection::open(&ledger).expect("raw ledger");
        conn.execute_batch(sql).expect("sql");
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version")
    };
    assert_eq!(
        raw("DROP TABLE meta; PRAGMA application_id = 0; PRAGMA user_version = 0;"),
        0
    );
    let (code, out) = check("node", &config);
    assert_eq!(code, 2, "warnings only:\n{out}");
    assert!(
        out.contains("WARN  ledger version") && out.contains("at schema version 0"),
        "{out}"
    );
    assert!(
        out.contains("ok    ledger "),
        "the upgraded copy verifies:\n{out}"
    );
    assert_eq!(raw(""), 0, "check wrote nothing to the ledger");
    // One written by a newer confer: refused, untouched.
    assert_eq!(
        raw(&format!(
            "PRAGMA application_id = {}; PRAGMA user_version = 99;",
            confer_store::NODE_LEDGER_ID
        )),
        99
    );
    let (code, out) = check("node", &config);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("written by a newer confer"), "{out}");
    assert_eq!(
        raw("PRAGMA application_id = 0; PRAGMA user_version = 0;"),
        0
    );

    // A state directory of another node: site-c pointed at site-a's.
    let site_c = issue(&pki_dir, CertKind::Node, "site-c2", 365);
    let borrowed = node_config(&d.join("site-c2"), "site-c2", &site_c, &ca, &public);
    let text = std::fs::read_to_string(&borrowed).expect("read");
    std::fs::write(
        &borrowed,
        text.replacen(
            "state_dir = \"state\"",
            &format!(
                "state_dir = {:?}",
                d.join("site-a").join("state").display().to_string()
            ),
            1,
        ),
    )
    .expect("write");
    // Site-a's next start upgrades its ledger and binds it to site-a (the
    // node's name was dropped with the format above).
    {
        let l = confer_node::ledger::Ledger::open(&d.join("site-a").join("state")).expect("open");
        l.bind_node("site-a").expect("bind");
    }
    let (code, out) = check("node", &borrowed);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("is the ledger of node \"site-a\", but this node is \"site-c2\""),
        "{out}"
    );
    let start = Command::new(CONFER)
        .args(["node", "--config"])
        .arg(&borrowed)
        .output()
        .expect("run confer");
    assert!(!start.status.success());
    let err = String::from_utf8_lossy(&start.stderr);
    assert!(err.contains("is the ledger of node \"site-a\""), "{err}");

    // A certificate for another site; one about to expire; a config edited
    // into nonsense.
    let other = issue(&pki_dir, CertKind::Node, "site-b", 365);
    let config_b = node_config(&d.join("wrong"), "site-a", &other, &ca, &public);
    let (code, out) = check("node", &config_b);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("a certificate for another site"), "{out}");
    let soon = issue(&pki_dir, CertKind::Node, "site-c", 10);
    let config_c = node_config(&d.join("site-c"), "site-c", &soon, &ca, &public);
    let (code, out) = check("node", &config_c);
    assert_eq!(code, 2, "warnings only:\n{out}");
    assert!(
        out.contains("WARN  certificate")
            && (out.contains("(9 days)") || out.contains("(10 days)")),
        "{out}"
    );
    let broken = d.join("site-c").join("broken.toml");
    std::fs::write(&broken, "[node]\nname = \"x\"\nlisten = 12\n").expect("write");
    let (code, out) = check("node", &broken);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL  config"), "{out}");
}
