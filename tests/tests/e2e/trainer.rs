//! The trainer through real NATS: the stored artifact's accuracy, recomputed from the file,
//! matches the record; CSV datasets from the bucket train too.

use std::time::Duration;

use lathe_model::artifact::Artifact;
use lathe_model::data;
use lathe_model::engine::Engine;
use lathe_model::eval::evaluate;
use lathe_proto::JobState;
use lathe_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trained_artifact_has_the_accuracy_its_record_claims() {
    let s = stack().await;
    let trainer = start_trainer(&s.server.url(), "t1").await;
    let spec = std::fs::read(proto_dir().join("examples/valid/digits.json")).unwrap();
    let job = submit(&s.res, &spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(180)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let step = &r.steps[0];
    let claimed = step.metrics["test_accuracy"];
    assert!(claimed >= 0.97, "test accuracy {claimed} below 97 %");

    let reference = step.artifact.as_ref().expect("an artifact");
    let bytes = s.res.artifacts.get(reference).await.unwrap();
    assert_eq!(bytes.len() as f64, step.metrics["artifact_bytes"]);
    let artifact = Artifact::from_bytes(&bytes).unwrap();
    assert_eq!(artifact.lineage.last().unwrap().stage, "train");
    let engine = Engine::from_artifact(&artifact).unwrap();
    let (_, test) = data::builtin("digits").unwrap();
    let recomputed = evaluate(&engine, &test).accuracy;
    assert!(
        (recomputed - claimed).abs() < 1e-9,
        "recomputed {recomputed} vs recorded {claimed}"
    );
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_from_the_dataset_bucket_trains_with_its_label_column() {
    let s = stack().await;
    let trainer = start_trainer(&s.server.url(), "t1").await;
    // The digits training file with the label moved to the end and renamed.
    let text = std::fs::read_to_string(proto_dir().join("../data/digits_train.csv")).unwrap();
    let mut csv = String::new();
    for (i, line) in text.lines().enumerate() {
        let (label, rest) = line.split_once(',').unwrap();
        let label = if i == 0 { "digit" } else { label };
        csv.push_str(&format!("{rest},{label}\n"));
    }
    s.res
        .datasets
        .put("digits-relabelled", csv.as_bytes())
        .await
        .unwrap();
    let spec = br#"{"name": "bucket-csv", "dataset": {"source": "bucket:digits-relabelled", "label_column": "digit",
        "test_fraction": 0.2}, "model": {"hidden": [64]}, "train": {"epochs": 30, "seed": 2}}"#;
    let job = submit(&s.res, spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    assert!(
        r.steps[0].metrics["test_accuracy"] > 0.9,
        "{:?}",
        r.steps[0].metrics
    );

    // A CSV whose label column is missing fails the job, naming the column.
    let spec = br#"{"name": "bad-column", "dataset": {"source": "bucket:digits-relabelled", "label_column": "class"},
        "train": {"epochs": 1}}"#;
    let job = submit(&s.res, spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Failed);
    assert!(
        r.error.as_deref().unwrap_or("").contains("class"),
        "{:?}",
        r.error
    );
    trainer.stop().await;
}
