//! Dashboard logins: one-time codes and the sessions they open.
//!
//! `nightshift ui` asks the daemon (over its Unix socket, or with the bearer
//! token) for a login code and prints a URL with it. Opening the URL
//! redeems the code once for a session: a random id in an `HttpOnly`,
//! `SameSite=Strict` cookie, plus a CSRF token the page sends back in a
//! header with every state-changing request (see `api::auth`).
//!
//! Only SHA-256 digests of codes and session ids are kept, in memory: a
//! restart logs every browser out, and nothing secret is written anywhere.
//! Pure of the clock: every call takes `now_ms`.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// How long a login code may wait to be opened.
pub const CODE_TTL_MS: i64 = 5 * 60 * 1000;
/// How long a session lasts (then `nightshift ui` again).
pub const SESSION_TTL_MS: i64 = 12 * 60 * 60 * 1000;
/// Codes waiting at once; the oldest is dropped beyond.
const MAX_CODES: usize = 64;
/// Sessions at once; the oldest is dropped beyond.
const MAX_SESSIONS: usize = 256;

type Digest32 = [u8; 32];

/// The header a dashboard session's state-changing requests carry.
pub const CSRF_HEADER: &str = "x-nightshift-csrf";

/// The cookie holding a session id. The port is in the name because
/// cookies are not per port: two daemons on one host keep separate logins.
pub fn cookie_name(port: u16) -> String {
    format!("nightshift_session_{port}")
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

fn digest(secret: &str) -> Digest32 {
    Sha256::digest(secret.as_bytes()).into()
}

/// What a valid session cookie stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The token state-changing requests must carry in `X-Nightshift-CSRF`.
    pub csrf: String,
    pub expires_ms: i64,
}

/// A redeemed code: the cookie value to set and the session it opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub session_id: String,
    pub session: Session,
}

#[derive(Default)]
struct Inner {
    /// Code digest → expiry.
    codes: HashMap<Digest32, i64>,
    /// Session-id digest → session.
    sessions: HashMap<Digest32, Session>,
}

/// The daemon's logins, shared by every listener.
#[derive(Default)]
pub struct Sessions(Mutex<Inner>);

fn evict_oldest<V>(map: &mut HashMap<Digest32, V>, max: usize, expiry: impl Fn(&V) -> i64) {
    while map.len() > max {
        let Some(oldest) = map.iter().min_by_key(|(_, v)| expiry(v)).map(|(k, _)| *k) else {
            return;
        };
        map.remove(&oldest);
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `code` (random, from the caller) for [`CODE_TTL_MS`].
    /// Returns its expiry.
    pub fn issue_code(&self, code: &str, now_ms: i64) -> i64 {
        let mut inner = self.lock();
        inner.codes.retain(|_, exp| *exp > now_ms);
        let expires = now_ms + CODE_TTL_MS;
        inner.codes.insert(digest(code), expires);
        evict_oldest(&mut inner.codes, MAX_CODES, |e| *e);
        expires
    }

    /// Redeems `code` once: a session with the given random id and CSRF
    /// token, or `None` if the code is unknown, used or expired.
    pub fn redeem(
        &self,
        code: &str,
        session_id: String,
        csrf: String,
        now_ms: i64,
    ) -> Option<Opened> {
        let mut inner = self.lock();
        let expires = inner.codes.remove(&digest(code))?;
        if expires <= now_ms {
            return None;
        }
        inner.sessions.retain(|_, s| s.expires_ms > now_ms);
        let session = Session {
            csrf,
            expires_ms: now_ms + SESSION_TTL_MS,
        };
        inner.sessions.insert(digest(&session_id), session.clone());
        evict_oldest(&mut inner.sessions, MAX_SESSIONS, |s| s.expires_ms);
        Some(Opened {
            session_id,
            session,
        })
    }

    /// The live session a cookie value names.
    pub fn lookup(&self, session_id: &str, now_ms: i64) -> Option<Session> {
        let inner = self.lock();
        inner
            .sessions
            .get(&digest(session_id))
            .filter(|s| s.expires_ms > now_ms)
            .cloned()
    }

    /// Logs a session out.
    pub fn end(&self, session_id: &str) {
        self.lock().sessions.remove(&digest(session_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_opens_one_session_once() {
        let s = Sessions::default();
        s.issue_code("c1", 1_000);
        let opened = s.redeem("c1", "sid".into(), "tok".into(), 2_000).unwrap();
        assert_eq!(opened.session.csrf, "tok");
        assert_eq!(opened.session.expires_ms, 2_000 + SESSION_TTL_MS);
        assert_eq!(s.lookup("sid", 3_000).unwrap().csrf, "tok");
        // Used: a second redemption (a replayed URL) opens nothing.
        assert_eq!(s.redeem("c1", "sid2".into(), "t2".into(), 2_001), None);
        assert_eq!(s.lookup("sid2", 3_000), None);
        assert_eq!(
            s.redeem("never-issued", "x".into(), "y".into(), 2_001),
            None
        );
    }

    #[test]
    fn codes_and_sessions_expire() {
        let s = Sessions::default();
        s.issue_code("late", 0);
        assert_eq!(s.redeem("late", "a".into(), "b".into(), CODE_TTL_MS), None);
        s.issue_code("ok", 0);
        s.redeem("ok", "sid".into(), "t".into(), 10).unwrap();
        assert!(s.lookup("sid", 10 + SESSION_TTL_MS - 1).is_some());
        assert_eq!(s.lookup("sid", 10 + SESSION_TTL_MS), None);
    }

    #[test]
    fn logging_out_ends_the_session() {
        let s = Sessions::default();
        s.issue_code("c", 0);
        s.redeem("c", "sid".into(), "t".into(), 1).unwrap();
        s.end("sid");
        assert_eq!(s.lookup("sid", 2), None);
    }

    #[test]
    fn waiting_codes_and_sessions_are_bounded() {
        let s = Sessions::default();
        for i in 0..(MAX_CODES as i64 + 10) {
            s.issue_code(&format!("c{i}"), i);
        }
        // The oldest were dropped, the newest still open.
        assert_eq!(s.redeem("c0", "a".into(), "b".into(), 100), None);
        let last = format!("c{}", MAX_CODES + 9);
        assert!(s.redeem(&last, "a".into(), "b".into(), 100).is_some());
        for i in 0..(MAX_SESSIONS + 5) {
            s.issue_code(&format!("d{i}"), 200 + i as i64);
            s.redeem(
                &format!("d{i}"),
                format!("s{i}"),
                "t".into(),
                200 + i as i64,
            )
            .unwrap();
        }
        assert_eq!(s.lock().sessions.len(), MAX_SESSIONS);
        assert_eq!(s.lookup("s0", 1_000), None);
        assert!(s.lookup(&format!("s{}", MAX_SESSIONS + 4), 1_000).is_some());
    }
}
