//! Signed-in browsers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The stem of the session cookie's name.
pub const COOKIE: &str = "confer_session";

/// Most sessions kept at once; signing in beyond it ends the oldest.
const MAX_SESSIONS: usize = 10_000;

struct Session {
    secret: String,
    expires: Instant,
}

/// Sessions by id. The secret a browser signed in with (a bearer token)
/// stays here, in memory only, and is checked again on every request.
pub struct Sessions {
    ttl: Duration,
    secure: bool,
    /// The cookie's name: one per console (browsers share cookies across
    /// the ports of a host), `__Host-` over HTTPS so no other host of the
    /// domain can plant one.
    name: String,
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Sessions that last `ttl` from sign-in, for the console on `port`
    /// (`secure`: served over HTTPS).
    pub fn new(ttl: Duration, port: u16, secure: bool) -> Self {
        Self {
            ttl,
            secure,
            name: if secure {
                format!("__Host-{COOKIE}_{port}")
            } else {
                format!("{COOKIE}_{port}")
            },
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The cookie's name.
    pub fn cookie_name(&self) -> &str {
        &self.name
    }

    /// How long a session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Starts a session for `secret`; returns its id (256 random bits from
    /// the OS).
    pub fn create(&self, secret: &str) -> Result<String, String> {
        let mut id = [0u8; 32];
        getrandom::fill(&mut id).map_err(|e| format!("no randomness from the OS: {e}"))?;
        let id = hex::encode(id);
        let now = Instant::now();
        let mut map = self
            .map
            .lock()
            .map_err(|_| "session lock poisoned".to_string())?;
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            id.clone(),
            Session {
                secret: secret.to_string(),
                expires: now + self.ttl,
            },
        );
        Ok(id)
    }

    /// The secret of a live session.
    pub fn secret(&self, id: &str) -> Option<String> {
        let map = self.map.lock().ok()?;
        map.get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.secret.clone())
    }

    /// Ends a session.
    pub fn end(&self, id: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(id);
        }
    }

    /// This console's session id in a `Cookie` header, if any.
    pub fn id_in<'a>(&self, cookie_header: &'a str) -> Option<&'a str> {
        cookie_header
            .split(';')
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == self.name)
            .map(|(_, v)| v.trim())
    }

    /// The secret of the live session a request's cookies name.
    pub fn secret_in(&self, cookie_header: &str) -> Option<String> {
        self.secret(self.id_in(cookie_header)?)
    }

    /// Starts a session for `secret` and sets its cookie on `reply`.
    pub fn start(
        &self,
        secret: &str,
        mut reply: axum::response::Response,
    ) -> Result<axum::response::Response, crate::reply::ApiError> {
        let id = self.create(secret).map_err(|e| {
            crate::reply::ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e)
        })?;
        if let Ok(v) = axum::http::HeaderValue::from_str(&self.cookie(&id)) {
            reply
                .headers_mut()
                .insert(axum::http::header::SET_COOKIE, v);
        }
        Ok(reply)
    }

    /// `DELETE /api/v1/session`: ends the request's session and clears its
    /// cookie.
    pub fn sign_out(&self, headers: &axum::http::HeaderMap) -> axum::response::Response {
        if let Some(id) = headers
            .get(axum::http::header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| self.id_in(v))
        {
            self.end(id);
        }
        let mut r = crate::reply::json(&serde_json::json!({"signed_out": true}));
        if let Ok(v) = axum::http::HeaderValue::from_str(&self.clear_cookie()) {
            r.headers_mut().insert(axum::http::header::SET_COOKIE, v);
        }
        r
    }

    /// The token of a sign-in request (`{"token": "..."}`).
    pub fn token_in(
        headers: &axum::http::HeaderMap,
        body: &[u8],
    ) -> Result<String, crate::reply::ApiError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct SignIn {
            token: String,
        }
        let SignIn { token } = crate::reply::parse_json(headers, body)?;
        Ok(token.trim().to_string())
    }

    /// The `Set-Cookie` value that starts session `id`.
    pub fn cookie(&self, id: &str) -> String {
        format!(
            "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.name,
            self.ttl.as_secs(),
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// The `Set-Cookie` value that ends a session.
    pub fn clear_cookie(&self) -> String {
        format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
            self.name,
            if self.secure { "; Secure" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_end() {
        let s = Sessions::new(Duration::from_millis(50), 8443, true);
        let a = s.create("tok-a").expect("create");
        let b = s.create("tok-b").expect("create");
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(s.secret(&a).as_deref(), Some("tok-a"));
        s.end(&a);
        assert_eq!(s.secret(&a), None);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(s.secret(&b), None, "expired");
        assert_eq!(s.secret("not-a-session"), None);
        assert_eq!(
            s.id_in("x=1; __Host-confer_session_8443=abc ; y=2"),
            Some("abc")
        );
        // Another console's cookie on the same host is not this one's.
        assert_eq!(s.id_in("x=1; confer_session_8480=abc"), None);
        assert!(
            s.cookie("abc")
                .starts_with("__Host-confer_session_8443=abc; Path=/; HttpOnly; SameSite=Strict")
        );
        assert!(s.cookie("abc").ends_with("; Secure"));
        let plain = Sessions::new(Duration::from_secs(1), 8080, false);
        assert!(plain.cookie("abc").starts_with("confer_session_8080=abc"));
        assert!(!plain.cookie("abc").contains("Secure"));
        assert!(plain.clear_cookie().contains("Max-Age=0"));
    }
}
