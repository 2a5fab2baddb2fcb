//! One trace per job: spans exported by a real service process over OTLP share the job's id
//! as their trace id and hang under its root; `lathe trace` draws the waterfall.

use std::process::Command;
use std::time::Duration;

use lathe_proto::JobState;
use lathe_testkit::otlp::OtlpReceiver;
use lathe_tests::*;

fn sigterm(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_one_trace_exported_over_otlp() {
    let s = stack().await;
    let receiver = OtlpReceiver::start().await;
    let trainer = spawn_service_with_logs(
        "lathe-trainer",
        &s.server.url(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("LATHE_LOG_FORMAT", "json"),
        ],
    );
    let job = submit(&s.res, &quick_spec("traced", 3)).await;
    let record = wait_job(&s.res, job, Duration::from_secs(60)).await;
    assert_eq!(record.state, JobState::Completed, "{:?}", record.error);
    // A clean stop flushes the spans still buffered.
    sigterm(&trainer);
    let out = trainer.wait_with_output().unwrap();
    assert!(out.status.success());

    // Logs: JSON lines; those of the task's work name the job, the stage and the trace/span ids.
    let logs: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    let task_lines: Vec<&serde_json::Value> = logs
        .iter()
        .filter(|l| {
            l["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|sp| sp["name"] == "process"))
        })
        .collect();
    assert!(
        task_lines.len() >= 3,
        "task log lines: {task_lines:?} of {logs:?}"
    );
    for line in &task_lines {
        let process = line["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|sp| sp["name"] == "process")
            .unwrap();
        assert_eq!(process["trace_id"], job.trace_id_hex(), "{line}");
        assert_eq!(process["lathe.job.id"], job.to_string());
        assert_eq!(process["lathe.stage"], "train");
        assert_eq!(
            process["span_id"].as_str().map(str::len),
            Some(16),
            "{line}"
        );
    }

    let spans = receiver.spans();
    let trace_id = job.trace_id_bytes().to_vec();
    assert!(!spans.is_empty(), "no spans exported");
    assert!(
        spans.iter().all(|sp| sp.trace_id == trace_id),
        "every span carries the job id as its trace id"
    );
    assert!(spans.iter().all(|sp| sp.service == "lathe-trainer"));

    let root = spans
        .iter()
        .find(|sp| sp.parent_span_id.is_empty())
        .unwrap_or_else(|| {
            let seen: Vec<_> = spans
                .iter()
                .map(|s| (&s.name, &s.span_id, &s.parent_span_id))
                .collect();
            panic!("no root span in {seen:?}")
        });
    assert_eq!(root.name, "job traced");
    assert_eq!(
        root.span_id,
        lathe_runtime::trace::root_span_id(job).to_bytes().to_vec()
    );
    assert_eq!(
        spans
            .iter()
            .filter(|sp| sp.parent_span_id.is_empty())
            .count(),
        1,
        "one root"
    );
    // Every span descends from the root.
    for sp in &spans {
        let mut cur = sp;
        let mut hops = 0;
        while !cur.parent_span_id.is_empty() {
            cur = spans
                .iter()
                .find(|p| p.span_id == cur.parent_span_id)
                .unwrap_or_else(|| panic!("{}: parent missing", sp.name));
            hops += 1;
            assert!(hops < 20);
        }
        assert_eq!(
            cur.span_id, root.span_id,
            "{} is not under the root",
            sp.name
        );
    }
    let by_name = |n: &str| {
        spans
            .iter()
            .find(|sp| sp.name == n)
            .unwrap_or_else(|| panic!("no span {n}"))
    };
    let intake = by_name("process lathe.jobs.submit");
    let publish = by_name("publish lathe.work.train");
    let process = by_name("process lathe.work.train");
    assert_eq!(intake.parent_span_id, root.span_id);
    assert_eq!(
        (publish.kind, process.kind),
        (4, 5),
        "producer and consumer"
    );
    assert_eq!(publish.parent_span_id, intake.span_id);
    assert_eq!(
        process.parent_span_id, publish.span_id,
        "the process span continues the publish span"
    );
    assert_eq!(process.attributes["messaging.system"], "nats");
    assert_eq!(
        process.attributes["messaging.destination.name"],
        "lathe.work.train"
    );
    assert_eq!(process.attributes["lathe.job.id"], job.to_string());
    assert_eq!(process.attributes["lathe.stage"], "train");
    let metrics = &record.steps[0].metrics;
    for key in ["test_accuracy", "parameters", "artifact_bytes"] {
        assert_eq!(
            process.number(&format!("lathe.{key}")),
            Some(metrics[key]),
            "{key}"
        );
    }
    for phase in ["load dataset", "train epochs", "store artifact"] {
        assert_eq!(by_name(phase).parent_span_id, process.span_id, "{phase}");
    }
    let logged_span: Vec<&str> = task_lines
        .iter()
        .filter_map(|l| {
            l["spans"]
                .as_array()
                .unwrap()
                .iter()
                .find(|sp| sp["name"] == "process")
        })
        .filter_map(|sp| sp["span_id"].as_str())
        .collect();
    let process_hex: String = process.span_id.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        logged_span.iter().all(|id| *id == process_hex),
        "logs name the exported process span"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lathe_trace_draws_every_step_in_order_within_the_wall_time() {
    let s = stack().await;
    let trainer = start_trainer(&s.server.url(), "t1").await;
    let job = submit(&s.res, &quick_spec("waterfall", 5)).await;
    let record = wait_job(&s.res, job, Duration::from_secs(60)).await;
    assert_eq!(record.state, JobState::Completed);
    trainer.stop().await;

    let out = Command::new(bin_dir().join("lathe"))
        .args([
            "trace",
            &job.to_string(),
            "--json",
            "--nats-url",
            &s.server.url(),
        ])
        .output()
        .expect("run lathe trace");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "job waterfall",
            "process lathe.jobs.submit",
            "queued lathe.work.train",
            "process lathe.work.train"
        ]
    );
    let dur = |r: &serde_json::Value| {
        r["end_unix_ms"].as_f64().unwrap() - r["start_unix_ms"].as_f64().unwrap()
    };
    let wall = dur(&rows[0]);
    let parts: f64 = rows[1..].iter().map(dur).sum();
    assert!(
        parts <= wall + 1.0,
        "steps take {parts} ms of a {wall} ms job"
    );
    assert!(
        rows[1..]
            .windows(2)
            .all(|w| w[0]["end_unix_ms"].as_f64() <= w[1]["end_unix_ms"].as_f64())
    );

    let text = Command::new(bin_dir().join("lathe"))
        .args([
            "trace",
            &job.to_string(),
            "--nats-url",
            &s.server.url(),
            "--jaeger",
            "http://jaeger:16686",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains(&format!(
            "Jaeger: http://jaeger:16686/trace/{}",
            job.trace_id_hex()
        )),
        "{text}"
    );
    assert!(text.contains("process lathe.work.train"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_task_in_flight_and_exits_cleanly() {
    let s = stack().await;
    let mut trainer = spawn_service(
        "lathe-trainer",
        &s.server.url(),
        &[("LATHE_WORKER_ID", "graceful")],
    );
    let spec = br#"{"name": "graceful", "dataset": {"source": "builtin:digits"}, "model": {"hidden": [256, 128]},
        "train": {"epochs": 120, "patience": null}}"#;
    let job = submit(&s.res, spec).await;
    wait_event(
        &s.res,
        job,
        lathe_proto::EventKind::Progress,
        Duration::from_secs(60),
    )
    .await;
    sigterm(&trainer);
    let status = trainer.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let (r, _) = s.res.jobs.get(job).await.unwrap().unwrap();
    assert_eq!(
        r.state,
        JobState::Completed,
        "the task in flight was finished before exit"
    );
    assert_eq!(r.steps[0].attempts, 1);
    assert_eq!(r.steps[0].worker.as_deref(), Some("graceful"));
}

/// The whole chain, every stage its own process, exporting to one OTLP receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_services_one_trace_with_the_first_inferences() {
    let s = stack().await;
    let receiver = OtlpReceiver::start().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ("LATHE_MONITOR_TICK_MS", "200"),
    ];
    let services = [
        "lathe-trainer",
        "lathe-distiller",
        "lathe-pruner",
        "lathe-quantizer",
        "lathe-deployer",
        "lathe-monitor",
    ];
    let children: Vec<_> = services
        .iter()
        .map(|b| spawn_service(b, &s.server.url(), &env))
        .collect();
    let spec =
        br#"{"name": "six", "dataset": {"source": "builtin:digits"}, "model": {"hidden": [32]},
        "train": {"epochs": 8, "patience": null, "seed": 1},
        "distill": {"student_hidden": [16], "epochs": 20},
        "prune": {"method": "magnitude", "target_sparsity": 0.5, "steps": 1, "finetune_epochs": 1},
        "quantize": {"bits": 8},
        "deploy": {"model": "six"},
        "monitor": {"smoke_rows": 5, "window_secs": 5},
        "budget": {"max_accuracy_drop": 0.1},
        "pipeline": ["train", "distill", "prune", "quantize", "deploy", "monitor"]}"#;
    let job = submit(&s.res, spec).await;
    let record = wait_job(&s.res, job, Duration::from_secs(180)).await;
    assert_eq!(record.state, JobState::Completed, "{:?}", record.error);
    // Every step counts the parameters the same way, as stored non-zeros: the deployed
    // (pruned, then quantized) model has the quantized one's, fewer than the dense student's.
    let parameters = |i: usize| record.steps[i].metrics["parameters"];
    assert_eq!(parameters(1), (64 * 16 + 16 + 16 * 10 + 10) as f64);
    assert_eq!(parameters(4), parameters(3));
    assert!(parameters(3) < parameters(1) * 0.6, "{}", parameters(3));

    // A caller's request with its own trace context: the deployer's span continues it.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        "traceparent",
        format!("00-{caller_trace}-{caller_span}-01").as_str(),
    );
    let row: Vec<f32> = lathe_model::data::builtin("digits")
        .unwrap()
        .1
        .row(0)
        .to_vec();
    let reply = s
        .res
        .client
        .request_with_headers(
            "lathe.infer.six",
            h,
            serde_json::json!({"inputs": row}).to_string().into(),
        )
        .await
        .unwrap();
    assert!(
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error"))
            .is_none()
    );
    // Let the monitor judge the model (and export its gauges) once more.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for c in &children {
        sigterm(c);
    }
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }

    let all = receiver.spans();
    let trace_id = job.trace_id_bytes().to_vec();
    let spans: Vec<_> = all
        .iter()
        .filter(|sp| sp.trace_id == trace_id)
        .cloned()
        .collect();
    let root_id = lathe_runtime::trace::root_span_id(job).to_bytes().to_vec();
    let roots: Vec<_> = spans
        .iter()
        .filter(|sp| sp.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root");
    assert_eq!(roots[0].span_id, root_id);
    for sp in &spans {
        let mut cur = sp;
        let mut hops = 0;
        while !cur.parent_span_id.is_empty() {
            cur = spans
                .iter()
                .find(|p| p.span_id == cur.parent_span_id)
                .unwrap_or_else(|| panic!("{} ({}): parent missing", sp.name, sp.service));
            hops += 1;
            assert!(hops < 30);
        }
        assert_eq!(cur.span_id, root_id, "{} is not under the root", sp.name);
    }
    let mut seen: Vec<&str> = spans.iter().map(|sp| sp.service.as_str()).collect();
    seen.sort();
    seen.dedup();
    for svc in services {
        assert!(seen.contains(&svc), "no span from {svc}: {seen:?}");
    }
    for (i, step) in record.steps.iter().enumerate() {
        let stage = step.stage.as_str();
        let subject = format!("lathe.work.{stage}");
        let process = spans
            .iter()
            .find(|sp| sp.name == format!("process {subject}"))
            .unwrap_or_else(|| panic!("no process span for {stage}"));
        assert_eq!(process.service, step.stage.service_name());
        assert_eq!(process.attributes["lathe.stage"], stage);
        let publish = spans
            .iter()
            .find(|sp| sp.span_id == process.parent_span_id)
            .unwrap();
        assert_eq!(publish.name, format!("publish {subject}"), "{stage}");
        assert_eq!((publish.kind, process.kind), (4, 5));
        if i > 0 {
            // The publish of step i was made by the service of step i − 1.
            assert_eq!(publish.service, record.steps[i - 1].stage.service_name());
        }
        for key in ["test_accuracy", "artifact_bytes"] {
            if let Some(v) = step.metrics.get(key) {
                assert_eq!(
                    process.number(&format!("lathe.{key}")),
                    Some(*v),
                    "{stage} {key}"
                );
            }
        }
    }
    // The smoke test's inferences are in the job's trace, under the monitor's smoke span,
    // and link to the deploying job.
    let smoke = spans
        .iter()
        .find(|sp| sp.name == "smoke test")
        .expect("smoke span");
    let infers: Vec<_> = spans
        .iter()
        .filter(|sp| sp.service == "lathe-deployer" && sp.name == "process lathe.infer.six")
        .collect();
    assert_eq!(infers.len(), 5, "{infers:?}");
    for sp in &infers {
        assert_eq!(sp.parent_span_id, smoke.span_id);
        assert_eq!(sp.kind, 2, "a server span");
        assert!(
            sp.links
                .iter()
                .any(|(t, s)| *t == trace_id && *s == root_id),
            "{:?}",
            sp.links
        );
    }
    // The caller's request continued the caller's trace.
    let caller: Vec<_> = all
        .iter()
        .filter(|sp| sp.name == "process lathe.infer.six" && hex(&sp.trace_id) == caller_trace)
        .collect();
    assert_eq!(caller.len(), 1, "the caller's inference span");
    assert_eq!(hex(&caller[0].parent_span_id), caller_span);
    // The monitor's figures arrived as OTLP metrics.
    let points = receiver.points();
    assert!(
        points.iter().any(|p| p.service == "lathe-monitor"
            && p.metric == "lathe.model.requests_per_second"
            && p.attributes.get("lathe.model").map(String::as_str) == Some("six")),
        "{points:?}"
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
