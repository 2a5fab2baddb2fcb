//! `lathe-serve-bench`: inference over NATS against the transport's own floor. Starts a
//! nats-server, trains the digits MLP (64-256-128-10), registers it, starts deployer replicas
//! in this process, and measures in the same run:
//! - a bare NATS request–reply echo (a subscriber answering with the request's bytes);
//! - `lathe.infer.digits`: one row (JSON and MessagePack) and a batch of 64, one request at
//!   a time (p50/p99 round trip; the single JSON row in blocks alternating with the echo's), and
//!   throughput with 64 requests in flight, with 1 and 2 replicas (the echo with 1 and 2
//!   responders beside them).
//!
//! Prints a table and writes JSON (`--out`). Needs `nats-server` on the PATH (`./run` puts
//! one in `.tools/venv/bin`).

use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use lathe_deployer::{ServeSettings, Serving};
use lathe_model::data::{builtin, split};
use lathe_model::mlp::MlpConfig;
use lathe_model::train::{TrainConfig, train_mlp};
use lathe_proto::registry::NewVersion;
use lathe_proto::spec::DeployStrategy;
use lathe_proto::{JobId, ModelName};
use lathe_runtime::{NatsSettings, Resources, WorkerSettings, service};
use tokio_util::sync::CancellationToken;

struct Args {
    out: PathBuf,
    requests: usize,
    in_flight: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        out: PathBuf::from("bench/results/serve.json"),
        requests: 5_000,
        in_flight: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let count = |flag: &str, v: String| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("{flag} must be a positive integer, got {v:?}"))
        };
        match flag.as_str() {
            "--out" => a.out = PathBuf::from(value()?),
            "--requests" => a.requests = count("--requests", value()?)?,
            "--in-flight" => a.in_flight = count("--in-flight", value()?)?,
            "-h" | "--help" => {
                return Err(
                    "usage: lathe-serve-bench [--out PATH] [--requests N] [--in-flight N]".into(),
                );
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(a)
}

#[derive(Debug, Clone, serde::Serialize)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
}

fn latency(mut us: Vec<f64>) -> Latency {
    us.sort_by(f64::total_cmp);
    let q = |p: f64| us[((us.len() - 1) as f64 * p).round() as usize];
    Latency {
        p50_us: q(0.5),
        p99_us: q(0.99),
        mean_us: us.iter().sum::<f64>() / us.len() as f64,
    }
}

/// `warm` untimed requests, then `n` timed ones, one at a time; each round trip in µs
/// goes to `us`.
async fn timed(
    client: &async_nats::Client,
    subject: &str,
    body: &Bytes,
    warm: usize,
    n: usize,
    us: &mut Vec<f64>,
) -> Result<(), Box<dyn Error>> {
    for _ in 0..warm {
        check(client.request(subject.to_string(), body.clone()).await?)?;
    }
    for _ in 0..n {
        let t = Instant::now();
        let reply = client.request(subject.to_string(), body.clone()).await?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        check(reply)?;
    }
    Ok(())
}

/// One request at a time; every round trip timed, after a warm-up.
async fn sequential(
    client: &async_nats::Client,
    subject: &str,
    body: &Bytes,
    n: usize,
) -> Result<Latency, Box<dyn Error>> {
    let mut us = Vec::with_capacity(n);
    timed(client, subject, body, n.min(500), n, &mut us).await?;
    Ok(latency(us))
}

fn check(reply: async_nats::Message) -> Result<(), Box<dyn Error>> {
    if let Some(h) = &reply.headers
        && let Some(e) = h.get("Nats-Service-Error")
    {
        return Err(format!("service error: {e}").into());
    }
    Ok(())
}

/// Two subjects measured in alternating blocks of [`BLOCK`] requests, one request at a
/// time: each block runs warm (as a steady stream of requests does), and both subjects
/// see the same machine over the run. Request by request alternation would instead
/// measure each responder waking from idle, which on a VM costs more than the round trip.
async fn paired(
    client: &async_nats::Client,
    a: &str,
    b: &str,
    body: &Bytes,
    n: usize,
) -> Result<(Latency, Latency), Box<dyn Error>> {
    const BLOCK: usize = 100;
    let (mut ua, mut ub) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for block in 0..n.div_ceil(BLOCK) {
        let order = if block % 2 == 0 { [a, b] } else { [b, a] };
        for subject in order {
            // The first requests of a block wake the responder; they are not counted.
            let us = if subject == a { &mut ua } else { &mut ub };
            timed(client, subject, body, 10, BLOCK.min(n - block * BLOCK), us).await?;
        }
    }
    Ok((latency(ua), latency(ub)))
}

/// Requests per second with `in_flight` outstanding.
async fn throughput(
    client: &async_nats::Client,
    subject: &str,
    body: &Bytes,
    n: usize,
    in_flight: usize,
) -> Result<f64, Box<dyn Error>> {
    let t = Instant::now();
    let results: Vec<Result<(), String>> = futures::stream::iter(0..n)
        .map(|_| {
            let c = client.clone();
            let s = subject.to_string();
            let b = body.clone();
            async move {
                let r = c.request(s, b).await.map_err(|e| e.to_string())?;
                check(r).map_err(|e| e.to_string())
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    let secs = t.elapsed().as_secs_f64();
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        return Err(e.into());
    }
    Ok(n as f64 / secs)
}

/// A bare echo responder in a queue group, on its own connection.
async fn echo(url: &str, stop: CancellationToken) -> Result<(), Box<dyn Error>> {
    let c = async_nats::connect(url).await?;
    let mut sub = c.queue_subscribe("bench.echo", "echo".into()).await?;
    tokio::spawn(async move {
        loop {
            let m = tokio::select! {
                m = sub.next() => m,
                _ = stop.cancelled() => None,
            };
            let Some(m) = m else { break };
            if let Some(reply) = m.reply {
                let _ = c.publish(reply, m.payload).await;
            }
        }
    });
    Ok(())
}

/// The same echo as a NATS service endpoint (the async-nats `service` API the deployer
/// uses, queue group and request statistics included), on its own connection: how much of
/// lathe's overhead is the service API's own.
async fn service_echo(url: &str, stop: CancellationToken) -> Result<(), Box<dyn Error>> {
    use async_nats::service::ServiceExt;
    let c = async_nats::connect(url).await?;
    let service = c
        .service_builder()
        .queue_group("echo")
        .start("bench-echo", "0.1.0")
        .await
        .map_err(|e| e.to_string())?;
    let mut endpoint = service
        .endpoint("bench.service-echo")
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        loop {
            let r = tokio::select! {
                r = endpoint.next() => r,
                _ = stop.cancelled() => None,
            };
            let Some(r) = r else { break };
            let payload = r.message.payload.clone();
            let _ = r.respond(Ok(payload)).await;
        }
        let _ = service.stop().await;
    });
    Ok(())
}

async fn replica(url: &str, id: &str, stop: CancellationToken) -> Result<Serving, Box<dyn Error>> {
    let res = provisioned(url, id).await?;
    let serving = Serving::new(
        res,
        ServeSettings {
            replica: id.into(),
            ..Default::default()
        },
    );
    tokio::spawn(serving.clone().run(stop));
    let deadline = Instant::now() + Duration::from_secs(30);
    while serving.ready().is_err() || serving.served_models().is_empty() {
        if Instant::now() > deadline {
            return Err(
                format!("replica {id} never loaded the model: {:?}", serving.ready()).into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(serving)
}

async fn provisioned(url: &str, id: &str) -> Result<Resources, Box<dyn Error>> {
    let w = WorkerSettings {
        id: id.into(),
        ..WorkerSettings::from_env()?
    };
    Ok(service::start("lathe-serve-bench", &NatsSettings::with_url(url), w).await?)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let server = lathe_testkit::NatsServer::start();
    let url = server.url();

    eprintln!("training the digits MLP 64-256-128-10 …");
    let (train_file, test_file) = builtin("digits")?;
    let splits = split(train_file, Some(test_file), 0.1, 0.0, 0)?;
    let outcome = tokio::task::spawn_blocking(move || {
        train_mlp(
            &splits,
            &MlpConfig::new(64, vec![256, 128], 10),
            &TrainConfig::default(),
            &mut |_| {},
        )
        .map(|o| (o, splits))
    })
    .await??;
    let (outcome, splits) = outcome;
    let res = provisioned(&url, "bench-client").await?;
    let artifact = res
        .artifacts
        .put("bench/0-train", &outcome.artifact.to_bytes())
        .await?;
    let model: ModelName = "digits".parse()?;
    let new = NewVersion {
        job_id: JobId::new(),
        step: 0,
        artifact,
        metrics: Default::default(),
        lineage: vec![],
        strategy: DeployStrategy::Replace,
        canary_percent: 10.0,
    };
    res.registry
        .update(&model, true, |e| Ok(e.register(new.clone(), "bench")))
        .await?;

    let client = res.client.clone();
    let stop = CancellationToken::new();
    let row: Vec<f32> = splits.test.row(0).to_vec();
    let rows64: Vec<Vec<f32>> = (0..64).map(|i| splits.test.row(i).to_vec()).collect();
    let json_row = Bytes::from(serde_json::json!({ "inputs": row }).to_string());
    let msgpack_row = Bytes::from(rmp_serde::to_vec_named(
        &serde_json::json!({ "inputs": row }),
    )?);
    let json_batch = Bytes::from(serde_json::json!({ "inputs": rows64 }).to_string());
    let subject = "lathe.infer.digits";
    let n = args.requests;
    let k = args.in_flight;

    echo(&url, stop.clone()).await?;
    let r1 = replica(&url, "r1", stop.clone()).await?;
    // The replica's own work per request (decode, predict, encode, telemetry), no NATS.
    let in_process = {
        let mut us = Vec::with_capacity(n);
        for i in 0..n + 500 {
            let t = Instant::now();
            let served = r1.infer("digits", &json_row, Some("application/json"), t, None);
            let dt = t.elapsed().as_secs_f64() * 1e6;
            served.map_err(|e| e.to_string())?;
            if i >= 500 {
                us.push(dt);
            }
        }
        latency(us)
    };
    // The echo carries the same bytes as the single-row request, and the two are measured
    // in alternating blocks so that both see the same machine (a loaded 2-core box drifts).
    let (echo_row, infer_row) = paired(&client, "bench.echo", subject, &json_row, n).await?;
    service_echo(&url, stop.clone()).await?;
    let (echo_row2, service_echo_row) =
        paired(&client, "bench.echo", "bench.service-echo", &json_row, n).await?;
    let infer_row_mp = sequential(&client, subject, &msgpack_row, n).await?;
    let echo_batch = sequential(&client, "bench.echo", &json_batch, n / 5).await?;
    let infer_batch = sequential(&client, subject, &json_batch, n / 5).await?;
    let echo_tp1 = throughput(&client, "bench.echo", &json_row, n * 4, k).await?;
    let infer_tp1 = throughput(&client, subject, &json_row, n * 4, k).await?;
    echo(&url, stop.clone()).await?;
    let _r2 = replica(&url, "r2", stop.clone()).await?;
    let echo_tp2 = throughput(&client, "bench.echo", &json_row, n * 4, k).await?;
    let infer_tp2 = throughput(&client, subject, &json_row, n * 4, k).await?;
    stop.cancel();

    let ratio = infer_row.p50_us / echo_row.p50_us;
    println!(
        "Inference over NATS (digits 64-256-128-10, nats-server on loopback, client and replicas in one process)"
    );
    println!("{:<44} {:>10} {:>10}", "", "p50 µs", "p99 µs");
    let line =
        |name: &str, l: &Latency| println!("{name:<44} {:>10.1} {:>10.1}", l.p50_us, l.p99_us);
    line(
        &format!("echo, {} B (transport floor)", json_row.len()),
        &echo_row,
    );
    line(
        "replica work for one row, in process (no NATS)",
        &in_process,
    );
    line("lathe.infer, one row (JSON)", &infer_row);
    line(
        "echo as a NATS service endpoint (service API)",
        &service_echo_row,
    );
    line("echo, beside the service echo", &echo_row2);
    line("lathe.infer, one row (MessagePack)", &infer_row_mp);
    line(&format!("echo, {} B", json_batch.len()), &echo_batch);
    line("lathe.infer, batch of 64 (JSON)", &infer_batch);
    println!("single-row p50 / echo p50: {ratio:.2}× (goal ≤ 1.3×)");
    println!(
        "service-API echo p50 / echo p50: {:.2}× (the part of the ratio the service API itself adds)",
        service_echo_row.p50_us / echo_row2.p50_us
    );
    println!(
        "{:<44} {:>10} {:>10}",
        format!("throughput, {k} in flight (req/s)"),
        "1 replica",
        "2 replicas"
    );
    println!("{:<44} {:>10.0} {:>10.0}", "echo", echo_tp1, echo_tp2);
    println!(
        "{:<44} {:>10.0} {:>10.0}",
        "lathe.infer, one row", infer_tp1, infer_tp2
    );
    let report = serde_json::json!({
        "model": "digits 64-256-128-10",
        "setup": "nats-server on loopback; client, echo responders and deployer replicas in one process",
        "requests": n,
        "in_flight": k,
        "single_row_json_bytes": json_row.len(),
        "batch64_json_bytes": json_batch.len(),
        "echo_single": echo_row,
        "in_process_single_json": in_process,
        "infer_single_json": infer_row,
        "service_echo_single": service_echo_row,
        "echo_single_beside_service_echo": echo_row2,
        "infer_single_msgpack": infer_row_mp,
        "echo_batch64_bytes": echo_batch,
        "infer_batch64_json": infer_batch,
        "single_p50_over_echo": ratio,
        "throughput_rps": {
            "echo_1": echo_tp1, "echo_2": echo_tp2,
            "infer_1_replica": infer_tp1, "infer_2_replicas": infer_tp2,
        },
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
