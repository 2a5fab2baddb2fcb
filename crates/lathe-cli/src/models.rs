//! `lathe models`, `lathe infer`, `lathe promote` and `lathe rollback`: the registry and the
//! inference endpoint from the terminal.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::HeaderMap;
use lathe_proto::health::ModelHealth;
use lathe_proto::registry::ModelEntry;
use lathe_proto::{InferReply, ModelName, codec, names};

use crate::session::Session;

fn model_name(s: &str) -> anyhow::Result<ModelName> {
    s.parse::<ModelName>()
        .map_err(|e| anyhow::anyhow!("model: {e}"))
}

fn fmt_pct(v: Option<&f64>) -> String {
    v.map(|x| format!("{:.2}%", x * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn print_entry(e: &ModelEntry) {
    let canary = e
        .canary
        .as_ref()
        .map(|c| format!("v{} at {}%", c.version, c.percent))
        .unwrap_or_else(|| "none".into());
    outln!(
        "{}  active: {}  canary: {}",
        e.model,
        e.active
            .map(|v| format!("v{v}"))
            .unwrap_or_else(|| "none".into()),
        canary
    );
    outln!(
        "  {:<8} {:<36} {:>9} {:>10} {:>10}  STAGES",
        "VERSION",
        "JOB",
        "ACCURACY",
        "BYTES",
        "P99 MS"
    );
    for v in &e.versions {
        let mark = if Some(v.version) == e.active {
            "*"
        } else if e.canary.as_ref().is_some_and(|c| c.version == v.version) {
            "~"
        } else {
            " "
        };
        let stages: Vec<&str> = v.lineage.iter().map(|l| l.stage.as_str()).collect();
        outln!(
            "  {mark}v{:<6} {:<36} {:>9} {:>10} {:>10}  {}",
            v.version,
            v.job_id.to_string(),
            fmt_pct(v.metrics.get("test_accuracy")),
            v.artifact.bytes,
            v.metrics
                .get("p99_latency_ms")
                .map(|x| format!("{x:.3}"))
                .unwrap_or_else(|| "-".into()),
            stages.join("→")
        );
    }
    if let Some(last) = e.history.last() {
        outln!(
            "  last change: {:?} v{} by {} ({})",
            last.kind,
            last.version,
            last.by,
            last.reason
        );
    }
}

/// `lathe models [model]`.
pub async fn list(s: &Session, model: Option<String>, json: bool) -> anyhow::Result<ExitCode> {
    let entries = match model {
        Some(m) => {
            let m = model_name(&m)?;
            match s.registry().await?.get(&m).await? {
                Some((e, _)) => vec![e],
                None => bail!("model `{m}` is not in the registry"),
            }
        }
        None => s.registry().await?.list().await?,
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&entries)?);
    } else if entries.is_empty() {
        outln!("no models deployed yet");
    } else {
        let health = s.health().await?;
        for e in &entries {
            print_entry(e);
            if let Some(h) = health_of(&health, &e.model).await? {
                out!("{}", health_table(&h));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn health_table(h: &ModelHealth) -> String {
    let mut out = format!(
        "{}  window {} s  at {}\n  {:<8} {:<8} {:<8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}  DRIFTED\n",
        h.model,
        h.window_secs,
        h.at_ms,
        "VERSION",
        "ROLE",
        "STATUS",
        "REQ/S",
        "P50 MS",
        "P95 MS",
        "P99 MS",
        "ERRORS",
        "ACCURACY",
        "MAX PSI"
    );
    for v in &h.versions {
        let drifted: Vec<&str> = v.drifted.iter().map(|d| d.feature.as_str()).collect();
        out.push_str(&format!(
            "  v{:<7} {:<8} {:<8} {:>8.1} {:>8.3} {:>8.3} {:>8.3} {:>7.2}% {:>9} {:>8}  {}\n",
            v.version,
            v.role,
            format!("{:?}", v.status).to_lowercase(),
            v.requests_per_sec,
            v.p50_ms,
            v.p95_ms,
            v.p99_ms,
            v.error_rate * 100.0,
            fmt_pct(v.accuracy.as_ref()),
            v.max_feature_psi
                .map(|p| format!("{p:.3}"))
                .unwrap_or_else(|| "-".into()),
            drifted.join(",")
        ));
    }
    for a in h.recent_alerts.iter().rev().take(5) {
        out.push_str(&format!(
            "  alert {:?} v{}: {}\n",
            a.kind, a.version, a.message
        ));
    }
    out
}

/// The monitor's latest figures of a model, if any.
async fn health_of(
    health: &async_nats::jetstream::kv::Store,
    model: &ModelName,
) -> anyhow::Result<Option<ModelHealth>> {
    match health.get(model.as_str()).await? {
        Some(bytes) => {
            Ok(Some(codec::from_msgpack(&bytes).map_err(|e| {
                anyhow::anyhow!("unreadable health of `{model}`: {e}")
            })?))
        }
        None => Ok(None),
    }
}

/// `lathe monitor <model>`: the health table, redrawn on every update of the monitor.
pub async fn monitor(s: &Session, model: &str, once: bool, json: bool) -> anyhow::Result<ExitCode> {
    use futures::StreamExt;
    let m = model_name(model)?;
    let show = |h: &ModelHealth, clear: bool| -> anyhow::Result<()> {
        if json {
            outln!("{}", serde_json::to_string(h)?);
        } else {
            if clear {
                out!("\x1b[2J\x1b[H");
            }
            out!("{}", health_table(h));
        }
        Ok(())
    };
    let health = s.health().await?;
    if once {
        match health_of(&health, &m).await? {
            Some(h) => show(&h, false)?,
            None => bail!(
                "no health figures for `{m}` yet: is lathe-monitor running and the model deployed?"
            ),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut watch = health.watch_with_history(m.as_str()).await?;
    eprintln!("watching the health of `{m}` (Ctrl-C stops)");
    while let Some(entry) = watch.next().await {
        let entry = entry?;
        if let Ok(h) = codec::from_msgpack::<ModelHealth>(&entry.value) {
            show(&h, !json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `lathe promote <model> <version>`.
pub async fn promote(
    s: &Session,
    model: &str,
    version: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let m = model_name(model)?;
    let (entry, ()) = s
        .registry()
        .await?
        .update(&m, false, |e| e.promote(version, "cli", "promoted by hand"))
        .await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&entry)?);
    } else {
        outln!("{m}: v{version} is active");
    }
    Ok(ExitCode::SUCCESS)
}

/// `lathe rollback <model> [--to <version>]`.
pub async fn rollback(
    s: &Session,
    model: &str,
    to: Option<u32>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let m = model_name(model)?;
    let (entry, active) = s
        .registry()
        .await?
        .update(&m, false, |e| e.rollback(to, "cli", "rolled back by hand"))
        .await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&entry)?);
    } else {
        outln!("{m}: rolled back, v{active} is active");
    }
    Ok(ExitCode::SUCCESS)
}

/// The request body from what the user typed: JSON (a row, a batch, or a whole request),
/// a CSV file of rows (a header line is skipped), or comma-separated numbers.
pub fn request_body(input: &str) -> anyhow::Result<Vec<u8>> {
    let t = input.trim();
    if t.starts_with('{') {
        return Ok(t.as_bytes().to_vec());
    }
    if t.starts_with('[') {
        let v: serde_json::Value =
            serde_json::from_str(t).context("the input is not valid JSON")?;
        return Ok(serde_json::json!({ "inputs": v }).to_string().into_bytes());
    }
    let path = std::path::Path::new(t);
    let text = if path.is_file() {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    } else {
        t.to_string()
    };
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let cells: Result<Vec<f64>, _> = line.split(',').map(|c| c.trim().parse::<f64>()).collect();
        match cells {
            Ok(row) => rows.push(row),
            Err(_) if i == 0 => continue, // a header
            Err(e) => bail!(
                "line {}: `{line}` is not comma-separated numbers: {e}",
                i + 1
            ),
        }
    }
    if rows.is_empty() {
        bail!("no rows in the input: give JSON, a CSV file or comma-separated numbers");
    }
    let inputs = if rows.len() == 1 {
        serde_json::json!(rows[0])
    } else {
        serde_json::json!(rows)
    };
    Ok(serde_json::json!({ "inputs": inputs })
        .to_string()
        .into_bytes())
}

/// `lathe infer <model> <input>`.
pub async fn infer(
    client: &async_nats::Client,
    model: &str,
    input: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let m = model_name(model)?;
    let body = request_body(input)?;
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request_with_headers(names::infer_subject(&m), headers, body.into()),
    )
    .await
    .context("no answer within 10 s")?
    .with_context(|| format!("no deployer answers on {}", names::infer_subject(&m)))?;
    if let Some(h) = &reply.headers
        && let Some(err) = h.get("Nats-Service-Error")
    {
        let code = h
            .get("Nats-Service-Error-Code")
            .map(|c| c.as_str().to_string())
            .unwrap_or_default();
        eprintln!("lathe: {m} refused the request ({code}): {err}");
        return Ok(ExitCode::from(2));
    }
    if json {
        outln!("{}", String::from_utf8_lossy(&reply.payload));
        return Ok(ExitCode::SUCCESS);
    }
    let reply: InferReply = codec::decode_any(&reply.payload, None)
        .map_err(|e| anyhow::anyhow!("unreadable reply: {e}"))?;
    outln!("{} v{}", reply.model, reply.version);
    for (i, p) in reply.predictions.iter().enumerate() {
        let conf = p
            .probabilities
            .get(p.class as usize)
            .copied()
            .unwrap_or(0.0);
        outln!("  row {i}: {} (p = {:.3})", p.label, conf);
    }
    Ok(ExitCode::SUCCESS)
}
