//! Settings from the environment: how to reach NATS (URL, user/password, token, creds file,
//! nkey seed, TLS) and how a worker behaves (concurrency, ack wait, deliveries). Secrets are
//! never logged: `Debug` shows only whether they are set.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectOptions};

use crate::error::RuntimeError;

/// How to reach NATS. Every field comes from the standard variable named on it.
#[derive(Clone, Default)]
pub struct NatsSettings {
    /// `NATS_URL`, default `nats://127.0.0.1:4222`; several servers separated by commas.
    pub url: String,
    /// `NATS_USER` / `NATS_PASSWORD`.
    pub user: Option<String>,
    pub password: Option<String>,
    /// `NATS_TOKEN`.
    pub token: Option<String>,
    /// `NATS_CREDS`: a `.creds` file (JWT and nkey seed).
    pub creds_file: Option<PathBuf>,
    /// `NATS_NKEY_SEED` or a file named by `NATS_NKEY_FILE`.
    pub nkey_seed: Option<String>,
    /// `NATS_TLS_CA`: a CA bundle to trust.
    pub tls_ca: Option<PathBuf>,
    /// `NATS_TLS_CERT` / `NATS_TLS_KEY`: a client certificate.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// `NATS_TLS_REQUIRED=1`: refuse a plain connection.
    pub tls_required: bool,
}

impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("creds_file", &self.creds_file)
            .field("nkey_seed", &self.nkey_seed.as_ref().map(|_| "<set>"))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

impl NatsSettings {
    pub fn from_env() -> Result<Self, RuntimeError> {
        let nkey_seed = match (var("NATS_NKEY_SEED"), var("NATS_NKEY_FILE")) {
            (Some(seed), _) => Some(seed),
            (None, Some(path)) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|e| RuntimeError::Setting {
                        name: "NATS_NKEY_FILE",
                        reason: format!("cannot read {path}: {e}"),
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        Ok(NatsSettings {
            url: var("NATS_URL").unwrap_or_else(|| DEFAULT_NATS_URL.into()),
            user: var("NATS_USER"),
            password: var("NATS_PASSWORD"),
            token: var("NATS_TOKEN"),
            creds_file: var("NATS_CREDS").map(PathBuf::from),
            nkey_seed,
            tls_ca: var("NATS_TLS_CA").map(PathBuf::from),
            tls_cert: var("NATS_TLS_CERT").map(PathBuf::from),
            tls_key: var("NATS_TLS_KEY").map(PathBuf::from),
            tls_required: matches!(
                var("NATS_TLS_REQUIRED").as_deref(),
                Some("1" | "true" | "yes")
            ),
        })
    }

    /// Settings for a given URL and nothing else (tests, `lathe up`).
    pub fn with_url(url: impl Into<String>) -> Self {
        NatsSettings {
            url: url.into(),
            ..Default::default()
        }
    }

    async fn options(&self, name: &str) -> Result<ConnectOptions, RuntimeError> {
        let mut opts = ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect();
        if let Some(path) = &self.creds_file {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| RuntimeError::Setting {
                    name: "NATS_CREDS",
                    reason: format!("cannot read {}: {e}", path.display()),
                })?;
        }
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => opts = opts.user_and_password(u.clone(), p.clone()),
            (Some(_), None) => {
                return Err(RuntimeError::Setting {
                    name: "NATS_PASSWORD",
                    reason: "NATS_USER is set without it".into(),
                });
            }
            (None, Some(_)) => {
                return Err(RuntimeError::Setting {
                    name: "NATS_USER",
                    reason: "NATS_PASSWORD is set without it".into(),
                });
            }
            (None, None) => {}
        }
        if let Some(t) = &self.token {
            opts = opts.token(t.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            opts = opts.nkey(seed.clone());
        }
        if let Some(ca) = &self.tls_ca {
            opts = opts.add_root_certificates(ca.clone());
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => opts = opts.add_client_certificate(c.clone(), k.clone()),
            (Some(_), None) | (None, Some(_)) => {
                return Err(RuntimeError::Setting {
                    name: "NATS_TLS_CERT",
                    reason: "NATS_TLS_CERT and NATS_TLS_KEY must be set together".into(),
                });
            }
            _ => {}
        }
        if self.tls_required {
            opts = opts.require_tls(true);
        }
        Ok(opts)
    }
}

/// Connects to NATS, naming the connection after the service so that `nats server report
/// connections` shows who is who. Gives up after `timeout` when no server answers.
pub async fn connect(
    settings: &NatsSettings,
    name: &str,
    timeout: Duration,
) -> Result<Client, RuntimeError> {
    let opts = settings.options(name).await?;
    let urls: Vec<String> = settings
        .url
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let addrs: Vec<async_nats::ServerAddr> = urls
        .iter()
        .map(|u| {
            u.parse().map_err(|e| RuntimeError::Setting {
                name: "NATS_URL",
                reason: format!("`{u}`: {e}"),
            })
        })
        .collect::<Result<_, _>>()?;
    let client = tokio::time::timeout(timeout, opts.connect(addrs))
        .await
        .map_err(|_| RuntimeError::Connect {
            url: settings.url.clone(),
            reason: format!("no answer within {} s", timeout.as_secs()),
        })?
        .map_err(|e| RuntimeError::Connect {
            url: settings.url.clone(),
            reason: e.to_string(),
        })?;
    // `retry_on_initial_connect` returns before the first connection: wait for it, so that a
    // caller's first request does not race the handshake.
    let deadline = tokio::time::Instant::now() + timeout;
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() > deadline {
            return Err(RuntimeError::Connect {
                url: settings.url.clone(),
                reason: format!("no answer within {} s", timeout.as_secs()),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(client)
}

/// How a stage worker behaves.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// `LATHE_CONCURRENCY`: tasks one replica works on at once (default 1: training uses
    /// the cores already).
    pub concurrency: usize,
    /// `LATHE_ACK_WAIT_SECS`: how long a task may go without an in-progress ack before the
    /// server hands it to another replica (default 30).
    pub ack_wait: Duration,
    /// `LATHE_MAX_DELIVER`: deliveries of a task before it is dead-lettered (default 5).
    pub max_deliver: i64,
    /// `LATHE_WORKER_ID`: this replica's name in job records (default host:pid).
    pub id: String,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            concurrency: 1,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            id: crate::worker_id(),
        }
    }
}

impl WorkerSettings {
    pub fn from_env() -> Result<Self, RuntimeError> {
        let mut s = WorkerSettings::default();
        if let Some(v) = var("LATHE_CONCURRENCY") {
            s.concurrency = v
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or(RuntimeError::Setting {
                    name: "LATHE_CONCURRENCY",
                    reason: format!("`{v}` is not a whole number ≥ 1"),
                })?;
        }
        if let Some(v) = var("LATHE_ACK_WAIT_SECS") {
            let secs: f64 =
                v.parse()
                    .ok()
                    .filter(|n: &f64| *n >= 1.0)
                    .ok_or(RuntimeError::Setting {
                        name: "LATHE_ACK_WAIT_SECS",
                        reason: format!("`{v}` is not a number of seconds ≥ 1"),
                    })?;
            s.ack_wait = Duration::from_secs_f64(secs);
        }
        if let Some(v) = var("LATHE_MAX_DELIVER") {
            s.max_deliver = v
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or(RuntimeError::Setting {
                    name: "LATHE_MAX_DELIVER",
                    reason: format!("`{v}` is not a whole number ≥ 1"),
                })?;
        }
        if let Some(v) = var("LATHE_WORKER_ID") {
            s.id = v;
        }
        Ok(s)
    }
}
