//! confer's web consoles: what the coordinator's console (commission,
//! researcher, operations) and a node's steward page share.
//!
//! * [`asset`]: the pages, scripts and the chart library (ECharts, from
//!   `console/package-lock.json`), embedded at build time: a console
//!   fetches nothing from outside the machine.
//! * [`spawn`]: serves an axum router over TLS (the server's certificate
//!   from the network CA, HTTP/2 or HTTP/1.1) or, on loopback only, plain
//!   HTTP.
//! * [`Sessions`]: a signed-in browser holds a random session id in an
//!   `HttpOnly`, `SameSite=Strict` cookie; the token it signed in with
//!   stays on the server and is checked again on every request, so a
//!   revoked or rotated token ends its sessions at once.
//! * [`reply`]: JSON errors with the right HTTP status, error pages,
//!   security headers; [`json`]: Arrow batches as JSON.

mod config;
pub mod json;
pub mod reply;
mod serve;
mod session;

pub use config::ConsoleConfig;
pub use serve::spawn;
pub use session::{COOKIE, Sessions};

/// What every console's router ends with: JSON 404 and 405 for the API
/// (pages elsewhere), and the same-origin check on every change
/// ([`reply::same_origin`]).
pub fn guarded<S: Clone + Send + Sync + 'static>(router: axum::Router<S>) -> axum::Router<S> {
    router
        .fallback(reply::not_found)
        .method_not_allowed_fallback(reply::method_not_allowed)
        .layer(axum::middleware::from_fn(reply::same_origin))
}

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Its bytes.
    pub body: &'static [u8],
    /// Its media type.
    pub content_type: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

macro_rules! embedded {
    ($($name:literal => $kind:ident),* $(,)?) => {
        /// The embedded file `name` (`console.js`, `commission.html`, ...).
        pub fn asset(name: &str) -> Option<Asset> {
            match name {
                "echarts.min.js" => Some(Asset {
                    body: include_bytes!(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/node_modules/echarts/dist/echarts.min.js"
                    )),
                    content_type: JS,
                }),
                $($name => Some(Asset {
                    body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/", $name)),
                    content_type: $kind,
                }),)*
                _ => None,
            }
        }
    };
}

embedded! {
    "console.css" => CSS,
    "console.js" => JS,
    "login.html" => HTML,
    "commission.html" => HTML,
    "commission.js" => JS,
    "researcher.html" => HTML,
    "researcher.js" => JS,
    "ops.html" => HTML,
    "ops.js" => JS,
    "steward.html" => HTML,
    "steward.js" => JS,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_loads_only_embedded_scripts() {
        for page in [
            "login.html",
            "commission.html",
            "researcher.html",
            "ops.html",
            "steward.html",
        ] {
            let text = std::str::from_utf8(asset(page).expect(page).body).expect("utf-8");
            for part in text
                .split("src=\"")
                .skip(1)
                .chain(text.split("href=\"").skip(1))
            {
                let target = part.split('"').next().unwrap_or_default();
                if let Some(name) = target.strip_prefix("/assets/") {
                    assert!(
                        asset(name).is_some(),
                        "{page} refers to a missing asset {name}"
                    );
                } else {
                    assert!(
                        target.starts_with('/') || target.starts_with('#'),
                        "{page} refers to {target}, outside the console"
                    );
                }
            }
        }
        assert!(asset("echarts.min.js").expect("echarts").body.len() > 100_000);
        assert!(asset("../Cargo.toml").is_none());
    }
}
