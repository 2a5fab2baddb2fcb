//! The distiller through real NATS: train → distill stores a student whose accuracy,
//! recomputed from the stored file, matches its record, with the teacher in its lineage;
//! without `student_hidden` the stage picks a width and records the ones it tried.

use std::time::Duration;

use lathe_model::artifact::Artifact;
use lathe_model::data;
use lathe_model::engine::Engine;
use lathe_model::eval::evaluate;
use lathe_proto::JobState;
use lathe_tests::*;

async fn start_distiller(url: &str, id: &str) -> InProcess {
    start_stage(url, id, "lathe-distiller", lathe_distiller::Distiller).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distilled_student_has_the_accuracy_its_record_claims() {
    let s = stack().await;
    let trainer = start_trainer(&s.server.url(), "t1").await;
    let distiller = start_distiller(&s.server.url(), "d1").await;
    let spec = br#"{"name": "distil", "dataset": {"source": "builtin:digits"},
        "model": {"hidden": [128]}, "train": {"epochs": 15, "seed": 1},
        "distill": {"student_hidden": [16], "temperature": 3, "alpha": 0.6, "epochs": 12},
        "pipeline": ["train", "distill"]}"#;
    let job = submit(&s.res, spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(180)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let teacher_accuracy = r.steps[0].metrics["test_accuracy"];
    let step = &r.steps[1];
    let m = &step.metrics;
    assert_eq!(m["student_width_0"], 16.0);
    assert_eq!(m["parameters"], (64 * 16 + 16 + 16 * 10 + 10) as f64);
    assert_eq!(m["temperature"], 3.0);
    assert_eq!(m["alpha"], 0.6);
    assert!(
        (m["teacher_test_accuracy"] - teacher_accuracy).abs() < 1e-9,
        "{m:?}"
    );
    let claimed = m["test_accuracy"];
    assert!(claimed > 0.85, "student test accuracy {claimed}");

    let reference = step.artifact.as_ref().expect("a student artifact");
    let bytes = s.res.artifacts.get(reference).await.unwrap();
    assert_eq!(bytes.len() as f64, m["artifact_bytes"]);
    let artifact = Artifact::from_bytes(&bytes).unwrap();
    assert_eq!(artifact.mlp_config().hidden, vec![16]);
    let stages: Vec<&str> = artifact.lineage.iter().map(|l| l.stage.as_str()).collect();
    assert_eq!(stages.first(), Some(&"train"), "{stages:?}");
    assert_eq!(stages.last(), Some(&"distill"), "{stages:?}");
    let engine = Engine::from_artifact(&artifact).unwrap();
    let (_, test) = data::builtin("digits").unwrap();
    let recomputed = evaluate(&engine, &test).accuracy;
    assert!(
        (recomputed - claimed).abs() < 1e-9,
        "recomputed {recomputed} vs recorded {claimed}"
    );
    distiller.stop().await;
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_records_the_widths_it_tried() {
    let s = stack().await;
    let trainer = start_trainer(&s.server.url(), "t1").await;
    let distiller = start_distiller(&s.server.url(), "d1").await;
    // A loose budget: the first width that comes within 10 points of the teacher wins.
    let spec = br#"{"name": "distil-auto", "dataset": {"source": "builtin:digits"},
        "model": {"hidden": [128]}, "train": {"epochs": 15, "seed": 2},
        "distill": {"epochs": 8}, "budget": {"max_accuracy_drop": 0.1},
        "pipeline": ["train", "distill"]}"#;
    let job = submit(&s.res, spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(180)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let step = &r.steps[1];
    let details = step.details.as_ref().expect("details");
    let tried = details["auto"]["tried"].as_array().expect("tried widths");
    assert!(!tried.is_empty());
    let last = tried.last().unwrap();
    assert_eq!(last["within_budget"], true, "{tried:?}");
    // Every width before the chosen one missed the budget, and widths grow.
    for t in &tried[..tried.len() - 1] {
        assert_eq!(t["within_budget"], false, "{tried:?}");
    }
    assert_eq!(
        step.metrics["student_width_0"],
        last["width"].as_f64().unwrap()
    );
    distiller.stop().await;
    trainer.stop().await;
}
