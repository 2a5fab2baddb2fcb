//! The pruner through real NATS: train → prune stores a sparse artifact whose recomputed
//! accuracy and sparsity match the job record; a corrupt input artifact fails the job
//! permanently; an out-of-range sparsity is refused at intake.

use std::time::Duration;

use lathe_model::artifact::{Artifact, TensorData};
use lathe_model::data;
use lathe_model::engine::Engine;
use lathe_model::eval::evaluate;
use lathe_proto::{JobState, Stage};
use lathe_runtime::service;
use lathe_tests::*;
use tokio_util::sync::CancellationToken;

/// A pruner replica running in this process until stopped.
async fn start_pruner(url: &str, id: &str) -> InProcess {
    let res = connect(url, id).await;
    let stop = CancellationToken::new();
    let s = stop.clone();
    let handle = tokio::spawn(async move {
        service::serve(res, "lathe-pruner", lathe_pruner::Pruner, s)
            .await
            .expect("pruner serves");
    });
    InProcess { stop, handle }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruned_artifact_has_the_accuracy_and_sparsity_its_record_claims() {
    let s = stack().await;
    let trainer = start_trainer(&s.server.url(), "t1").await;
    let pruner = start_pruner(&s.server.url(), "p1").await;
    let spec = std::fs::read(proto_dir().join("examples/valid/digits-prune.json")).unwrap();
    let job = submit(&s.res, &spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(180)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let (train, prune) = (&r.steps[0], &r.steps[1]);
    assert_eq!(prune.stage, Stage::Prune);
    let m = &prune.metrics;
    let claimed_accuracy = m["test_accuracy"];
    let claimed_sparsity = m["sparsity"];
    // The target, or a little more: hidden neurons left without a use are cut out with
    // their remaining weights.
    assert!(
        (0.919..0.94).contains(&claimed_sparsity),
        "sparsity {claimed_sparsity}"
    );
    // Within a point of the trained model (the bench holds the tighter figures).
    assert!(
        claimed_accuracy >= train.metrics["test_accuracy"] - 0.01,
        "pruned {claimed_accuracy} vs trained {}",
        train.metrics["test_accuracy"]
    );

    let reference = prune.artifact.as_ref().expect("a pruned artifact");
    let bytes = s.res.artifacts.get(reference).await.unwrap();
    assert_eq!(bytes.len() as f64, m["artifact_bytes"]);
    // Really smaller: the zeros are not stored.
    assert!(
        m["artifact_bytes"] < 0.2 * train.metrics["artifact_bytes"],
        "{} vs dense {}",
        m["artifact_bytes"],
        train.metrics["artifact_bytes"]
    );
    let artifact = Artifact::from_bytes(&bytes).unwrap();
    assert_eq!(artifact.lineage.last().unwrap().stage, "prune");
    assert!(
        artifact
            .layers
            .iter()
            .any(|l| matches!(l.weight, TensorData::SparseF32 { .. }))
    );
    let engine = Engine::from_artifact(&artifact).unwrap();
    let (_, test) = data::builtin("digits").unwrap();
    let recomputed = evaluate(&engine, &test).accuracy;
    assert!(
        (recomputed - claimed_accuracy).abs() < 1e-9,
        "recomputed {recomputed} vs recorded {claimed_accuracy}"
    );
    // Sparsity is over the trained model's weights; the pruned model may be narrower.
    let trained_ref = train.artifact.as_ref().expect("a trained artifact");
    let trained = Artifact::from_bytes(&s.res.artifacts.get(trained_ref).await.unwrap()).unwrap();
    let weights: usize = trained
        .layers
        .iter()
        .map(|l| l.weight.element_count())
        .sum();
    let nonzero: usize = artifact
        .layers
        .iter()
        .map(|l| l.weight.nonzero_count())
        .sum();
    let sparsity = 1.0 - nonzero as f64 / weights as f64;
    assert!(
        (sparsity - claimed_sparsity).abs() < 1e-9,
        "recomputed sparsity {sparsity} vs recorded {claimed_sparsity}"
    );
    for (i, (layer, before)) in artifact.layers.iter().zip(&trained.layers).enumerate() {
        let layer_sparsity =
            1.0 - layer.weight.nonzero_count() as f64 / before.weight.element_count() as f64;
        let recorded = m[&format!("sparsity.layer{i}")];
        assert!((layer_sparsity - recorded).abs() < 1e-9, "layer {i}");
    }
    let hidden = &artifact.mlp_config().hidden;
    assert!(
        hidden
            .iter()
            .zip(&trained.mlp_config().hidden)
            .all(|(a, b)| a <= b),
        "{hidden:?}"
    );
    trainer.stop().await;
    pruner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_job_with_sparsity_one_is_rejected_at_intake() {
    let s = stack().await;
    let pruner = start_pruner(&s.server.url(), "p1").await;
    let spec = br#"{"name": "all-gone", "dataset": {"source": "builtin:digits"},
        "pipeline": ["train", "prune"], "prune": {"target_sparsity": 1.0}}"#;
    let job = submit(&s.res, spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(30)).await;
    assert_eq!(r.state, JobState::Rejected);
    assert!(
        r.errors.iter().any(|e| e.field == "prune.target_sparsity"),
        "{:?}",
        r.errors
    );
    pruner.stop().await;
}
