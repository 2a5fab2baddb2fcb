//! Settings from the environment: how to reach NATS (URL, user/password, token, creds file,
//! nkey seed, TLS) and how a worker behaves (concurrency, ack wait, deliveries). Secrets are
//! never logged: `Debug` shows only whether they are set.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use async_nats::{Client, ClientError, ConnectOptions, Event, ServerError};

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
    /// `NATS_INBOX_PREFIX`: the prefix of this connection's reply subjects (default
    /// `_INBOX`). With a prefix of its own per user, the server's permissions can keep other
    /// users from subscribing to a service's replies (artifact chunks, job records).
    pub inbox_prefix: Option<String>,
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
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// How async-nats names a refused login in its connection events.
const AUTHORIZATION_VIOLATION: &str = "authorization violation";

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
            tls_required: match var("NATS_TLS_REQUIRED") {
                None => false,
                Some(v) => parse_switch(&v).ok_or(RuntimeError::Setting {
                    name: "NATS_TLS_REQUIRED",
                    reason: format!("`{v}` is not one of 1/true/on/yes or 0/false/off/no"),
                })?,
            },
            inbox_prefix: match var("NATS_INBOX_PREFIX") {
                None => None,
                Some(p) if valid_subject_prefix(&p) => Some(p),
                Some(p) => {
                    return Err(RuntimeError::Setting {
                        name: "NATS_INBOX_PREFIX",
                        reason: format!(
                            "`{p}` is not a subject prefix (dot-separated tokens, no wildcards or spaces)"
                        ),
                    });
                }
            },
        })
    }

    /// Settings for a given URL and nothing else (tests, `lathe up`).
    pub fn with_url(url: impl Into<String>) -> Self {
        NatsSettings {
            url: url.into(),
            ..Default::default()
        }
    }

    /// The setting that holds the credentials this connection presents, for error messages.
    fn credential_setting(&self) -> &'static str {
        if self.creds_file.is_some() {
            "NATS_CREDS"
        } else if self.nkey_seed.is_some() {
            "NATS_NKEY_SEED"
        } else if self.token.is_some() {
            "NATS_TOKEN"
        } else {
            "NATS_USER"
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
        if let Some(prefix) = &self.inbox_prefix {
            opts = opts.custom_inbox_prefix(prefix);
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
    // With `retry_on_initial_connect` the first connection's failures arrive as events; keep
    // the last one, so that a refused login or a TLS failure is reported as such, not as
    // silence.
    let last_error: Arc<Mutex<Option<String>>> = Arc::default();
    let seen = last_error.clone();
    let opts = settings.options(name).await?.event_callback(move |event| {
        let seen = seen.clone();
        async move {
            let error = match event {
                Event::ClientError(ClientError::Other(e)) => Some(e),
                Event::ServerError(ServerError::AuthorizationViolation) => {
                    Some(AUTHORIZATION_VIOLATION.to_string())
                }
                _ => None,
            };
            if let Some(e) = error
                && let Ok(mut last) = seen.lock()
            {
                *last = Some(e);
            }
        }
    });
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
        let last = last_error.lock().ok().and_then(|l| l.clone());
        if last.as_deref() == Some(AUTHORIZATION_VIOLATION) {
            return Err(RuntimeError::Setting {
                name: settings.credential_setting(),
                reason: format!(
                    "the server at {} refused the login (authorization violation): check the \
                     credentials (NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_NKEY_SEED or \
                     NATS_CREDS)",
                    settings.url
                ),
            });
        }
        if tokio::time::Instant::now() > deadline {
            return Err(RuntimeError::Connect {
                url: settings.url.clone(),
                reason: match last {
                    Some(e) => format!(
                        "not connected within {} s; last error: {e}",
                        timeout.as_secs()
                    ),
                    None => format!("no answer within {} s", timeout.as_secs()),
                },
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
    /// `LATHE_INTAKE`: whether this process also runs intake (consumes `lathe.jobs.submit`
    /// and publishes each job's first task). Default on; `0`/`false`/`off`/`no` turn it off,
    /// e.g. in the prod overlay, where only the trainer may publish to every stage.
    pub intake: bool,
    /// `LATHE_STREAM_REPLICAS`: copies the server cluster keeps of every stream, bucket and
    /// object store lathe provisions (1 to 5; 3 in the prod overlay, whose NATS cluster has
    /// three nodes, so that losing one loses nothing). Unset: new resources get 1 and
    /// existing ones keep theirs, so a process without the setting never scales a cluster's
    /// resources down.
    pub stream_replicas: Option<usize>,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            concurrency: 1,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            id: crate::worker_id(),
            intake: true,
            stream_replicas: None,
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
        if let Some(v) = var("LATHE_INTAKE") {
            s.intake = parse_switch(&v).ok_or(RuntimeError::Setting {
                name: "LATHE_INTAKE",
                reason: format!("`{v}` is not one of 1/true/on/yes or 0/false/off/no"),
            })?;
        }
        if let Some(v) = var("LATHE_STREAM_REPLICAS") {
            s.stream_replicas = Some(v.parse().ok().filter(|n| (1..=5).contains(n)).ok_or(
                RuntimeError::Setting {
                    name: "LATHE_STREAM_REPLICAS",
                    reason: format!(
                        "`{v}` is not a whole number from 1 to 5 (NATS keeps at most 5 copies)"
                    ),
                },
            )?);
        }
        Ok(s)
    }
}

fn valid_subject_prefix(p: &str) -> bool {
    p.split('.')
        .all(|t| !t.is_empty() && !t.contains(['*', '>']) && !t.chars().any(char::is_whitespace))
}

/// An on/off setting: `1`/`true`/`on`/`yes` or `0`/`false`/`off`/`no`, any case.
pub fn parse_switch(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}
