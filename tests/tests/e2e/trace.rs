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
