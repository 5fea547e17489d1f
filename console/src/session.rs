//! Signed-in browsers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The session cookie's name.
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
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Sessions that last `ttl` from sign-in.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
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

    /// The session id in a `Cookie` header, if any.
    pub fn id_in(cookie_header: &str) -> Option<&str> {
        cookie_header
            .split(';')
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE)
            .map(|(_, v)| v.trim())
    }

    /// The `Set-Cookie` value that starts session `id` (`secure` over TLS).
    pub fn cookie(&self, id: &str, secure: bool) -> String {
        format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.ttl.as_secs(),
            if secure { "; Secure" } else { "" }
        )
    }

    /// The `Set-Cookie` value that ends a session.
    pub fn clear_cookie(secure: bool) -> String {
        format!(
            "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
            if secure { "; Secure" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_end() {
        let s = Sessions::new(Duration::from_millis(50));
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
            Sessions::id_in("x=1; confer_session=abc ; y=2"),
            Some("abc")
        );
        assert_eq!(Sessions::id_in("x=1"), None);
        assert!(s.cookie("abc", true).contains("HttpOnly; SameSite=Strict"));
        assert!(s.cookie("abc", true).ends_with("; Secure"));
        assert!(!s.cookie("abc", false).contains("Secure"));
    }
}
