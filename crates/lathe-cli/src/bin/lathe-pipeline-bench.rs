//! `lathe-pipeline-bench`: the whole chain (train → distill → prune → quantize → deploy →
//! monitor) on the built-in digits data, with every stage service as its own process against
//! a fresh nats-server, as in production. Measures in one run:
//! - each stage's compute time (its step's start to finish, artifact store included, as the
//!   job record holds them);
//! - the orchestration overhead of each hop: from one step's finish (record written, next
//!   task published) to the next step's start (task delivered, job record read, step marked
//!   running) — what lathe adds between two stages;
//! - the artifact object store's own put and get for each of the job's artifacts;
//! - whole-job wall time (spec accepted → job completed);
//! - jobs per minute with 1 and with 2 replicas of every stage (a batch of jobs submitted at
//!   once);
//! - listing every job record with 5 000 in the bucket (`lathe jobs`, `lathe gc`): one pass
//!   against reading each record with its own request.
//!
//! The stage binaries are taken from the directory of this executable (`cargo build
//! --release --workspace --bins`; `just bench` does). Prints a table and writes JSON (`--out`).

use std::collections::BTreeMap;
use std::error::Error;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use lathe_proto::{JobId, JobRecord, JobState, Stage, names};
use lathe_runtime::{NatsSettings, Resources, WorkerSettings, service};

const CHAIN: &str = include_str!("../../../../proto/examples/valid/digits-chain.json");

/// The pipeline benchmark's settings.
#[derive(clap::Parser)]
#[command(
    name = "lathe-pipeline-bench",
    about = "The whole digits chain, one process per stage"
)]
struct Args {
    /// Where the JSON report goes.
    #[arg(long, default_value = "bench/results/pipeline.json")]
    out: PathBuf,
    /// Jobs run one after another for the per-stage and per-hop figures.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    sequential: u64,
    /// Jobs submitted at once for the jobs-per-minute figures.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Job records added to the bucket for the listing figures.
    #[arg(long, default_value_t = 5000)]
    records: u64,
    /// Overrides the demo spec's training epochs.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    train_epochs: Option<u32>,
    /// Overrides the demo spec's distillation epochs.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    distill_epochs: Option<u32>,
}

/// The demo's digits chain with the epochs asked for.
fn base_spec(args: &Args) -> Result<serde_json::Value, Box<dyn Error>> {
    let mut s: serde_json::Value = serde_json::from_str(CHAIN)?;
    if let Some(e) = args.train_epochs {
        s["train"]["epochs"] = e.into();
    }
    if let Some(e) = args.distill_epochs {
        s["distill"]["epochs"] = e.into();
    }
    Ok(s)
}

/// The chain as one job: its own name and model.
fn spec(base: &serde_json::Value, name: &str) -> Vec<u8> {
    let mut s = base.clone();
    s["name"] = name.into();
    s["deploy"]["model"] = name.into();
    s.to_string().into_bytes()
}

/// The stage processes of one replica set, killed when dropped.
struct Replicas(Vec<Child>);

impl Drop for Replicas {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_replicas(url: &str, set: usize) -> Result<Replicas, Box<dyn Error>> {
    let dir = std::env::current_exe()?
        .parent()
        .ok_or("the executable has no directory")?
        .to_path_buf();
    let mut children = Vec::new();
    for stage in Stage::ALL {
        let path = dir.join(stage.service_name());
        if !path.is_file() {
            return Err(format!(
                "{} is missing: build the services first (cargo build --release --workspace --bins)",
                path.display()
            )
            .into());
        }
        children.push(
            Command::new(path)
                .env("NATS_URL", url)
                .env("RUST_LOG", "warn")
                .env("LATHE_WORKER_ID", format!("{stage}-{set}"))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()?,
        );
    }
    Ok(Replicas(children))
}

/// Waits until every stage's consumer has `replicas` pull requests waiting (each idle
/// replica keeps one open).
async fn wait_idle_workers(res: &Resources, replicas: usize) -> Result<(), Box<dyn Error>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for stage in Stage::ALL {
        loop {
            let mut c: async_nats::jetstream::consumer::PullConsumer = res
                .js
                .get_consumer_from_stream(names::stage_consumer(stage), names::WORK_STREAM)
                .await?;
            if c.info().await?.num_waiting >= replicas {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{replicas} {stage} replicas never came up").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

async fn submit(res: &Resources, payload: Vec<u8>) -> Result<JobId, Box<dyn Error>> {
    let job = JobId::new();
    let mut headers = HeaderMap::new();
    headers.insert(names::JOB_ID_HEADER, job.to_string().as_str());
    res.client
        .publish_with_headers(names::SUBMIT_SUBJECT, headers, payload.into())
        .await?;
    res.client.flush().await?;
    Ok(job)
}

async fn wait_done(res: &Resources, job: JobId) -> Result<JobRecord, Box<dyn Error>> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if let Some((r, _)) = res.jobs.get(job).await?
            && r.state.is_terminal()
        {
            if r.state != JobState::Completed {
                return Err(format!(
                    "job {job} ended {:?}: {}",
                    r.state,
                    r.error.clone().unwrap_or_default()
                )
                .into());
            }
            return Ok(r);
        }
        if Instant::now() > deadline {
            return Err(format!("job {job} did not end within 15 minutes").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug, Clone, serde::Serialize)]
struct Summary {
    what: String,
    p50_ms: f64,
    max_ms: f64,
    n: usize,
}

fn summary(what: impl Into<String>, mut ms: Vec<f64>) -> Summary {
    ms.sort_by(f64::total_cmp);
    Summary {
        what: what.into(),
        p50_ms: if ms.is_empty() { 0.0 } else { ms[ms.len() / 2] },
        max_ms: ms.last().copied().unwrap_or(0.0),
        n: ms.len(),
    }
}

/// Per-stage compute and per-hop overhead of completed jobs (from their records, in ms).
/// Steps are keyed by position; a hop is labelled with the stages it joins.
fn timings(records: &[JobRecord]) -> (Vec<Summary>, Vec<Summary>, Vec<f64>, Vec<f64>) {
    let mut compute: BTreeMap<usize, (String, Vec<f64>)> = BTreeMap::new();
    let mut hops: BTreeMap<usize, (String, Vec<f64>)> = BTreeMap::new();
    let mut walls = Vec::new();
    let mut overheads = Vec::new();
    for r in records {
        let mut previous = ("submit".to_string(), r.submitted_at_ms);
        let mut overhead = 0.0;
        for (i, s) in r.steps.iter().enumerate() {
            let (Some(a), Some(b)) = (s.started_at_ms, s.finished_at_ms) else {
                continue;
            };
            let hop = a.saturating_sub(previous.1) as f64;
            hops.entry(i)
                .or_insert_with(|| (format!("{} → {}", previous.0, s.stage), Vec::new()))
                .1
                .push(hop);
            compute
                .entry(i)
                .or_insert_with(|| (s.stage.to_string(), Vec::new()))
                .1
                .push(b.saturating_sub(a) as f64);
            overhead += hop;
            previous = (s.stage.to_string(), b);
        }
        if let Some(end) = r.finished_at_ms {
            walls.push(end.saturating_sub(r.submitted_at_ms) as f64);
            overheads.push(overhead);
        }
    }
    let summaries = |m: BTreeMap<usize, (String, Vec<f64>)>| {
        m.into_values().map(|(what, v)| summary(what, v)).collect()
    };
    (summaries(compute), summaries(hops), walls, overheads)
}

/// One artifact's object-store round trips.
#[derive(serde::Serialize)]
struct ArtifactIo {
    artifact: String,
    bytes: usize,
    get_p50_ms: f64,
    put_p50_ms: f64,
}

/// Listing every job record (what `lathe jobs` and `lathe gc` do) with `n` more records in
/// the bucket: lathe's one pass over the bucket's stream, against the KV API's obvious way
/// (list the keys, then read each record with its own request), which lathe used before.
/// Median of 3 each, in ms, and how many records each found.
async fn listing(res: &Resources, n: u64) -> Result<serde_json::Value, Box<dyn Error>> {
    use futures::StreamExt;
    let now = lathe_proto::now_ms();
    let mut writes = futures::stream::iter(0..n)
        .map(|i| {
            let record = JobRecord::rejected(JobId::new(), format!("listed-{i}"), vec![], now);
            async move { res.jobs.create(&record).await }
        })
        .buffer_unordered(64);
    while let Some(created) = writes.next().await {
        created?;
    }
    let kv = res.js.get_key_value(names::JOBS_BUCKET).await?;
    let (mut one_pass, mut per_key) = (Vec::new(), Vec::new());
    let (mut found_one, mut found_per_key) = (0, 0);
    for _ in 0..3 {
        let t = Instant::now();
        found_one = res.jobs.list_with_revisions().await?.len();
        one_pass.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let mut keys = kv.keys().await?;
        let mut found = 0;
        while let Some(key) = keys.next().await {
            if let Some(value) = kv.get(key?).await? {
                lathe_proto::codec::from_msgpack::<JobRecord>(&value)?;
                found += 1;
            }
        }
        found_per_key = found;
        per_key.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(serde_json::json!({
        "records": found_one,
        "one_pass_ms": median(one_pass),
        "keys_then_one_read_each_ms": median(per_key),
        "records_found_per_key": found_per_key,
    }))
}

/// Put and get of each of a job's artifacts through the object store, `k` times each.
async fn artifact_io(
    res: &Resources,
    record: &JobRecord,
    k: usize,
) -> Result<Vec<ArtifactIo>, Box<dyn Error>> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for s in &record.steps {
        let Some(r) = &s.artifact else { continue };
        if !seen.insert(r.name.clone()) {
            continue;
        }
        let bytes = res.artifacts.get(r).await?;
        let (mut get, mut put) = (Vec::new(), Vec::new());
        for i in 0..k {
            let t = Instant::now();
            res.artifacts.get(r).await?;
            get.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            res.artifacts
                .put(&format!("bench-io/{}-{i}", s.stage), &bytes)
                .await?;
            put.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out.push(ArtifactIo {
            artifact: s.stage.to_string(),
            bytes: bytes.len(),
            get_p50_ms: summary("get", get).p50_ms,
            put_p50_ms: summary("put", put).p50_ms,
        });
    }
    Ok(out)
}

/// Submits `n` jobs at once and waits for all: jobs per minute.
async fn batch(
    res: &Resources,
    base: &serde_json::Value,
    n: u64,
    tag: &str,
) -> Result<(f64, Vec<JobRecord>), Box<dyn Error>> {
    let t = Instant::now();
    let mut jobs = Vec::new();
    for i in 0..n {
        jobs.push(submit(res, spec(base, &format!("bench-{tag}-{i}"))).await?);
    }
    let mut records = Vec::new();
    for j in jobs {
        records.push(wait_done(res, j).await?);
    }
    let minutes = t.elapsed().as_secs_f64() / 60.0;
    Ok((n as f64 / minutes, records))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = <Args as clap::Parser>::parse();
    let base = base_spec(&args)?;
    let server = lathe_testkit::NatsServer::start();
    let url = server.url();
    let res = service::start(
        "lathe-pipeline-bench",
        &NatsSettings::with_url(&url),
        WorkerSettings {
            id: "pipeline-bench".into(),
            ..WorkerSettings::from_env()?
        },
    )
    .await?;

    eprintln!("pipeline: one replica of each stage; a warm-up job …");
    let first = spawn_replicas(&url, 1)?;
    wait_idle_workers(&res, 1).await?;
    let warm = submit(&res, spec(&base, "bench-warmup")).await?;
    let warm = wait_done(&res, warm).await?;

    eprintln!("pipeline: {} jobs one after another …", args.sequential);
    let mut records = Vec::new();
    for i in 0..args.sequential {
        let job = submit(&res, spec(&base, &format!("bench-seq-{i}"))).await?;
        records.push(wait_done(&res, job).await?);
    }
    let (compute, hops, walls, overheads) = timings(&records);
    let io = artifact_io(&res, &warm, 20).await?;

    eprintln!(
        "pipeline: {} jobs at once, 1 replica per stage …",
        args.batch
    );
    wait_idle_workers(&res, 1).await?;
    let (jpm1, _) = batch(&res, &base, args.batch, "r1").await?;
    eprintln!(
        "pipeline: {} jobs at once, 2 replicas per stage …",
        args.batch
    );
    let second = spawn_replicas(&url, 2)?;
    wait_idle_workers(&res, 2).await?;
    let (jpm2, records2) = batch(&res, &base, args.batch, "r2").await?;
    let workers: std::collections::BTreeSet<String> = records2
        .iter()
        .flat_map(|r| r.steps.iter().filter_map(|s| s.worker.clone()))
        .collect();
    drop(second);
    drop(first);
    eprintln!("pipeline: listing job records …");
    let listed = listing(&res, args.records).await?;

    let epochs = |stage: &str| base[stage]["epochs"].as_u64().unwrap_or(0);
    let (train_epochs, distill_epochs) = (epochs("train"), epochs("distill"));
    let wall = summary("whole job (accepted → completed)", walls.clone());
    let overhead = summary("orchestration, all hops", overheads.clone());
    println!();
    println!(
        "pipeline: digits chain (train {train_epochs} ep, distill {distill_epochs} ep), one process per stage, {} jobs",
        args.sequential
    );
    println!("{:<36} {:>10} {:>10}", "stage compute", "p50 ms", "max ms");
    for c in &compute {
        println!("{:<36} {:>10.0} {:>10.0}", c.what, c.p50_ms, c.max_ms);
    }
    println!(
        "{:<36} {:>10} {:>10}",
        "hop (task handed on → picked up)", "p50 ms", "max ms"
    );
    for h in &hops {
        println!("{:<36} {:>10.0} {:>10.0}", h.what, h.p50_ms, h.max_ms);
    }
    println!(
        "{:<36} {:>10.0} {:>10.0}",
        overhead.what, overhead.p50_ms, overhead.max_ms
    );
    println!(
        "{:<36} {:>10.0} {:>10.0}",
        wall.what, wall.p50_ms, wall.max_ms
    );
    let share = overheads.iter().sum::<f64>() / walls.iter().sum::<f64>().max(1.0);
    println!("orchestration share of wall time: {:.2} %", 100.0 * share);
    println!(
        "{:<12} {:>10} {:>12} {:>12}",
        "artifact", "bytes", "get p50 ms", "put p50 ms"
    );
    for a in &io {
        println!(
            "{:<12} {:>10} {:>12.2} {:>12.2}",
            a.artifact, a.bytes, a.get_p50_ms, a.put_p50_ms
        );
    }
    println!(
        "jobs per minute ({} at once): 1 replica per stage {jpm1:.2}, 2 replicas {jpm2:.2} ({:.2}×; {} workers took part)",
        args.batch,
        jpm2 / jpm1,
        workers.len()
    );
    println!(
        "listing {} job records: one pass {:.0} ms, keys then one read each {:.0} ms",
        listed["records"],
        listed["one_pass_ms"].as_f64().unwrap_or(0.0),
        listed["keys_then_one_read_each_ms"].as_f64().unwrap_or(0.0)
    );

    let mut all = compute
        .iter()
        .map(|c| Summary {
            what: format!("{} compute", c.what),
            ..c.clone()
        })
        .collect::<Vec<_>>();
    all.extend(hops.iter().map(|h| Summary {
        what: format!("hop {}", h.what),
        ..h.clone()
    }));
    all.push(overhead.clone());
    all.push(wall.clone());
    let json = serde_json::json!({
        "job": format!(
            "digits chain, train {train_epochs} ep, distill {distill_epochs} ep, prune auto, int8, deploy, monitor"
        ),
        "setup": "nats-server on loopback; each stage service its own process",
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "sequential_jobs": args.sequential,
        "hops": all,
        "stage_compute": compute,
        "hop_overhead": hops,
        "orchestration_share_of_wall": share,
        "artifact_io": io,
        "jobs_at_once": args.batch,
        "jobs_per_minute": { "1 replica per stage": jpm1, "2 replicas per stage": jpm2 },
        "workers_in_2_replica_run": workers.len(),
        "listing_job_records": listed,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)? + "\n")?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
