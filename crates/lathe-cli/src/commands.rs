//! Objects built from what the user typed, and the work of each command.

use std::process::ExitCode;

use anyhow::{Context, bail};
use lathe_proto::codec::{self, Format};
use lathe_proto::{JobId, JobRecord, JobSpec, JobState, names};
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command, DatasetCommand, Global};
use crate::session::Session;
use crate::{local, models, trace_view, watch};

/// The sample job of the demo: the built-in digits data through every available stage.
const DEMO_SPEC: &str = include_str!("../../../proto/examples/valid/digits-chain.json");

fn read_spec(path: &std::path::Path) -> anyhow::Result<(JobSpec, Vec<u8>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    let parsed = if is_toml {
        JobSpec::parse_toml(&text)
    } else {
        JobSpec::parse(text.as_bytes(), Format::Json)
    };
    match parsed {
        Ok(spec) => {
            let bytes = codec::to_json(&spec);
            Ok((spec, bytes))
        }
        Err(errors) => {
            let list = errors
                .iter()
                .map(|e| format!("  {e}"))
                .collect::<Vec<_>>()
                .join("\n");
            bail!("{} is not a valid job spec:\n{list}", path.display())
        }
    }
}

fn parse_job(s: &str) -> anyhow::Result<JobId> {
    s.parse::<JobId>().map_err(|e| anyhow::anyhow!(e))
}

async fn follow(
    s: &Session,
    job: JobId,
    json: bool,
    ended: Option<watch::Ending>,
) -> anyhow::Result<ExitCode> {
    match watch::watch(&s.js, job, json, ended).await? {
        watch::Ending::Completed => {
            if !json && let Some((record, _)) = s.jobs().await?.get(job).await? {
                print_record(&record);
            }
            Ok(ExitCode::SUCCESS)
        }
        watch::Ending::Failed(reason) => {
            eprintln!("job {job} failed: {reason}");
            Ok(ExitCode::from(1))
        }
        watch::Ending::Rejected(reasons) => {
            eprintln!("job {job} was rejected:\n{reasons}");
            Ok(ExitCode::from(2))
        }
    }
}

fn fmt_metric(name: &str, v: f64) -> String {
    if name.contains("accuracy") {
        format!("{name} {:.2} %", v * 100.0)
    } else if v.fract() == 0.0 {
        format!("{name} {}", v as i64)
    } else {
        format!("{name} {v:.3}")
    }
}

/// What a quantize step chose, from its details: e.g. "4-bit, one scale per tensor (auto
/// tried 1 setting)".
fn quantize_choice(details: &serde_json::Value) -> Option<String> {
    use lathe_model::quantize::Granularity;
    use serde::Deserialize;
    let bits = details.get("bits")?.as_u64()?;
    let granularity = match Granularity::deserialize(details.get("granularity")?).ok()? {
        Granularity::PerTensor => "one scale per tensor".to_string(),
        Granularity::PerChannel => "one scale per channel".to_string(),
        Granularity::Grouped(n) => format!("one scale per {n} weights"),
    };
    let tried = details
        .get("auto_search")
        .and_then(serde_json::Value::as_array)
        .filter(|a| !a.is_empty())
        .map(|a| {
            let s = if a.len() == 1 { "" } else { "s" };
            format!(" (auto tried {} setting{s})", a.len())
        })
        .unwrap_or_default();
    Some(format!("{bits}-bit, {granularity}{tried}"))
}

fn print_record(r: &JobRecord) {
    outln!("job {}  {}  {:?}", r.job_id, r.name, r.state);
    if let Some(end) = r.finished_at_ms {
        outln!(
            "  wall time {:.1} s",
            end.saturating_sub(r.submitted_at_ms) as f64 / 1000.0
        );
    }
    for s in &r.steps {
        let took = match (s.started_at_ms, s.finished_at_ms) {
            (Some(a), Some(b)) => format!(" in {:.1} s", b.saturating_sub(a) as f64 / 1000.0),
            _ => String::new(),
        };
        outln!(
            "  {:>2}. {:<9} {:?}{took} (attempts {})",
            s.step,
            s.stage.as_str(),
            s.state,
            s.attempts
        );
        if !s.metrics.is_empty() {
            let m: Vec<String> = s.metrics.iter().map(|(k, v)| fmt_metric(k, *v)).collect();
            outln!("      {}", m.join(", "));
        }
        if let Some(choice) = s.details.as_ref().and_then(quantize_choice) {
            outln!("      quantized {choice}");
        }
        if let Some(a) = &s.artifact {
            outln!("      artifact {} ({} bytes)", a.name, a.bytes);
        }
        if let Some(e) = &s.error {
            outln!("      error: {e}");
        }
    }
    for e in &r.errors {
        outln!("  invalid: {e}");
    }
    if let Some(e) = &r.error
        && r.errors.is_empty()
    {
        outln!("  error: {e}");
    }
}

pub async fn run(args: Cli) -> anyhow::Result<ExitCode> {
    let g = args.global;
    match args.command {
        Command::Submit { spec, watch } => {
            let (spec, bytes) = read_spec(&spec)?;
            let s = Session::connect(&g).await?;
            let job = s.submit(bytes).await?;
            if g.json {
                outln!(
                    "{}",
                    serde_json::json!({ "job_id": job, "name": spec.name })
                );
            } else {
                outln!("submitted job {job} ({})", spec.name);
            }
            if watch {
                follow(&s, job, g.json, None).await
            } else {
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::Watch { job } => {
            let job = parse_job(&job)?;
            let s = Session::connect(&g).await?;
            // A job that ended and whose events expired is answered from its record.
            let ended = match s.jobs().await?.get(job).await? {
                Some((record, _)) => watch::ending_of(&record),
                None => {
                    eprintln!(
                        "lathe: no record of job {job} yet; waiting for its events (a job \
                         has one once a service running intake takes it: check the id, and \
                         that one runs)"
                    );
                    None
                }
            };
            follow(&s, job, g.json, ended).await
        }
        Command::Status { job } => {
            let job = parse_job(&job)?;
            let s = Session::connect(&g).await?;
            let Some((record, _)) = s.jobs().await?.get(job).await? else {
                bail!("no job {job}")
            };
            if g.json {
                outln!("{}", serde_json::to_string_pretty(&record)?);
            } else {
                print_record(&record);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Jobs => {
            let s = Session::connect(&g).await?;
            let jobs = s.jobs().await?.list().await?;
            if g.json {
                outln!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                outln!("{:<36}  {:<20}  {:<9}  STAGES", "JOB", "NAME", "STATE");
                for r in jobs {
                    let stages: Vec<String> = r
                        .steps
                        .iter()
                        .map(|s| format!("{}:{:?}", s.stage.as_str(), s.state).to_lowercase())
                        .collect();
                    outln!(
                        "{:<36}  {:<20}  {:<9}  {}",
                        r.job_id,
                        r.name,
                        format!("{:?}", r.state).to_lowercase(),
                        stages.join(" ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc {
            older_than_days,
            keep_versions,
            dry_run,
        } => {
            if !(older_than_days >= 0.0 && older_than_days.is_finite()) {
                bail!("--older-than-days must be a number of days ≥ 0, not {older_than_days}");
            }
            let s = Session::connect(&g).await?;
            let cutoff =
                lathe_proto::now_ms().saturating_sub((older_than_days * 86_400_000.0) as u64);
            let report = lathe_runtime::artifacts::collect_garbage(
                &s.artifacts().await?,
                &s.registry().await?,
                &s.jobs().await?,
                cutoff,
                keep_versions,
                dry_run,
            )
            .await?;
            if g.json {
                outln!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for (model, version) in &report.forgotten_versions {
                    outln!(
                        "{} {model} version {version}",
                        if dry_run { "would forget" } else { "forgot" }
                    );
                }
                for (name, bytes) in &report.removed {
                    outln!(
                        "{} {name} ({bytes} bytes)",
                        if dry_run { "would remove" } else { "removed" }
                    );
                }
                outln!(
                    "{} {} of {} artifacts ({} bytes); kept {} in the registry, {} of running or recent jobs, {} without a job record",
                    if dry_run { "would remove" } else { "removed" },
                    report.removed.len(),
                    report.examined,
                    report.removed_bytes,
                    report.kept_in_registry,
                    report.kept_recent,
                    report.kept_without_record
                );
                outln!(
                    "{} {} job records of ended jobs; kept {} that registered versions come from",
                    if dry_run { "would remove" } else { "removed" },
                    report.removed_jobs.len(),
                    report.kept_jobs_in_registry
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Provision => {
            Session::connect(&g).await?.provision().await?;
            if !g.json {
                outln!(
                    "lathe: every stream, consumer and bucket is in place on {}",
                    g.nats_url
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Up => {
            let _nats = local::ensure_nats(&g.nats_url)?;
            let stop = lathe_runtime::shutdown::on_signal();
            eprintln!(
                "lathe: every stage is running against {} (Ctrl-C stops)",
                g.nats_url
            );
            local::run_services(g.nats_url.clone(), stop).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => demo(&g).await,
        Command::Trace { job, jaeger, fetch } => {
            let job = parse_job(&job)?;
            let bars = if fetch {
                let base = jaeger.clone().unwrap_or_default();
                let url = format!(
                    "{}/api/v3/traces/{}",
                    base.trim_end_matches('/'),
                    job.trace_id_hex()
                );
                let body: serde_json::Value =
                    tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
                        Ok(ureq::get(&url)
                            .call()
                            .with_context(|| format!("GET {url}"))?
                            .into_json()?)
                    })
                    .await??;
                trace_view::from_jaeger_v3(&body)?
            } else {
                let s = Session::connect(&g).await?;
                let Some((record, _)) = s.jobs().await?.get(job).await? else {
                    bail!("no job {job}")
                };
                if !g.json {
                    outln!(
                        "job {job}  {}  {:?}  (trace id {})",
                        record.name,
                        record.state,
                        job.trace_id_hex()
                    );
                }
                trace_view::from_record(&record)
            };
            if g.json {
                let rows: Vec<_> = bars
                    .iter()
                    .map(|b| serde_json::json!({"name": b.name, "service": b.service, "start_unix_ms": b.start_ms, "end_unix_ms": b.end_ms}))
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                out!("{}", trace_view::render(&bars, 48));
                if let Some(base) = jaeger {
                    outln!(
                        "Jaeger: {}/trace/{}",
                        base.trim_end_matches('/'),
                        job.trace_id_hex()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Models { model } => {
            let s = Session::connect(&g).await?;
            models::list(&s, model, g.json).await
        }
        Command::Infer { model, input } => {
            let s = Session::connect(&g).await?;
            models::infer(&s.client, &model, &input, g.json).await
        }
        Command::Monitor { model, once } => {
            let s = Session::connect(&g).await?;
            models::monitor(&s, &model, once, g.json).await
        }
        Command::Promote { model, version } => {
            let s = Session::connect(&g).await?;
            models::promote(&s, &model, version, g.json).await
        }
        Command::Rollback { model, to } => {
            let s = Session::connect(&g).await?;
            models::rollback(&s, &model, to, g.json).await
        }
        Command::Dataset(DatasetCommand::Put { name, file }) => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let s = Session::connect(&g).await?;
            let info = s.datasets().await?.put(&name, &bytes).await?;
            outln!(
                "stored dataset {} ({} bytes); use \"source\": \"bucket:{}\"",
                info.name,
                info.bytes,
                info.name
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dataset(DatasetCommand::List) => {
            let s = Session::connect(&g).await?;
            let list = s.datasets().await?.list().await?;
            if g.json {
                let v: Vec<_> = list.iter().map(|d| serde_json::json!({"name": d.name, "bytes": d.bytes, "digest": d.digest})).collect();
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for d in list {
                    outln!("{:<32} {:>12} bytes  {}", d.name, d.bytes, d.digest);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { job, out } => {
            let job = parse_job(&job)?;
            let s = Session::connect(&g).await?;
            let Some((record, _)) = s.jobs().await?.get(job).await? else {
                bail!("no job {job}")
            };
            let Some(artifact) = record.steps.iter().rev().find_map(|s| s.artifact.clone()) else {
                bail!("job {job} has no artifact yet")
            };
            let bytes = s.artifacts().await?.get(&artifact).await?;
            let model = lathe_model::artifact::Artifact::from_bytes(&bytes)
                .with_context(|| format!("artifact {}", artifact.name))?;
            let st = lathe_model::interop::export_safetensors(&model)?;
            std::fs::write(&out, &st).with_context(|| format!("cannot write {}", out.display()))?;
            outln!(
                "wrote {} ({} bytes) from {}",
                out.display(),
                st.len(),
                artifact.name
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The demo: a local server if none answers, every stage in this process, the sample
/// digits job submitted and watched, and its result printed.
async fn demo(g: &Global) -> anyhow::Result<ExitCode> {
    let _nats = local::ensure_nats(&g.nats_url)?;
    let stop = CancellationToken::new();
    let services = tokio::spawn(local::run_services(g.nats_url.clone(), stop.clone()));
    let s = Session::connect(g).await?;
    // The services provision too, concurrently; the demo needs every stream before it submits.
    let res = s.provision().await?;
    let spec = JobSpec::parse(DEMO_SPEC.as_bytes(), Format::Json)
        .map_err(|e| anyhow::anyhow!("demo spec: {e:?}"))?;
    outln!(
        "lathe demo: submitting `{}` ({})",
        spec.name,
        spec.pipeline
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" → ")
    );
    let job = s.submit(DEMO_SPEC.as_bytes().to_vec()).await?;
    let code = follow(&s, job, g.json, None).await?;
    let completed = match res.jobs.get(job).await? {
        Some((record, _)) if record.state == JobState::Completed => Some(record),
        _ => None,
    };
    if let Some(record) = &completed {
        for step in &record.steps {
            let what = if step.stage == lathe_proto::Stage::Train {
                "trained model"
            } else {
                step.stage.as_str()
            };
            let m = |k: &str| step.metrics.get(k).copied();
            match (
                m("test_accuracy"),
                m("artifact_bytes"),
                m("smoke_accuracy"),
                m("smoke_rows"),
            ) {
                (Some(accuracy), Some(bytes), _, _) => outln!(
                    "{what}: test accuracy {:.2} %, artifact {bytes} bytes",
                    accuracy * 100.0
                ),
                // The monitor's step measures the live endpoint, not an artifact.
                (_, _, Some(accuracy), Some(rows)) => outln!(
                    "{what}: smoke test through the live endpoint, {:.2} % of {rows} rows right",
                    accuracy * 100.0
                ),
                _ => outln!("{what}: {:?}", step.state),
            }
        }
    }
    if completed.is_some()
        && let Some(deploy) = &spec.deploy
    {
        demo_inference(&s, &deploy.model).await?;
    }
    stop.cancel();
    match services.await {
        Ok(Err(e)) => eprintln!("lathe: a service stopped with an error: {e:#}"),
        Err(e) => eprintln!("lathe: a service task failed: {e}"),
        Ok(Ok(())) => {}
    }
    Ok(code)
}

/// Sends the built-in test rows to the deployed model over NATS, as a client would, and
/// prints how many it got right.
async fn demo_inference(s: &Session, model: &lathe_proto::ModelName) -> anyhow::Result<()> {
    let (_, test) = lathe_model::data::builtin("digits")?;
    let w = test.n_features;
    let rows: Vec<&[f32]> = test.features.chunks_exact(w).collect();
    let body = serde_json::json!({ "inputs": rows });
    let started = std::time::Instant::now();
    let reply = s
        .client
        .request(names::infer_subject(model), body.to_string().into())
        .await
        .with_context(|| format!("no answer on {}", names::infer_subject(model)))?;
    let took = started.elapsed();
    let reply: lathe_proto::InferReply = codec::decode_any(&reply.payload, None)
        .map_err(|e| anyhow::anyhow!("unreadable inference reply: {e}"))?;
    let right = reply
        .predictions
        .iter()
        .zip(&test.labels)
        .filter(|(p, l)| p.class == **l)
        .count();
    outln!(
        "served: {} v{} on {}: {right}/{} built-in test rows right, one batch in {:.1} ms",
        reply.model,
        reply.version,
        names::infer_subject(model),
        reply.predictions.len(),
        took.as_secs_f64() * 1e3
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::quantize_choice;
    use serde_json::json;

    #[test]
    fn a_quantize_steps_choice_reads_as_bits_granularity_and_search() {
        let auto = json!({"bits": 4, "granularity": "per_tensor", "auto_search": [
            {"bits": 4, "granularity": "per_tensor", "validation_accuracy": 0.98,
             "inside_budget": true}]});
        assert_eq!(
            quantize_choice(&auto).as_deref(),
            Some("4-bit, one scale per tensor (auto tried 1 setting)")
        );
        let fixed = json!({"bits": 8, "granularity": {"grouped": 32}, "auto_search": []});
        assert_eq!(
            quantize_choice(&fixed).as_deref(),
            Some("8-bit, one scale per 32 weights")
        );
        // Another stage's details say nothing of it.
        assert_eq!(quantize_choice(&json!({"test": {"accuracy": 0.9}})), None);
    }
}
