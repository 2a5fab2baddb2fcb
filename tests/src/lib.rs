//! Shared helpers of the end-to-end suite: a provisioned stack on a real nats-server,
//! in-process and out-of-process stage services, submission and waiting.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer;
use futures::StreamExt;
use lathe_proto::{JobEvent, JobId, JobRecord, codec, names};
use lathe_runtime::{NatsSettings, Resources, WorkerSettings, service};
use lathe_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

/// Worker settings for tests: a short ack wait so a killed worker's task comes back fast.
pub fn test_worker(id: &str) -> WorkerSettings {
    WorkerSettings {
        concurrency: 1,
        ack_wait: Duration::from_secs(3),
        max_deliver: 5,
        id: id.to_string(),
        intake: true,
        stream_replicas: None,
    }
}

/// A nats-server and a provisioned connection to it.
pub struct Stack {
    pub server: NatsServer,
    pub res: Resources,
}

pub async fn stack() -> Stack {
    let server = NatsServer::start();
    let res = connect(&server.url(), "test-client").await;
    Stack { server, res }
}

/// Connects and provisions (as every service does).
pub async fn connect(url: &str, id: &str) -> Resources {
    service::start("lathe-test", &NatsSettings::with_url(url), test_worker(id))
        .await
        .expect("connect and provision")
}

/// A trainer replica running in this process until the token is cancelled.
pub struct InProcess {
    pub stop: CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
}

impl InProcess {
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.handle.await;
    }
}

/// A stage service (intake and its worker) running in this process until stopped.
pub async fn start_stage<H: lathe_runtime::StageHandler>(
    url: &str,
    id: &str,
    service_name: &'static str,
    handler: H,
) -> InProcess {
    let res = connect(url, id).await;
    let stop = CancellationToken::new();
    let s = stop.clone();
    let handle = tokio::spawn(async move {
        service::serve(res, service_name, handler, s)
            .await
            .expect("the stage serves");
    });
    InProcess { stop, handle }
}

pub async fn start_trainer(url: &str, id: &str) -> InProcess {
    start_stage(url, id, "lathe-trainer", lathe_trainer::Trainer).await
}

/// A deployer replica (deploy stage + inference serving) running in this process.
pub async fn start_deployer(
    url: &str,
    id: &str,
    settings: lathe_deployer::ServeSettings,
) -> InProcess {
    let res = connect(url, id).await;
    let stop = CancellationToken::new();
    let s = stop.clone();
    let readiness = lathe_runtime::health::Readiness::default();
    readiness.provisioned(res.client.clone());
    let handle = tokio::spawn(async move {
        lathe_deployer::run(res, settings, None, readiness, s)
            .await
            .expect("the deployer serves");
    });
    InProcess { stop, handle }
}

/// Waits until `n` deployer replicas answer `$SRV.INFO.lathe-deployer` listing their
/// inference endpoint (the service answers discovery a moment before the endpoint is up).
pub async fn wait_for_deployers(client: &async_nats::Client, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let inbox = client.new_inbox();
        let mut sub = client.subscribe(inbox.clone()).await.expect("subscribe");
        client
            .publish_with_reply("$SRV.INFO.lathe-deployer", inbox, "".into())
            .await
            .expect("ping");
        let mut seen = 0;
        let wait = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                m = sub.next() => match m {
                    Some(m) => {
                        let info: serde_json::Value =
                            serde_json::from_slice(&m.payload).unwrap_or_default();
                        if info["endpoints"].as_array().is_some_and(|e| !e.is_empty()) {
                            seen += 1;
                        }
                    }
                    None => break,
                },
                _ = &mut wait => break,
            }
        }
        if seen >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{seen} of {n} deployer replicas answer"
        );
    }
}

/// Serving settings for tests: this replica's name, everything else default.
pub fn serve_settings(replica: &str) -> lathe_deployer::ServeSettings {
    lathe_deployer::ServeSettings {
        replica: replica.to_string(),
        ..Default::default()
    }
}

/// A quick `train → deploy` spec for model `model`; `deploy` is the deploy section's body.
pub fn deploy_spec(name: &str, model: &str, deploy: &str) -> Vec<u8> {
    format!(
        r#"{{"name": "{name}", "dataset": {{"source": "builtin:digits"}}, "model": {{"hidden": [32]}},
            "train": {{"epochs": 15, "patience": null, "seed": 1}}, "pipeline": ["train", "deploy"],
            "deploy": {{"model": "{model}"{deploy}}}}}"#
    )
    .into_bytes()
}

/// The directory holding the workspace's binaries (`cargo build --bins` puts them there).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

/// Starts a service binary as its own process.
pub fn spawn_service(bin: &str, url: &str, env: &[(&str, &str)]) -> Child {
    spawn_service_inner(bin, url, env, false)
}

/// Starts a service binary with its log output (stdout) piped to the test.
pub fn spawn_service_with_logs(bin: &str, url: &str, env: &[(&str, &str)]) -> Child {
    spawn_service_inner(bin, url, env, true)
}

fn spawn_service_inner(bin: &str, url: &str, env: &[(&str, &str)], piped: bool) -> Child {
    let path = bin_dir().join(bin);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; `just test` does)",
        path.display()
    );
    let mut cmd = Command::new(path);
    cmd.env("NATS_URL", url)
        .env("LATHE_ACK_WAIT_SECS", "3")
        .env("RUST_LOG", "info")
        .stdout(if piped {
            Stdio::piped()
        } else if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn service")
}

/// Publishes a spec with a plain NATS publish (as `nats pub` would), choosing its job id.
pub async fn submit(res: &Resources, payload: &[u8]) -> JobId {
    let job = JobId::new();
    let mut headers = HeaderMap::new();
    headers.insert(names::JOB_ID_HEADER, job.to_string().as_str());
    res.client
        .publish_with_headers(names::SUBMIT_SUBJECT, headers, payload.to_vec().into())
        .await
        .expect("publish");
    res.client.flush().await.expect("flush");
    job
}

/// Waits until the job's record is terminal; a failed read (e.g. while a cluster elects a
/// leader) is tried again until the timeout.
pub async fn wait_job(res: &Resources, job: JobId, timeout: Duration) -> JobRecord {
    let deadline = Instant::now() + timeout;
    loop {
        let read = res.jobs.get(job).await;
        if let Ok(Some((r, _))) = &read
            && r.state.is_terminal()
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "job {job} did not end within {timeout:?}: {read:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the `lathe` CLI binary with `args` and extra environment variables (NATS_URL,
/// NATS_USER, …) and returns its standard output; panics with its output if it fails.
pub async fn lathe_cli(args: &[&str], env: &[(&str, String)]) -> String {
    let mut cmd = std::process::Command::new(bin_dir().join("lathe"));
    cmd.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("the CLI's thread")
        .expect("run lathe (build the binaries first: `cargo build --workspace --bins`)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`lathe {}` failed: {}\n{stdout}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Every event of a job stored so far.
pub async fn events_of(res: &Resources, job: JobId) -> Vec<JobEvent> {
    let stream = res
        .js
        .get_stream(names::EVENTS_STREAM)
        .await
        .expect("events stream");
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: names::job_events_filter(job),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    read_pending(c)
        .await
        .iter()
        .map(|p| codec::from_msgpack(p).expect("event decodes"))
        .collect()
}

/// Every stored event of a job once its last one (completed, failed or rejected) is stored. A
/// worker writes the record's end first and publishes the last event after it (so that a
/// watcher reading the record on that event finds it ended), so a record seen terminal does
/// not yet mean its last event is stored.
pub async fn events_of_ended(res: &Resources, job: JobId, timeout: Duration) -> Vec<JobEvent> {
    use lathe_proto::EventKind::{Completed, Failed, Rejected};
    wait_events(res, job, timeout, "last", |e| {
        matches!(e.kind, Completed | Failed | Rejected)
    })
    .await
}

/// The first event of a kind, waiting for it.
pub async fn wait_event(
    res: &Resources,
    job: JobId,
    kind: lathe_proto::EventKind,
    timeout: Duration,
) -> JobEvent {
    let events = wait_events(res, job, timeout, &format!("{kind:?}"), |e| e.kind == kind).await;
    events
        .into_iter()
        .find(|e| e.kind == kind)
        .expect("wait_events returned once it was there")
}

/// Every stored event of a job once one of them is `wanted` (called `what` in the panic
/// when none is within `timeout`).
async fn wait_events(
    res: &Resources,
    job: JobId,
    timeout: Duration,
    what: &str,
    wanted: impl Fn(&JobEvent) -> bool,
) -> Vec<JobEvent> {
    let deadline = Instant::now() + timeout;
    loop {
        let events = events_of(res, job).await;
        if events.iter().any(&wanted) {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "job {job}: no {what} event within {timeout:?}: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The payloads an ordered consumer had pending when it was created (what is stored now, not
/// what keeps arriving).
async fn read_pending(c: consumer::Consumer<consumer::pull::OrderedConfig>) -> Vec<bytes::Bytes> {
    let pending = c.cached_info().num_pending as usize;
    let mut msgs = c.messages().await.expect("ordered consumer messages");
    let mut out = Vec::with_capacity(pending);
    while out.len() < pending {
        match tokio::time::timeout(Duration::from_secs(5), msgs.next()).await {
            Ok(Some(Ok(m))) => out.push(m.payload.clone()),
            other => panic!("stored messages did not arrive: {other:?}"),
        }
    }
    out
}

/// Every dead letter stored so far.
/// Every alert about `model` stored in the `LATHE_ALERTS` stream.
pub async fn stored_alerts(res: &Resources, model: &str) -> Vec<lathe_proto::Alert> {
    let stream = res
        .js
        .get_stream(names::ALERTS_STREAM)
        .await
        .expect("alerts stream");
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            filter_subject: format!("lathe.alerts.{model}"),
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    read_pending(c)
        .await
        .iter()
        .map(|p| serde_json::from_slice(p).expect("an alert decodes"))
        .collect()
}

pub async fn dead_letters(res: &Resources) -> Vec<lathe_proto::DeadLetter> {
    let stream = res
        .js
        .get_stream(names::DEAD_STREAM)
        .await
        .expect("dead stream");
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    read_pending(c)
        .await
        .iter()
        .map(|p| codec::from_msgpack(p).expect("dead letter decodes"))
        .collect()
}

/// A small, quick job spec on the built-in digits (for tests that exercise plumbing).
pub fn quick_spec(name: &str, epochs: u32) -> Vec<u8> {
    format!(
        r#"{{"name": "{name}", "dataset": {{"source": "builtin:digits"}}, "model": {{"hidden": [32]}},
            "train": {{"epochs": {epochs}, "patience": null, "seed": 1}}, "pipeline": ["train"]}}"#
    )
    .into_bytes()
}

/// The `proto/` directory.
pub fn proto_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto")
}

/// `lathe --json gc <args>`: the clean-up's report.
pub async fn lathe_gc(
    args: &[&str],
    env: &[(&str, String)],
) -> lathe_runtime::artifacts::GarbageReport {
    let args: Vec<&str> = ["--json", "gc"].iter().chain(args).copied().collect();
    serde_json::from_str(&lathe_cli(&args, env).await).expect("a JSON report")
}

/// The names of the artifacts a clean-up removed, in its order.
pub fn removed_names(report: &lathe_runtime::artifacts::GarbageReport) -> Vec<String> {
    report
        .removed
        .iter()
        .map(|(name, _)| name.clone())
        .collect()
}
