//! The quantizer through real NATS: train → quantize and train → prune → quantize store
//! integer artifacts whose recomputed accuracy matches the record; 3 bits are refused at
//! intake.

use std::time::Duration;

use lathe_model::artifact::{Artifact, TensorData};
use lathe_model::data;
use lathe_model::engine::Engine;
use lathe_model::eval::evaluate;
use lathe_proto::{JobState, Stage};
use lathe_runtime::service;
use lathe_tests::*;
use tokio_util::sync::CancellationToken;

/// A stage replica running in this process until stopped.
async fn start<H: lathe_runtime::StageHandler>(
    url: &str,
    id: &str,
    name: &'static str,
    h: H,
) -> InProcess {
    let res = connect(url, id).await;
    let stop = CancellationToken::new();
    let s = stop.clone();
    let handle = tokio::spawn(async move {
        service::serve(res, name, h, s).await.expect("stage serves");
    });
    InProcess { stop, handle }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruned_and_quantized_artifact_has_the_accuracy_its_record_claims() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let pruner = start(&url, "p1", "lathe-pruner", lathe_pruner::Pruner).await;
    let quantizer = start(&url, "q1", "lathe-quantizer", lathe_quantizer::Quantizer).await;
    let spec =
        std::fs::read(proto_dir().join("examples/valid/digits-prune-quantize.json")).unwrap();
    let job = submit(&s.res, &spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(180)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let (train, quantize) = (&r.steps[0], &r.steps[2]);
    assert_eq!(quantize.stage, Stage::Quantize);
    let m = &quantize.metrics;
    assert_eq!(m["bits"], 8.0);
    let claimed = m["test_accuracy"];
    assert!(
        claimed >= train.metrics["test_accuracy"] - 0.01,
        "{claimed}"
    );
    // Pruned and quantized: far smaller than the dense float model.
    assert!(
        m["artifact_bytes"] * 8.0 < train.metrics["artifact_bytes"],
        "{} vs {}",
        m["artifact_bytes"],
        train.metrics["artifact_bytes"]
    );

    let reference = quantize.artifact.as_ref().expect("an artifact");
    let bytes = s.res.artifacts.get(reference).await.unwrap();
    assert_eq!(bytes.len() as f64, m["artifact_bytes"]);
    let artifact = Artifact::from_bytes(&bytes).unwrap();
    assert_eq!(artifact.lineage.last().unwrap().stage, "quantize");
    for layer in &artifact.layers {
        assert!(
            matches!(layer.weight, TensorData::QuantizedInt { bits: 8, .. }),
            "{}",
            layer.weight.kind()
        );
    }
    let engine = Engine::from_artifact(&artifact).unwrap();
    let (_, test) = data::builtin("digits").unwrap();
    let recomputed = evaluate(&engine, &test).accuracy;
    assert!(
        (recomputed - claimed).abs() < 1e-9,
        "recomputed {recomputed} vs recorded {claimed}"
    );
    trainer.stop().await;
    pruner.stop().await;
    quantizer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quantize_job_with_three_bits_is_rejected_at_intake() {
    let s = stack().await;
    let quantizer = start(
        &s.server.url(),
        "q1",
        "lathe-quantizer",
        lathe_quantizer::Quantizer,
    )
    .await;
    let spec = br#"{"name": "three", "dataset": {"source": "builtin:digits"},
        "pipeline": ["train", "quantize"], "quantize": {"bits": 3}}"#;
    let job = submit(&s.res, spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(30)).await;
    assert_eq!(r.state, JobState::Rejected);
    assert!(
        r.errors.iter().any(|e| e.field == "quantize.bits"),
        "{:?}",
        r.errors
    );
    quantizer.stop().await;
}
