//! The web console over HTTPS with the network's certificates: the
//! coordinator's console serves TLS with its own certificate on its own
//! address, signs in with the same tokens and roles as Flight SQL (secure
//! cookies), speaks no plaintext, and refuses to serve plain HTTP on a
//! non-loopback address. (The pages themselves are tested in a browser:
//! tests/python/test_console.py.)

use std::path::Path;
use std::sync::Arc;

use confer_cli::children::{Launch, ServerChild};
use confer_coordinator::store::{Role, SqliteStore, Store};
use confer_protocol::signing::Identity;
use confer_transport::pki::{self, CertKind, IssueRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFER: &str = env!("CARGO_BIN_EXE_confer");

/// One HTTPS request over a fresh connection that trusts `ca`; the status
/// and the whole response.
async fn https(
    addr: &str,
    ca: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca)?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?).map_err(std::io::Error::other)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name =
        rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    let mut tls = connector.connect(name, tcp).await?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    tls.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tls.read_to_string(&mut response).await.ok();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, response))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_speaks_https_with_the_networks_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki_dir = d.join("pki");
    let ca = pki::init(&pki_dir, "test network", 30).expect("ca").cert;
    let other = pki::init(&d.join("other"), "another network", 30)
        .expect("other ca")
        .cert;
    let issued = pki::issue(
        &pki_dir,
        &IssueRequest {
            kind: CertKind::Coordinator,
            name: "coordinator",
            hosts: &["127.0.0.1".to_string()],
            days: 30,
            replace: false,
        },
    )
    .expect("issue");
    Identity::generate()
        .expect("key")
        .save(&d.join("coordinator.key"))
        .expect("save");
    let config = d.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[coordinator]\nlisten = \"127.0.0.1:0\"\nsigning_key = \"coordinator.key\"\nstate = \"state.sqlite\"\n\n\
             [tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\nclient_certs = \"optional\"\n\n\
             [console]\nlisten = \"127.0.0.1:0\"\n\n\
             # A node that is not running: the console does not need one.\n\
             [[nodes]]\nname = \"site-a\"\nurl = \"https://127.0.0.1:9\"\n",
            issued.cert.display().to_string(),
            issued.key.display().to_string(),
            ca.display().to_string()
        ),
    )
    .expect("config");
    let store = SqliteStore::open(&d.join("state.sqlite")).expect("store");
    let researcher = store.add_user("rita", Role::Researcher).expect("user");
    let admin = store.add_user("admin", Role::Admin).expect("user");
    drop(store);
    let coordinator = ServerChild::launch(&Launch {
        program: Path::new(CONFER),
        role: "coordinator",
        label: "coordinator",
        config: &config,
        log_level: "warn",
        insecure_loopback: false,
        log_file: Some(&d.join("coordinator.log")),
    })
    .await
    .unwrap_or_else(|e| {
        let log = std::fs::read_to_string(d.join("coordinator.log")).unwrap_or_default();
        panic!("the coordinator did not start: {e}\n{log}")
    });
    let url = coordinator.console.clone().expect("a console URL");
    let addr = url
        .strip_prefix("https://")
        .expect("https")
        .trim_end_matches('/')
        .to_string();

    // The same tokens and roles as Flight SQL.
    let bearer = format!("Bearer {researcher}");
    let (status, body) = https(
        &addr,
        &ca,
        "GET",
        "/api/v1/whoami",
        &[("Authorization", &bearer)],
        "",
    )
    .await
    .expect("https");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"role\":\"researcher\""), "{body}");
    let (status, body) = https(
        &addr,
        &ca,
        "GET",
        "/api/v1/nodes",
        &[("Authorization", &bearer)],
        "",
    )
    .await
    .expect("https");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("needs the admin role"), "{body}");
    let (status, _) = https(
        &addr,
        &ca,
        "GET",
        "/api/v1/status",
        &[("Authorization", &format!("Bearer {admin}"))],
        "",
    )
    .await
    .expect("https");
    assert_eq!(status, 200);
    // Signing in sets a cookie only HTTPS sends, that scripts cannot read.
    let (status, response) = https(
        &addr,
        &ca,
        "POST",
        "/api/v1/session",
        &[("Content-Type", "application/json")],
        &format!("{{\"token\": \"{researcher}\"}}"),
    )
    .await
    .expect("https");
    assert_eq!(status, 200, "{response}");
    let cookie = response
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a cookie");
    for part in [
        "__Host-confer_session_",
        "HttpOnly",
        "SameSite=Strict",
        "Secure",
    ] {
        assert!(cookie.contains(part), "{cookie}");
    }
    // A browser's request from another site or another port is refused,
    // whatever it carries.
    for header in [
        ("Origin", "https://evil.example"),
        ("Origin", &format!("https://127.0.0.1:{}", 1)),
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Site", "same-site"),
    ] {
        let (status, body) = https(
            &addr,
            &ca,
            "POST",
            "/api/v1/session",
            &[("Content-Type", "application/json"), header],
            &format!("{{\"token\": \"{researcher}\"}}"),
        )
        .await
        .expect("https");
        assert_eq!(status, 403, "{header:?}: {body}");
        assert!(body.contains("another site or port"), "{body}");
    }
    let origin = format!("https://{addr}");
    let (status, _) = https(
        &addr,
        &ca,
        "POST",
        "/api/v1/session",
        &[
            ("Content-Type", "application/json"),
            ("Origin", &origin),
            ("Sec-Fetch-Site", "same-origin"),
        ],
        &format!("{{\"token\": \"{researcher}\"}}"),
    )
    .await
    .expect("https");
    assert_eq!(status, 200, "the console's own page signs in");
    // A wrong method or query string answers in JSON too.
    let (status, body) = https(
        &addr,
        &ca,
        "DELETE",
        "/api/v1/whoami",
        &[("Authorization", &bearer)],
        "",
    )
    .await
    .expect("https");
    assert_eq!(status, 405);
    assert!(body.contains("\"status\":405"), "{body}");
    // A form post (no JSON) cannot sign in: no cross-site login forms.
    let (status, _) = https(
        &addr,
        &ca,
        "POST",
        "/api/v1/session",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &format!("token={researcher}"),
    )
    .await
    .expect("https");
    assert_eq!(status, 415);
    // Pages carry a policy that keeps the browser to the console.
    let (status, response) = https(&addr, &ca, "GET", "/login", &[], "")
        .await
        .expect("https");
    assert_eq!(status, 200);
    assert!(
        response
            .to_ascii_lowercase()
            .contains("content-security-policy: default-src 'self'"),
        "{response}"
    );

    // No plaintext on the console's port, and a client that trusts another
    // network's CA does not get through the handshake.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.expect("tcp");
    tcp.write_all(b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut plain = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tcp.read_to_end(&mut plain),
    )
    .await;
    assert!(!String::from_utf8_lossy(&plain).contains("HTTP/1.1 200"));
    assert!(
        https(&addr, &other, "GET", "/login", &[], "")
            .await
            .is_err()
    );
    coordinator
        .stop(std::time::Duration::from_secs(10))
        .await
        .expect("stops");

    // Plain HTTP only on loopback: a console on every address without
    // [tls] is refused at start, saying what to change.
    let open = d.join("open.toml");
    std::fs::write(
        &open,
        "[coordinator]\nlisten = \"127.0.0.1:0\"\nsigning_key = \"coordinator.key\"\nstate = \"open.sqlite\"\n\n\
         [console]\nlisten = \"0.0.0.0:0\"\n\n[[nodes]]\nname = \"site-a\"\nurl = \"http://127.0.0.1:9\"\n",
    )
    .expect("config");
    let cfg = confer_coordinator::CoordinatorConfig::load(&open).expect("load");
    let err = confer_coordinator::start(cfg, confer_coordinator::Transport::InsecureLoopback)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("plain HTTP is allowed only on a loopback address") && err.contains("[tls]"),
        "{err}"
    );
}
