//! The catalog's accounts and sessions for the web annotator. Passwords are stored as
//! argon2id hashes (made by the caller), sessions by a hash of their token only. Every change
//! to an account is written with its audit entry.

use rusqlite::{OptionalExtension, params};

use super::{Catalog, CatalogError};
use crate::audit::AuditRecord;

/// A local account.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UserRecord {
    pub name: String,
    /// `annotator`, `reviewer` or `admin`.
    pub role: String,
    /// The argon2id hash in PHC form (never printed).
    #[serde(skip)]
    pub password: String,
    pub disabled: bool,
    pub created: String,
    pub changed: String,
}

/// A session: who, and when it started and was last used (seconds since the epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub user: String,
    pub created: i64,
    pub last_seen: i64,
}

impl Catalog {
    /// Add an account; false if the name is taken.
    pub fn add_user(&mut self, u: &UserRecord, record: &AuditRecord) -> Result<bool, CatalogError> {
        self.with_audit(record, |tx| {
            Ok(tx.execute(
                "INSERT OR IGNORE INTO users (name, role, password, disabled, created, changed) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![u.name, u.role, u.password, u.disabled, u.created, u.changed],
            )? == 1)
        })
    }

    /// Replace an account's password hash (its sessions end); false if there is no such account.
    pub fn set_password(
        &mut self,
        name: &str,
        password: &str,
        at: &str,
        record: &AuditRecord,
    ) -> Result<bool, CatalogError> {
        self.with_audit(record, |tx| {
            let n = tx.execute(
                "UPDATE users SET password = ?2, changed = ?3 WHERE name = ?1",
                params![name, password, at],
            )?;
            tx.execute("DELETE FROM sessions WHERE user = ?1", params![name])?;
            Ok(n == 1)
        })
    }

    /// Disable (or enable) an account; disabling ends its sessions.
    pub fn set_disabled(
        &mut self,
        name: &str,
        disabled: bool,
        at: &str,
        record: &AuditRecord,
    ) -> Result<bool, CatalogError> {
        self.with_audit(record, |tx| {
            let n = tx.execute(
                "UPDATE users SET disabled = ?2, changed = ?3 WHERE name = ?1",
                params![name, disabled, at],
            )?;
            if disabled {
                tx.execute("DELETE FROM sessions WHERE user = ?1", params![name])?;
            }
            Ok(n == 1)
        })
    }

    /// Every account, by name.
    pub fn users(&self) -> Result<Vec<UserRecord>, CatalogError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT name, role, password, disabled, created, changed FROM users ORDER BY name",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok(UserRecord {
                    name: r.get(0)?,
                    role: r.get(1)?,
                    password: r.get(2)?,
                    disabled: r.get(3)?,
                    created: r.get(4)?,
                    changed: r.get(5)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// One account.
    pub fn user(&self, name: &str) -> Result<Option<UserRecord>, CatalogError> {
        Ok(self.users()?.into_iter().find(|u| u.name == name))
    }

    /// Record a session (by the hash of its token).
    pub fn create_session(
        &self,
        token_hash: &str,
        user: &str,
        now: i64,
    ) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "INSERT INTO sessions (token_hash, user, created, last_seen) VALUES (?1, ?2, ?3, ?3)",
                params![token_hash, user, now],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// The session with this token hash.
    pub fn session(&self, token_hash: &str) -> Result<Option<SessionRecord>, CatalogError> {
        self.conn
            .query_row(
                "SELECT user, created, last_seen FROM sessions WHERE token_hash = ?1",
                params![token_hash],
                |r| {
                    Ok(SessionRecord {
                        user: r.get(0)?,
                        created: r.get(1)?,
                        last_seen: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(self.err())
    }

    /// Mark a session used now.
    pub fn touch_session(&self, token_hash: &str, now: i64) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "UPDATE sessions SET last_seen = ?2 WHERE token_hash = ?1",
                params![token_hash, now],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// End a session.
    pub fn end_session(&self, token_hash: &str) -> Result<(), CatalogError> {
        self.conn
            .execute(
                "DELETE FROM sessions WHERE token_hash = ?1",
                params![token_hash],
            )
            .map_err(self.err())?;
        Ok(())
    }
}
