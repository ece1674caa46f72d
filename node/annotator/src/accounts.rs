//! Accounts, roles and sessions.
//!
//! - Passwords: argon2id (the `argon2` crate's default parameters: m = 19 MiB, t = 2, p = 1,
//!   OWASP's minimum), a random salt per hash, stored in PHC form; at least 12 characters.
//! - Sessions: a 256-bit random token goes to the browser; the catalog keeps only its SHA-256.
//!   A session ends after [`IDLE`] without a request or [`ABSOLUTE`] after login, when the
//!   account is disabled or its password changes, and at logout.
//! - Every change to an account is in the audit chain; logins are not, but failures are
//!   counted by the caller for rate limiting.

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use fc_store::audit::{AuditRecord, utc_now};
use fc_store::catalog::{Catalog, CatalogError, UserRecord};
use ring::rand::SecureRandom;

/// A session's idle timeout (seconds).
pub const IDLE: i64 = 30 * 60;
/// A session's absolute lifetime (seconds).
pub const ABSOLUTE: i64 = 12 * 60 * 60;
/// The shortest password accepted.
pub const MIN_PASSWORD: usize = 12;

/// What a user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees only assigned cases and, blinded, only their own work.
    Annotator,
    /// Sees every rater's work and agreement, adjudicates, returns cases.
    Reviewer,
    /// Users, projects, import and export.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Annotator => "annotator",
            Role::Reviewer => "reviewer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Annotator, Role::Reviewer, Role::Admin]
            .into_iter()
            .find(|r| r.name() == s)
    }
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("user name {0:?}: use letters, digits, '-', '_' or '.', at most 64 characters")]
    Name(String),
    #[error("a password needs at least {MIN_PASSWORD} characters")]
    WeakPassword,
    #[error("user {0} exists")]
    Exists(String),
    #[error("no user {0}")]
    NoUser(String),
    #[error("hashing the password: {0}")]
    Hash(String),
    #[error("the random generator failed")]
    Random,
}

/// Why a login or a session is refused (the same words for an unknown user and a wrong
/// password, so a failed login does not say which names exist).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("wrong user name or password")]
    Credentials,
    #[error("the session has ended; log in again")]
    Expired,
}

/// A logged-in user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub role: Role,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The argon2id hash of a password, in PHC form.
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(AccountError::WeakPassword);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

/// Whether `password` matches the PHC hash.
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

fn token_hash(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Add an account.
pub fn add(
    catalog: &mut Catalog,
    name: &str,
    role: Role,
    password: &str,
) -> Result<(), AccountError> {
    if !valid_name(name) {
        return Err(AccountError::Name(name.to_owned()));
    }
    let at = utc_now();
    let u = UserRecord {
        name: name.to_owned(),
        role: role.name().to_owned(),
        password: hash_password(password)?,
        disabled: false,
        created: at.clone(),
        changed: at,
    };
    let record = AuditRecord::now(
        "user-add",
        serde_json::json!({"user": name, "role": role.name()}),
    );
    if !catalog.add_user(&u, &record)? {
        return Err(AccountError::Exists(name.to_owned()));
    }
    Ok(())
}

/// Change a password (the account's sessions end).
pub fn passwd(catalog: &mut Catalog, name: &str, password: &str) -> Result<(), AccountError> {
    let hash = hash_password(password)?;
    let record = AuditRecord::now("user-passwd", serde_json::json!({"user": name}));
    if !catalog.set_password(name, &hash, &utc_now(), &record)? {
        return Err(AccountError::NoUser(name.to_owned()));
    }
    Ok(())
}

/// Disable or enable an account (disabling ends its sessions).
pub fn set_disabled(catalog: &mut Catalog, name: &str, disabled: bool) -> Result<(), AccountError> {
    let record = AuditRecord::now(
        if disabled {
            "user-disable"
        } else {
            "user-enable"
        },
        serde_json::json!({"user": name}),
    );
    if !catalog.set_disabled(name, disabled, &utc_now(), &record)? {
        return Err(AccountError::NoUser(name.to_owned()));
    }
    Ok(())
}

/// Log in: a new session token, or why not. A disabled account is refused like a wrong
/// password.
pub fn login(
    catalog: &Catalog,
    name: &str,
    password: &str,
    now: i64,
) -> Result<Result<String, Denied>, AccountError> {
    let user = catalog.user(name)?;
    // Verify against a fixed hash when the user is unknown, so timing does not tell either.
    let ok = match &user {
        Some(u) => verify_password(&u.password, password) && !u.disabled,
        None => {
            let _ = verify_password(dummy_hash(), password);
            false
        }
    };
    if !ok {
        return Ok(Err(Denied::Credentials));
    }
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| AccountError::Random)?;
    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
    catalog.create_session(&token_hash(&token), name, now)?;
    Ok(Ok(token))
}

/// The user of a session token, if the session is live (and it is marked used now).
pub fn session(
    catalog: &Catalog,
    token: &str,
    now: i64,
) -> Result<Result<Principal, Denied>, AccountError> {
    session_within(catalog, token, now, IDLE, ABSOLUTE)
}

/// [`session`] with other limits: `idle` seconds without a request, `absolute` after login.
pub fn session_within(
    catalog: &Catalog,
    token: &str,
    now: i64,
    idle: i64,
    absolute: i64,
) -> Result<Result<Principal, Denied>, AccountError> {
    let h = token_hash(token);
    let Some(s) = catalog.session(&h)? else {
        return Ok(Err(Denied::Expired));
    };
    let user = catalog.user(&s.user)?;
    let live = now - s.last_seen <= idle && now - s.created <= absolute;
    match user {
        Some(u) if live && !u.disabled => {
            catalog.touch_session(&h, now)?;
            let role = Role::parse(&u.role).unwrap_or(Role::Annotator);
            Ok(Ok(Principal { user: u.name, role }))
        }
        _ => {
            catalog.end_session(&h)?;
            Ok(Err(Denied::Expired))
        }
    }
}

/// Log out.
pub fn logout(catalog: &Catalog, token: &str) -> Result<(), AccountError> {
    Ok(catalog.end_session(&token_hash(token))?)
}

/// An argon2id hash of a random password, verified against for unknown users.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        let mut b = [0u8; 16];
        let _ = ring::rand::SystemRandom::new().fill(&mut b);
        let password: String = b.iter().map(|x| format!("{x:02x}")).collect();
        hash_password(&password).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Catalog::open(&dir.path().join("catalog.sqlite")).expect("catalog");
        (dir, c)
    }

    #[test]
    fn passwords_are_argon2id_salted_and_checked() {
        assert!(matches!(
            hash_password("short"),
            Err(AccountError::WeakPassword)
        ));
        let a = hash_password("correct horse battery").expect("hash");
        let b = hash_password("correct horse battery").expect("hash");
        assert!(a.starts_with("$argon2id$") && a != b, "salted");
        assert!(verify_password(&a, "correct horse battery"));
        assert!(!verify_password(&a, "correct horse batterY"));
        assert!(!verify_password("not a hash", "x"));
    }

    #[test]
    fn sessions_end_when_idle_old_disabled_or_logged_out() {
        let (_d, mut c) = catalog();
        add(&mut c, "alice", Role::Reviewer, "a long enough secret").expect("add");
        assert!(matches!(
            add(&mut c, "alice", Role::Admin, "another long secret"),
            Err(AccountError::Exists(_))
        ));
        assert!(matches!(
            add(&mut c, "a/b", Role::Admin, "another long secret"),
            Err(AccountError::Name(_))
        ));
        let t0 = 1_000_000;
        assert_eq!(
            login(&c, "alice", "wrong password!!", t0).expect("login"),
            Err(Denied::Credentials)
        );
        assert_eq!(
            login(&c, "mallory", "a long enough secret", t0).expect("login"),
            Err(Denied::Credentials)
        );
        let token = login(&c, "alice", "a long enough secret", t0)
            .expect("login")
            .expect("token");
        // Only the hash is stored.
        assert!(c.session(&token).expect("lookup").is_none());
        let p = session(&c, &token, t0 + 60)
            .expect("session")
            .expect("live");
        assert_eq!((p.user.as_str(), p.role), ("alice", Role::Reviewer));
        // Used within the idle time, it lives on; idle longer, it ends for good.
        assert!(
            session(&c, &token, t0 + 60 + IDLE)
                .expect("session")
                .is_ok()
        );
        assert_eq!(
            session(&c, &token, t0 + 60 + 2 * IDLE + 1).expect("session"),
            Err(Denied::Expired)
        );
        assert_eq!(
            session(&c, &token, t0 + 61).expect("session"),
            Err(Denied::Expired)
        );
        // Kept busy, it still ends at the absolute limit.
        let token = login(&c, "alice", "a long enough secret", t0)
            .expect("login")
            .expect("token");
        let mut t = t0;
        while t < t0 + ABSOLUTE {
            t += IDLE / 2;
            let live = session(&c, &token, t).expect("session");
            assert_eq!(live.is_ok(), t - t0 <= ABSOLUTE, "at {}", t - t0);
        }
        // A password change and a disabled account end sessions; disabled cannot log in.
        let token = login(&c, "alice", "a long enough secret", t0)
            .expect("login")
            .expect("token");
        passwd(&mut c, "alice", "a new long enough secret").expect("passwd");
        assert_eq!(
            session(&c, &token, t0 + 1).expect("session"),
            Err(Denied::Expired)
        );
        let token = login(&c, "alice", "a new long enough secret", t0)
            .expect("login")
            .expect("token");
        set_disabled(&mut c, "alice", true).expect("disable");
        assert_eq!(
            session(&c, &token, t0 + 1).expect("session"),
            Err(Denied::Expired)
        );
        assert_eq!(
            login(&c, "alice", "a new long enough secret", t0).expect("login"),
            Err(Denied::Credentials)
        );
        set_disabled(&mut c, "alice", false).expect("enable");
        let token = login(&c, "alice", "a new long enough secret", t0)
            .expect("login")
            .expect("token");
        logout(&c, &token).expect("logout");
        assert_eq!(
            session(&c, &token, t0 + 1).expect("session"),
            Err(Denied::Expired)
        );
        // Account changes are audited; no password or hash is in the audit details.
        let entries = c.audit_entries().expect("audit");
        let actions: Vec<&str> = entries.iter().map(|e| e.record.action.as_str()).collect();
        assert!(
            actions.contains(&"user-add")
                && actions.contains(&"user-passwd")
                && actions.contains(&"user-disable")
        );
        assert!(entries.iter().all(|e| !e.record.detail.contains("argon2") && !e.record.detail.contains("secret")));
    }
}
