//! API keys, event-source tokens and the per-key connection cap.
//!
//! This module owns who a caller is and what it may read:
//!
//! - keys come from a TOML document (`--keys-file` or `WALTAP_API_KEYS`); only a SHA-256
//!   digest of each secret is kept, compared in constant time, and shown nowhere (the
//!   `id` used in logs and tokens is a short prefix of the digest);
//! - a token is `base64url(claims JSON) "." base64url(HMAC-SHA256(claims))`: it carries the
//!   issuing key's rights, what it may be used for (one table and filter, or one stream)
//!   and its expiry. A token never grants more than its key had, and stops working when
//!   that key is removed from the configuration;
//! - [`ConnectionCap`] bounds the delivery connections open per key (tokens count against
//!   the key that issued them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::event::{Position, TableName};

/// The keys file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    /// The file could not be read.
    #[error("cannot read the keys file {path}")]
    Read {
        /// The file's path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape (the parser's message).
    #[error("invalid keys configuration: {0}")]
    Parse(String),
    /// A key's secret is empty.
    #[error("invalid keys configuration: key #{index} has an empty secret")]
    EmptySecret {
        /// The key's place among the `[[key]]` entries, from 0.
        index: usize,
    },
    /// The file configures no key at all.
    #[error(
        "invalid keys configuration: no [[key]] entries (every endpoint but /healthz needs a key)"
    )]
    NoKeys,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    token_secret: Option<String>,
    #[serde(default)]
    key: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    secret: String,
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    streams: bool,
}

/// The tables a key may read: `["*"]` for all, otherwise `schema.table` (or `table` for
/// schema `public`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tables(Vec<String>);

impl Tables {
    /// Whether the key may read `table`.
    pub fn allows(&self, table: &TableName) -> bool {
        self.0
            .iter()
            .any(|t| t == "*" || TableName::parse(t) == *table)
    }
}

/// One configured key. The secret itself is not kept.
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
    /// The tables it may subscribe to.
    pub tables: Tables,
    /// Whether it may manage and consume persisted streams.
    pub streams: bool,
}

impl ApiKey {
    /// A short, non-secret name for logs and tokens.
    pub fn id(&self) -> String {
        self.digest[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id())
            .field("tables", &self.tables)
            .field("streams", &self.streams)
            .finish()
    }
}

/// The configured keys and the token signing secret.
#[derive(Clone)]
pub struct Keys {
    keys: Vec<ApiKey>,
    token_secret: Arc<[u8]>,
    /// Tokens signed with a random per-process secret do not survive a restart.
    pub token_secret_configured: bool,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("keys", &self.keys)
            .field("token_secret", &"<redacted>")
            .finish()
    }
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

impl Keys {
    /// Reads the keys file described in the README ("HTTP API") (`[[key]]` with `secret`, `tables`,
    /// `streams`, and optionally a top-level `token_secret`). `token_secret` from the
    /// environment, when given, wins over the file's.
    pub fn from_toml(text: &str, token_secret: Option<&str>) -> Result<Keys, KeysError> {
        let file: KeysFile =
            toml::from_str(text).map_err(|e| KeysError::Parse(e.message().to_owned()))?;
        if file.key.is_empty() {
            return Err(KeysError::NoKeys);
        }
        let mut keys = Vec::with_capacity(file.key.len());
        for (index, k) in file.key.into_iter().enumerate() {
            if k.secret.is_empty() {
                return Err(KeysError::EmptySecret { index });
            }
            for t in k.tables.iter().filter(|t| *t != "*") {
                TableName::parse_strict(t)
                    .map_err(|e| KeysError::Parse(format!("key #{index}: {e}")))?;
            }
            keys.push(ApiKey {
                digest: digest(k.secret.as_bytes()),
                tables: Tables(k.tables),
                streams: k.streams,
            });
        }
        let configured = token_secret
            .map(str::to_owned)
            .or(file.token_secret)
            .filter(|s| !s.is_empty());
        let (token_secret, token_secret_configured): (Arc<[u8]>, bool) = match configured {
            Some(s) => (s.into_bytes().into(), true),
            None => {
                // Two ULIDs: 160 random bits, from the OS generator the ulid crate uses.
                let random = format!("{}{}", ulid::Ulid::new(), ulid::Ulid::new());
                (digest(random.as_bytes()).to_vec().into(), false)
            }
        };
        Ok(Keys {
            keys,
            token_secret,
            token_secret_configured,
        })
    }

    /// Reads a keys file.
    pub fn from_file(
        path: &std::path::Path,
        token_secret: Option<&str>,
    ) -> Result<Keys, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Keys::from_toml(&text, token_secret)
    }

    /// The key whose secret is `secret`. Every configured key is compared, each in
    /// constant time, so the time taken tells nothing about which or how much matched.
    pub fn find(&self, secret: &str) -> Option<&ApiKey> {
        let d = digest(secret.as_bytes());
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.digest.ct_eq(&d)) {
                found = Some(k);
            }
        }
        found
    }

    fn by_id(&self, id: &str) -> Option<&ApiKey> {
        self.keys.iter().find(|k| k.id() == id)
    }

    fn mac(&self) -> hmac::Hmac<Sha256> {
        // HMAC takes keys of any length.
        <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(&self.token_secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    /// Signs `claims` into a token.
    pub fn sign(&self, claims: &Claims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{payload}.{tag}")
    }

    /// The claims of a token signed here, still valid, whose key still exists.
    pub fn verify(&self, token: &str) -> Result<(Claims, ApiKey), ApiError> {
        let (payload, tag) = token.split_once('.').ok_or(ApiError::Unauthorized)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| ApiError::Unauthorized)?;
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        mac.verify_slice(&tag).map_err(|_| ApiError::Unauthorized)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(ApiError::Unauthorized)?;
        if claims.exp <= now_secs() {
            return Err(ApiError::TokenExpired);
        }
        let key = self
            .by_id(&claims.key)
            .ok_or(ApiError::Unauthorized)?
            .clone();
        Ok((claims, key))
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a token says. Short field names keep URLs short.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The issuing key's id.
    #[serde(rename = "k")]
    pub key: String,
    /// For a subscription: the table and filter (JSON). The table is written as
    /// `[schema, name]`; tokens made before that carry `"schema.table"` text, which is
    /// read only when it names one table unambiguously (one dot, no quote).
    #[serde(
        rename = "t",
        default,
        skip_serializing_if = "Option::is_none",
        with = "token_table"
    )]
    pub table: Option<TableName>,
    /// The subscription's filter, as JSON; `None` for no filter.
    #[serde(rename = "f", default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<serde_json::Value>,
    /// For a persisted stream: its name.
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Where a stream resumes (after this position) when the client sends none.
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// The token's table as a `[schema, name]` pair, never as text to parse again.
mod token_table {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::event::TableName;

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Form {
        Pair(String, String),
        /// Tokens issued before the pair form.
        Text(String),
    }

    pub fn serialize<S: Serializer>(t: &Option<TableName>, s: S) -> Result<S::Ok, S::Error> {
        t.as_ref()
            .map(|t| Form::Pair(t.schema.clone(), t.table.clone()))
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TableName>, D::Error> {
        match Option::<Form>::deserialize(d)? {
            None => Ok(None),
            Some(Form::Pair(schema, table)) => Ok(Some(TableName { schema, table })),
            Some(Form::Text(text)) => {
                // Issued as `schema.table` without quoting: exact only with one dot and
                // no quote; anything else may name another table, so the token is refused.
                if text.contains('"') || text.matches('.').count() != 1 {
                    return Err(serde::de::Error::custom("ambiguous table in a token"));
                }
                Ok(Some(TableName::parse(&text)))
            }
        }
    }
}

/// Who is calling: a key, directly or through a token it issued.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key: ApiKey,
    /// Set when the caller authenticated with a token: then only what it names is allowed.
    pub token: Option<Claims>,
}

impl Caller {
    pub fn check_table(&self, table: &TableName) -> Result<(), ApiError> {
        if self.key.tables.allows(table) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this key may not read table {table}"
            )))
        }
    }

    /// May manage or consume streams at all.
    pub fn check_streams(&self) -> Result<(), ApiError> {
        if self.key.streams {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "this key may not manage or consume streams".into(),
            ))
        }
    }

    /// Refuses token callers on endpoints that tokens do not open (management).
    pub fn require_key(&self) -> Result<(), ApiError> {
        match self.token {
            None => Ok(()),
            Some(_) => Err(ApiError::Forbidden(
                "tokens only open delivery endpoints; use an API key".into(),
            )),
        }
    }
}

/// Counts open delivery connections per key.
#[derive(Debug)]
pub struct ConnectionCap {
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// Holds one of a key's connection slots until dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    key: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl ConnectionCap {
    pub fn new(max: usize) -> Self {
        ConnectionCap {
            max: max.max(1),
            open: Arc::default(),
        }
    }

    pub fn acquire(&self, key: &ApiKey) -> Result<ConnectionSlot, ApiError> {
        let id = key.id();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(id.clone()).or_insert(0);
        if *n >= self.max {
            return Err(ApiError::TooManyConnections(self.max));
        }
        *n += 1;
        Ok(ConnectionSlot {
            key: id,
            open: self.open.clone(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn keys() -> Keys {
        Keys::from_toml(
            r#"
            [[key]]
            secret = "alpha"
            tables = ["public.orders"]
            streams = true
            [[key]]
            secret = "beta"
            tables = ["*"]
            "#,
            Some("sign"),
        )
        .unwrap()
    }

    #[test]
    fn keys_match_by_secret_and_hide_it() {
        let keys = keys();
        let a = keys.find("alpha").unwrap();
        assert!(a.streams && a.tables.allows(&TableName::parse("orders")));
        assert!(!a.tables.allows(&TableName::parse("public.users")));
        assert!(keys
            .find("beta")
            .unwrap()
            .tables
            .allows(&TableName::parse("x.y")));
        assert!(keys.find("alph").is_none() && keys.find("").is_none());
        let shown = format!("{keys:?}");
        assert!(
            !shown.contains("alpha") && !shown.contains("sign"),
            "{shown}"
        );
        let inline = Keys::from_toml(r#"key = [{secret = "s", tables = ["*"]}]"#, None).unwrap();
        assert!(!inline.token_secret_configured && inline.find("s").is_some());
        assert!(Keys::from_toml("", None).is_err());
        assert!(Keys::from_toml("[[key]]\nsecret = \"\"", None).is_err());
        assert!(Keys::from_toml("[[key]]\nsecret = \"s\"\ntables = [\"a.b.c\"]", None).is_err());
    }

    #[test]
    fn tokens_verify_expire_and_resist_tampering() {
        let keys = keys();
        let key = keys.find("alpha").unwrap();
        let claims = Claims {
            key: key.id(),
            table: Some(TableName::parse("public.orders")),
            filter: None,
            stream: None,
            position: None,
            exp: now_secs() + 60,
        };
        let token = keys.sign(&claims);
        let (back, k) = keys.verify(&token).unwrap();
        assert_eq!(back.table, Some(TableName::parse("public.orders")));
        assert_eq!(k.id(), key.id());
        let (payload, tag) = token.split_once('.').unwrap();
        let forged = Claims {
            table: Some(TableName::parse("public.users")),
            ..claims.clone()
        };
        let forged_payload = keys.sign(&forged);
        let forged_payload = forged_payload.split_once('.').unwrap().0;
        assert!(matches!(
            keys.verify(&format!("{forged_payload}.{tag}")),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            keys.verify(&format!("{payload}.x{tag}")),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            keys.verify("garbage"),
            Err(ApiError::Unauthorized)
        ));
        let expired = keys.sign(&Claims {
            exp: now_secs() - 1,
            ..claims
        });
        assert!(matches!(keys.verify(&expired), Err(ApiError::TokenExpired)));
        let other = Keys::from_toml("[[key]]\nsecret = \"alpha\"", Some("other")).unwrap();
        assert!(matches!(other.verify(&token), Err(ApiError::Unauthorized)));
    }

    #[test]
    fn token_tables_are_pairs_and_old_text_only_when_unambiguous() {
        let keys = keys();
        let key = keys.find("alpha").unwrap();
        let weird = TableName {
            schema: "public".into(),
            table: "a.b".into(),
        };
        let token = keys.sign(&Claims {
            key: key.id(),
            table: Some(weird.clone()),
            filter: None,
            stream: None,
            position: None,
            exp: now_secs() + 60,
        });
        assert_eq!(keys.verify(&token).unwrap().0.table, Some(weird));
        // Tokens issued with `"t": "schema.table"` text.
        let legacy = |t: &str| {
            let claims = serde_json::json!({"k": key.id(), "t": t, "exp": now_secs() + 60});
            let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
            let mut mac = keys.mac();
            mac.update(payload.as_bytes());
            let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
            keys.verify(&format!("{payload}.{tag}"))
        };
        assert_eq!(
            legacy("public.orders").unwrap().0.table,
            Some(TableName::parse("public.orders"))
        );
        for ambiguous in ["public.a.b", "My Schema.We\"ird Tab", "orders"] {
            assert!(
                matches!(legacy(ambiguous), Err(ApiError::Unauthorized)),
                "{ambiguous}"
            );
        }
    }

    #[test]
    fn connection_cap_counts_per_key() {
        let keys = keys();
        let cap = ConnectionCap::new(2);
        let a = keys.find("alpha").unwrap();
        let one = cap.acquire(a).unwrap();
        let _two = cap.acquire(a).unwrap();
        assert!(matches!(
            cap.acquire(a),
            Err(ApiError::TooManyConnections(2))
        ));
        assert!(cap.acquire(keys.find("beta").unwrap()).is_ok());
        drop(one);
        assert!(cap.acquire(a).is_ok());
    }
}
