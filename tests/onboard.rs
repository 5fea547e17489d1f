//! Onboarding as a hospital's IT team does it, through the `confer`
//! binary: `node init` from a data directory, `pki enrol` at the network's
//! operator, `node enrol` of the bundle, `node check`, start, and the
//! coordinator reaching the node over mutual TLS. Bad bundles (another
//! site, another key, another network) are refused and overwrite nothing.

use std::path::Path;
use std::process::Command;

use confer_cli::children::{Launch, ServerChild};
use confer_transport::pki::{self, CertKind, IssueRequest};

const CONFER: &str = env!("CARGO_BIN_EXE_confer");

/// Runs confer with `args`: exit code and output.
fn confer(args: &[&str]) -> (i32, String) {
    let out = Command::new(CONFER)
        .args(args)
        .output()
        .expect("run confer");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn init(d: &Path, out: &str, site: &str) -> (i32, String) {
    let state = d.join(out).join("state");
    confer(&[
        "node",
        "init",
        "--data",
        s(&d.join("data")),
        "--site",
        site,
        "--out",
        s(&d.join(out)),
        "--listen",
        "127.0.0.1:0",
        "--host",
        "127.0.0.1",
        "--state-dir",
        s(&state),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_onboarded_from_its_data_and_bad_bundles_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let data = d.join("data");
    std::fs::create_dir_all(&data).expect("data");
    let mut person = String::from(
        "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n",
    );
    for p in 0..40 {
        person.push_str(&format!(
            "{p},{},19{},0,0\n",
            8507 + 25 * (p % 2),
            50 + p % 40
        ));
    }
    std::fs::write(data.join("PERSON.csv"), person).expect("person");
    std::fs::write(data.join("labs.csv"), "person_id,value\n1,2.5\n2,3\n").expect("labs");

    // The network's operator: a CA and the coordinator's signing key.
    let ca = d.join("ca");
    assert_eq!(confer(&["pki", "init", "--dir", s(&ca)]).0, 0);
    // (Its signing key lives apart from the CA: `pki issue --name
    // coordinator` writes the TLS key as ca/coordinator.key.)
    let signing = d.join("signing");
    let (code, out) = confer(&["keygen", "--out", s(&signing.join("coordinator.key"))]);
    assert_eq!(code, 0, "{out}");
    let coordinator_pub = signing.join("coordinator.key.pub");

    // The site: a config from its data, a key and a request.
    let (code, out) = init(d, "etc", "site-a");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("person") && out.contains("served: OMOP CDM"),
        "{out}"
    );
    assert!(out.contains("labs") && out.contains("TO CONFIRM"), "{out}");
    let config = d.join("etc").join("node.toml");
    let written = std::fs::read_to_string(&config).expect("node.toml");
    assert!(written.contains("# [tables.labs]"), "held: {written}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(d.join("etc/pki/site-a.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Again without --force: refused, nothing replaced.
    let (code, out) = init(d, "etc", "site-a");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("--force"), "{out}");
    assert_eq!(std::fs::read_to_string(&config).expect("read"), written);
    // Not startable yet: the bundle is missing, and check says so.
    let (code, out) = confer(&["node", "check", "--config", s(&config)]);
    assert_eq!(code, 1, "{out}");

    // Another site's request signed as site-a: refused at the CA.
    assert_eq!(init(d, "etc-b", "site-b").0, 0);
    let enrol = |request: &Path, ca_dir: &Path, out: &Path, site: Option<&str>| {
        let mut args = vec![
            "pki",
            "enrol",
            "--dir",
            s(ca_dir),
            "--request",
            s(request),
            "--coordinator-key",
            s(&coordinator_pub),
            "--out",
            s(out),
        ];
        if let Some(site) = site {
            args.extend(["--site", site]);
        }
        confer(&args)
    };
    let (code, out) = enrol(
        &d.join("etc-b/pki/site-b.csr"),
        &ca,
        &d.join("bundle-x"),
        Some("site-a"),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the request is for site \"site-b\""), "{out}");

    // A bundle for another site, or for another key under this name, or
    // from another network: refused, nothing written.
    let (code, out) = enrol(
        &d.join("etc-b/pki/site-b.csr"),
        &ca,
        &d.join("bundle-b"),
        None,
    );
    assert_eq!(code, 0, "{out}");
    let node_enrol = |bundle: &Path| {
        confer(&[
            "node",
            "enrol",
            "--bundle",
            s(bundle),
            "--config",
            s(&config),
        ])
    };
    let (code, out) = node_enrol(&d.join("bundle-b"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("a bundle for another site"), "{out}");
    assert!(!d.join("etc/pki/ca.pem").exists() && !d.join("etc/pki/site-a.pem").exists());
    assert_eq!(init(d, "etc-c", "site-a").0, 0);
    let (code, out) = enrol(
        &d.join("etc-c/pki/site-a.csr"),
        &ca,
        &d.join("bundle-c"),
        None,
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = node_enrol(&d.join("bundle-c"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not fit this node"), "{out}");
    assert!(!d.join("etc/pki/site-a.pem").exists());

    // The right bundle.
    let (code, out) = enrol(
        &d.join("etc/pki/site-a.csr"),
        &ca,
        &d.join("bundle-a"),
        Some("site-a"),
    );
    assert_eq!(code, 0, "{out}");
    let readme = std::fs::read_to_string(d.join("bundle-a/README.txt")).expect("readme");
    assert!(
        readme.contains("signs identities, not tunables"),
        "{readme}"
    );
    let (code, out) = node_enrol(&d.join("bundle-a"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("node \"site-a\" enrolled"), "{out}");
    let (code, out) = confer(&["node", "steward-token", "--config", s(&config)]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = confer(&["node", "check", "--config", s(&config)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 table(s) load"), "{out}");

    // A bundle from another network: refused unless on purpose.
    let other_ca = d.join("ca-other");
    assert_eq!(confer(&["pki", "init", "--dir", s(&other_ca)]).0, 0);
    let (code, out) = enrol(
        &d.join("etc/pki/site-a.csr"),
        &other_ca,
        &d.join("bundle-o"),
        None,
    );
    assert_eq!(code, 0, "{out}");
    let before = std::fs::read(d.join("etc/pki/ca.pem")).expect("ca");
    let (code, out) = node_enrol(&d.join("bundle-o"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("network CA differs"), "{out}");
    assert_eq!(std::fs::read(d.join("etc/pki/ca.pem")).expect("ca"), before);

    // It starts, and the coordinator reaches it over mutual TLS.
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
    .expect("the onboarded node starts");
    let coordinator_cert = pki::issue(
        &ca,
        &IssueRequest {
            kind: CertKind::Coordinator,
            name: "coordinator",
            hosts: &["127.0.0.1".to_string()],
            days: 365,
            replace: false,
        },
    )
    .expect("coordinator certificate");
    let coordinator = d.join("coordinator.toml");
    std::fs::write(
        &coordinator,
        format!(
            "[coordinator]\nlisten = \"127.0.0.1:0\"\nsigning_key = {:?}\nstate = \"state/coordinator.sqlite\"\n\n\
             [tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\nclient_certs = \"optional\"\n\n\
             [[nodes]]\nname = \"site-a\"\nurl = \"https://{}\"\n",
            s(&signing.join("coordinator.key")),
            s(&coordinator_cert.cert),
            s(&coordinator_cert.key),
            s(&ca.join("ca.pem")),
            node.addr
        ),
    )
    .expect("coordinator.toml");
    let (code, out) = confer(&["coordinator", "check", "--config", s(&coordinator)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("over mutual TLS"), "{out}");
    node.stop(std::time::Duration::from_secs(10))
        .await
        .expect("stops");
}
