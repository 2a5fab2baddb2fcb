//! The prod overlay's NATS users and permissions (`deploy/k8s/overlays/prod/auth.conf`,
//! taken as shipped) on a real nats-server: clients cannot inject work, read artifacts or
//! change the registry; a stage cannot publish to a predecessor; and the services still
//! process a job with their own users.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use lathe_proto::{JobState, Stage, names};
use lathe_runtime::{NatsSettings, Resources, service};
use lathe_testkit::NatsServer;
use lathe_tests::*;
use tokio_util::sync::CancellationToken;

const USERS: [&str; 9] = [
    "lathe-trainer",
    "lathe-distiller",
    "lathe-pruner",
    "lathe-quantizer",
    "lathe-deployer",
    "lathe-monitor",
    "lathe-provision",
    "lathe-gc",
    "lathe-client",
];

fn password(user: &str) -> String {
    format!("test-password-of-{user}")
}

/// A nats-server with JetStream and the prod users: `auth.conf` copied unchanged, its
/// `$PW_*` passwords given to the server process as the prod pods get them.
struct ProdNats {
    server: NatsServer,
    _dir: tempfile::TempDir,
}

fn prod_nats() -> ProdNats {
    let dir = tempfile::tempdir().unwrap();
    let auth = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/overlays/prod/auth.conf"),
    )
    .unwrap();
    lathe_testkit::write_file(dir.path(), "auth.conf", &auth);
    let conf = lathe_testkit::write_file(dir.path(), "nats.conf", "include auth.conf\n");
    let env = USERS
        .iter()
        .map(|u| {
            let var = format!("PW_{}", u.to_uppercase().replace('-', "_"));
            assert!(auth.contains(&format!("${var}")), "auth.conf uses {var}");
            (var, password(u))
        })
        .collect();
    let server = NatsServer::start_with_env(Vec::new(), Some(conf), env);
    ProdNats { server, _dir: dir }
}

/// A service's settings as the prod overlay gives them: its user and its inbox prefix.
fn as_user(url: &str, user: &str) -> NatsSettings {
    NatsSettings {
        user: Some(user.into()),
        password: Some(password(user)),
        inbox_prefix: (user != "lathe-client").then(|| format!("_INBOX_{user}")),
        ..NatsSettings::with_url(url)
    }
}

/// Connects and provisions as a service user.
async fn provisioned(url: &str, user: &str, intake: bool) -> Resources {
    let mut worker = test_worker(user);
    worker.intake = intake;
    service::start(user, &as_user(url, user), worker)
        .await
        .unwrap_or_else(|e| panic!("{user} provisions with its prod permissions: {e}"))
}

/// A plain client connection that records the server's permission errors.
async fn client(url: &str, user: &str) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = errors.clone();
    let mut opts = async_nats::ConnectOptions::with_user_and_password(user.into(), password(user))
        .event_callback(move |e| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = e {
                    seen.lock().unwrap().push(e.to_string());
                }
            }
        });
    if user != "lathe-client" {
        opts = opts.custom_inbox_prefix(format!("_INBOX_{user}"));
    }
    (opts.connect(url).await.expect("connect"), errors)
}

/// Waits for a permission violation naming `subject`.
async fn violation(errors: &Mutex<Vec<String>>, subject: &str) -> String {
    for _ in 0..100 {
        if let Some(e) = errors
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.to_lowercase().contains("permissions violation") && e.contains(subject))
        {
            return e.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "no permissions violation for {subject}: {:?}",
        errors.lock().unwrap()
    );
}

/// Runs the `lathe` CLI as a prod user (as a person, an application or the provisioning Job
/// would, with NATS_USER/NATS_PASSWORD) and returns its standard output; panics, with its
/// output, if it fails.
async fn lathe_as(url: &str, user: &str, args: &[&str]) -> String {
    lathe_cli(args, &user_env(url, user)).await
}

/// The environment a prod user's process gets: the server, its credentials, its inbox prefix.
fn user_env(url: &str, user: &str) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("NATS_URL", url.to_string()),
        ("NATS_USER", user.to_string()),
        ("NATS_PASSWORD", password(user)),
    ];
    if user != "lathe-client" {
        env.push(("NATS_INBOX_PREFIX", format!("_INBOX_{user}")));
    }
    env
}

async fn work_messages(res: &Resources) -> u64 {
    let mut s = res.js.get_stream(names::WORK_STREAM).await.unwrap();
    s.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_inject_work_read_artifacts_or_change_the_registry() {
    let nats = prod_nats();
    let url = nats.server.url();
    let trainer = provisioned(&url, "lathe-trainer", true).await;
    let stored = trainer
        .artifacts
        .put("secret-job/1-train", b"model weights")
        .await
        .unwrap();

    let (c, errors) = client(&url, "lathe-client").await;
    let mut js = jetstream::new(c.clone());
    js.set_timeout(Duration::from_secs(2));

    // No work injected, on any stage.
    c.publish(names::work_subject(Stage::Deploy), "x".into())
        .await
        .unwrap();
    c.flush().await.unwrap();
    violation(&errors, "lathe.work.deploy").await;
    let sent = js
        .publish(names::work_subject(Stage::Train), "x".into())
        .await;
    assert!(
        sent.unwrap().await.is_err(),
        "a client's task was acknowledged"
    );
    assert_eq!(
        work_messages(&trainer).await,
        0,
        "a client's task reached LATHE_WORK"
    );

    // No artifact read: neither the bucket, nor its chunks, nor a consumer on its stream.
    assert!(js.get_object_store(names::ARTIFACTS_BUCKET).await.is_err());
    let mut sub = c.subscribe("$O.lathe-artifacts.>").await.unwrap();
    violation(&errors, "$O.lathe-artifacts.>").await;
    let artifacts = js
        .get_stream_no_info(format!("OBJ_{}", names::ARTIFACTS_BUCKET))
        .await
        .unwrap();
    let read = artifacts
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: c.new_inbox(),
            ..Default::default()
        })
        .await;
    assert!(
        read.is_err(),
        "a client created a consumer on the artifacts"
    );
    assert!(
        artifacts.direct_get(1).await.is_err() && artifacts.get_raw_message(1).await.is_err(),
        "a client read the artifact stream's messages"
    );
    let nothing = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(&mut sub),
    );
    assert!(nothing.await.is_err(), "a client received artifact data");
    // Not even by listening to a service's replies while it reads one.
    let mut replies = c.subscribe("_INBOX_lathe-trainer.>").await.unwrap();
    violation(&errors, "_INBOX_lathe-trainer.>").await;
    assert_eq!(
        trainer.artifacts.get(&stored).await.unwrap(),
        b"model weights"
    );
    let overheard = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(&mut replies),
    );
    assert!(
        overheard.await.is_err(),
        "a client overheard the trainer's replies"
    );

    // No registry change: neither through the KV API nor by publishing to its subjects.
    assert!(js.get_key_value(names::MODELS_BUCKET).await.is_err());
    c.publish("$KV.lathe-models.digits", "{}".into())
        .await
        .unwrap();
    c.flush().await.unwrap();
    violation(&errors, "$KV.lathe-models.digits").await;
    let mut registry = trainer
        .js
        .get_stream(format!("KV_{}", names::MODELS_BUCKET))
        .await
        .unwrap();
    assert_eq!(
        registry.info().await.unwrap().state.messages,
        0,
        "the registry changed"
    );
    assert!(
        js.delete_stream(format!("KV_{}", names::MODELS_BUCKET))
            .await
            .is_err()
    );

    // What a client may do: submit, and read job records.
    let ack = js
        .publish(names::SUBMIT_SUBJECT, "{}".into())
        .await
        .expect("submit allowed")
        .await
        .expect("stored in LATHE_SUBMIT");
    assert_eq!(ack.stream, names::SUBMIT_STREAM);
    assert!(js.get_key_value(names::JOBS_BUCKET).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_cannot_publish_to_a_predecessor() {
    let nats = prod_nats();
    let url = nats.server.url();
    let admin = provisioned(&url, "lathe-quantizer", false).await;
    let (c, errors) = client(&url, "lathe-quantizer").await;
    for before in [Stage::Train, Stage::Distill, Stage::Prune, Stage::Quantize] {
        let subject = names::work_subject(before);
        c.publish(subject.clone(), "x".into()).await.unwrap();
        c.flush().await.unwrap();
        violation(&errors, &subject).await;
    }
    assert_eq!(work_messages(&admin).await, 0);
    // Its successors it may feed.
    let js = jetstream::new(c.clone());
    js.publish(names::work_subject(Stage::Deploy), "x".into())
        .await
        .unwrap()
        .await
        .expect("the quantizer hands on to deploy");
    assert_eq!(work_messages(&admin).await, 1);
    // And the pruner may not take the quantizer's tasks.
    let (p, perrors) = client(&url, "lathe-pruner").await;
    let next = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        names::WORK_STREAM,
        names::stage_consumer(Stage::Quantize)
    );
    p.publish(next.clone(), "1".into()).await.unwrap();
    p.flush().await.unwrap();
    violation(&perrors, &next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_process_a_job_with_their_own_prod_users() {
    let nats = prod_nats();
    let url = nats.server.url();
    // The provisioning Job's command and user bring up every resource on the empty server.
    lathe_as(&url, "lathe-provision", &["provision"]).await;
    let mut stages = Vec::new();
    for (user, intake) in [("lathe-trainer", true), ("lathe-quantizer", false)] {
        let res = provisioned(&url, user, intake).await;
        let stop = CancellationToken::new();
        let s = stop.clone();
        let handle = tokio::spawn(async move {
            let served = if user == "lathe-trainer" {
                service::serve(res, "lathe-trainer", lathe_trainer::Trainer, s).await
            } else {
                service::serve(res, "lathe-quantizer", lathe_quantizer::Quantizer, s).await
            };
            served.expect("the stage serves");
        });
        stages.push(InProcess { stop, handle });
    }
    // The deployer and the monitor with theirs: registry, serving, telemetry, smoke test.
    let res = provisioned(&url, "lathe-deployer", false).await;
    let stop = CancellationToken::new();
    let s = stop.clone();
    let readiness = lathe_runtime::health::Readiness::default();
    readiness.provisioned(res.client.clone());
    let handle = tokio::spawn(async move {
        lathe_deployer::run(res, serve_settings("d1"), None, readiness, s)
            .await
            .expect("the deployer serves");
    });
    stages.push(InProcess { stop, handle });
    let res = provisioned(&url, "lathe-monitor", false).await;
    let stop = CancellationToken::new();
    let s = stop.clone();
    let handle = tokio::spawn(async move {
        let settings = lathe_monitor::MonitorSettings {
            tick: Duration::from_millis(200),
            ..Default::default()
        };
        lathe_monitor::run(res, settings, s)
            .await
            .expect("the monitor runs");
    });
    stages.push(InProcess { stop, handle });

    // A person submits and follows the job with the CLI and the client user, whose
    // permissions do not cover provisioning.
    let dir = tempfile::tempdir().unwrap();
    let spec = lathe_testkit::write_file(
        dir.path(),
        "prod-users.json",
        r#"{"name": "prod-users", "dataset": {"source": "builtin:digits"},
        "model": {"hidden": [32]}, "train": {"epochs": 10, "seed": 1},
        "pipeline": ["train", "quantize", "deploy", "monitor"], "quantize": {"bits": 8},
        "deploy": {"model": "prod"}, "monitor": {"smoke_rows": 5, "window_secs": 5}}"#,
    );
    let spec = spec.to_str().unwrap();
    let out = lathe_as(&url, "lathe-client", &["--json", "submit", spec, "--watch"]).await;
    let submitted: serde_json::Value =
        serde_json::from_str(out.lines().next().expect("a first line")).unwrap();
    let job = submitted["job_id"].as_str().expect("job_id").to_string();
    let last: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("events")).unwrap();
    assert_eq!(
        last["kind"], "completed",
        "the watch ends with the job:\n{out}"
    );
    let status = lathe_as(&url, "lathe-client", &["--json", "status", &job]).await;
    let record: lathe_proto::JobRecord = serde_json::from_str(&status).unwrap();
    assert_eq!(record.job_id.to_string(), job);
    assert_eq!(record.state, JobState::Completed, "{:?}", record.error);
    assert_eq!(record.steps.len(), 4);
    assert_eq!(record.steps[1].stage, Stage::Quantize);
    assert!(record.steps[1].metrics["test_accuracy"] > 0.8);
    assert_eq!(record.steps[3].metrics["smoke_agreement"], 1.0);
    let jobs = lathe_as(&url, "lathe-client", &["jobs"]).await;
    assert!(jobs.contains(&job), "{jobs}");

    // Then the client asks the model with the CLI, and reads its health once the monitor wrote it.
    let row: Vec<String> = lathe_model::data::builtin("digits")
        .unwrap()
        .1
        .row(0)
        .iter()
        .map(f32::to_string)
        .collect();
    let reply = lathe_as(
        &url,
        "lathe-client",
        &["--json", "infer", "prod", &row.join(",")],
    )
    .await;
    let reply: lathe_proto::InferReply = serde_json::from_str(&reply).unwrap();
    assert_eq!((reply.version, reply.predictions.len()), (1, 1));
    let (c, errors) = client(&url, "lathe-client").await;
    let js = jetstream::new(c.clone());
    let health = js.get_key_value(names::HEALTH_BUCKET).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health.get("prod").await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no health written for `prod`"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A spec intake rejects, published by the client: its record is one gc removes.
    let rejected = lathe_proto::JobId::new();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::JOB_ID_HEADER, rejected.to_string().as_str());
    js.publish_with_headers(names::SUBMIT_SUBJECT, headers, "{}".into())
        .await
        .unwrap()
        .await
        .expect("stored in LATHE_SUBMIT");
    let jobs_kv = js.get_key_value(names::JOBS_BUCKET).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while jobs_kv.get(rejected.to_string()).await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no record for the rejected spec"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The nightly clean-up with its own user: the trained model's artifact goes (the job
    // ended, no version points to it), the registered quantized one stays, and so does its
    // job's record; the rejected job's record goes.
    let gc_env = user_env(&url, "lathe-gc");
    let report = lathe_gc(&["--older-than-days", "0"], &gc_env).await;
    assert_eq!(
        report.removed_jobs,
        vec![rejected.to_string()],
        "{report:?}"
    );
    assert_eq!(report.kept_jobs_in_registry, 1, "{report:?}");
    assert!(jobs_kv.get(rejected.to_string()).await.unwrap().is_none());
    assert!(jobs_kv.get(&job).await.unwrap().is_some());
    let trained = record.steps[0]
        .artifact
        .clone()
        .expect("the trained artifact");
    assert_eq!(
        removed_names(&report),
        vec![trained.name.clone()],
        "{report:?}"
    );
    assert_eq!(report.kept_in_registry, 1, "{report:?}");
    let again = lathe_gc(&["--older-than-days", "0"], &gc_env).await;
    assert!(again.removed.is_empty(), "{again:?}");
    assert!(again.removed_jobs.is_empty(), "{again:?}");
    assert_eq!(again.kept_in_registry, 1, "{again:?}");

    // Two more versions of `prod` (train → deploy). gc with --keep-versions, as the CronJob
    // runs it, rewrites the registry entry as the gc user: version 1 is forgotten, and its
    // quantized artifact and its job's record go; 2 (a rollback's target) and 3 (active) stay.
    for i in 2..=3 {
        let spec = lathe_testkit::write_file(
            dir.path(),
            &format!("prod-v{i}.json"),
            &format!(
                r#"{{"name": "prod-v{i}", "dataset": {{"source": "builtin:digits"}},
                "model": {{"hidden": [32]}}, "train": {{"epochs": 10, "seed": {i}}},
                "pipeline": ["train", "deploy"], "deploy": {{"model": "prod"}}}}"#
            ),
        );
        let out = lathe_as(
            &url,
            "lathe-client",
            &["--json", "submit", spec.to_str().unwrap(), "--watch"],
        )
        .await;
        let last: serde_json::Value =
            serde_json::from_str(out.lines().last().expect("events")).unwrap();
        assert_eq!(last["kind"], "completed", "{out}");
    }
    let report = lathe_gc(&["--older-than-days", "0", "--keep-versions", "0"], &gc_env).await;
    assert_eq!(
        report.forgotten_versions,
        vec![("prod".to_string(), 1)],
        "{report:?}"
    );
    let quantized = record.steps[1]
        .artifact
        .clone()
        .expect("the quantized artifact");
    assert_eq!(removed_names(&report), vec![quantized.name], "{report:?}");
    assert_eq!(report.removed_jobs, vec![job.clone()], "{report:?}");
    assert_eq!(report.kept_in_registry, 2, "{report:?}");
    assert!(jobs_kv.get(&job).await.unwrap().is_none());
    let health = lathe_as(
        &url,
        "lathe-client",
        &["--json", "monitor", "prod", "--once"],
    )
    .await;
    let health: lathe_proto::health::ModelHealth =
        serde_json::from_str(health.trim()).expect("the monitor's figures as JSON");
    assert_eq!(health.model.as_str(), "prod");
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );
    for s in stages {
        s.stop().await;
    }
}
