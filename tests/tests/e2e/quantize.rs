//! The quantizer through real NATS: train → quantize and train → prune → quantize store
//! integer artifacts whose recomputed accuracy matches the record; `"auto"` records the bits
//! and granularity it chose, and the served layers quantize their inputs over the stored
//! calibrated ranges; int4 groups that restart at every row are stored as format version 3
//! and served from their codes; 3 bits are refused at intake.

use std::time::Duration;

use lathe_model::artifact::{Artifact, TensorData};
use lathe_model::data;
use lathe_model::engine::{Engine, runs_on_int8_kernels};
use lathe_model::eval::evaluate;
use lathe_proto::{JobState, Stage};
use lathe_tests::*;

/// The served engine's accuracy on the digits test split, recomputed from the stored
/// artifact, is the one its record claims.
fn assert_recorded_accuracy(engine: &Engine, claimed: f64) {
    let (_, test) = data::builtin("digits").unwrap();
    let recomputed = evaluate(engine, &test).accuracy;
    assert!(
        (recomputed - claimed).abs() < 1e-9,
        "recomputed {recomputed} vs recorded {claimed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruned_and_quantized_artifact_has_the_accuracy_its_record_claims() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let pruner = start_stage(&url, "p1", "lathe-pruner", lathe_pruner::Pruner).await;
    let quantizer = start_stage(&url, "q1", "lathe-quantizer", lathe_quantizer::Quantizer).await;
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
    assert_recorded_accuracy(&Engine::from_artifact(&artifact).unwrap(), claimed);
    trainer.stop().await;
    pruner.stop().await;
    quantizer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_quantize_job_records_its_choice_and_stores_the_calibrated_ranges() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let quantizer = start_stage(&url, "q1", "lathe-quantizer", lathe_quantizer::Quantizer).await;
    let spec = br#"{"name": "auto-int", "dataset": {"source": "builtin:digits"},
        "model": {"hidden": [64]}, "train": {"epochs": 20, "seed": 3},
        "pipeline": ["train", "quantize"], "quantize": {"bits": "auto"},
        "budget": {"max_accuracy_drop": 0.01}}"#;
    let job = submit(&s.res, spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let quantize = &r.steps[1];
    let details = quantize.details.as_ref().expect("quantize details");
    let bits = quantize.metrics["bits"];
    assert_eq!(details["bits"].as_f64(), Some(bits));
    // The search is recorded in the order tried; the last setting tried is the one kept.
    let search = details["auto_search"].as_array().expect("auto_search");
    let last = search.last().expect("auto tried a setting");
    assert_eq!(last["inside_budget"], true, "{search:?}");
    assert_eq!(last["bits"].as_f64(), Some(bits));
    assert_eq!(last["granularity"], details["granularity"]);
    assert_eq!(search[0]["bits"], 4);
    assert_eq!(search[0]["granularity"], "per_tensor");

    let reference = quantize.artifact.as_ref().expect("an artifact");
    let artifact = Artifact::from_bytes(&s.res.artifacts.get(reference).await.unwrap()).unwrap();
    let mut on_int8_kernels = 0;
    for layer in &artifact.layers {
        let TensorData::QuantizedInt { bits: stored, .. } = layer.weight else {
            panic!("not quantized: {}", layer.weight.kind());
        };
        assert_eq!(f64::from(stored), bits);
        // Static activations (the default): each layer the engine runs on integers carries
        // its calibrated input range, and only those.
        let int8 = runs_on_int8_kernels(&layer.weight);
        assert_eq!(layer.input_range.is_some(), int8);
        on_int8_kernels += usize::from(int8);
    }
    // Whatever the search kept (grouped scales included), every layer runs on integers.
    assert_eq!(on_int8_kernels, artifact.layers.len(), "{details}");
    assert_recorded_accuracy(
        &Engine::from_artifact(&artifact).unwrap(),
        quantize.metrics["test_accuracy"],
    );
    trainer.stop().await;
    quantizer.stop().await;
}

/// Groups of 32 on a hidden layer 50 wide restart at every row: the stored artifact is format
/// version 3, and every layer is served from its 4-bit codes with the accuracy the record
/// claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grouped_int4_job_stores_groups_per_row_and_is_served_from_its_codes() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let quantizer = start_stage(&url, "q1", "lathe-quantizer", lathe_quantizer::Quantizer).await;
    let spec = br#"{"name": "int4-groups", "dataset": {"source": "builtin:digits"},
        "model": {"hidden": [50]}, "train": {"epochs": 10, "seed": 4},
        "pipeline": ["train", "quantize"],
        "quantize": {"bits": 4, "granularity": "grouped", "group_size": 32,
                     "symmetric": false}}"#;
    let job = submit(&s.res, spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let quantize = &r.steps[1];
    let bytes = s
        .res
        .artifacts
        .get(quantize.artifact.as_ref().expect("an artifact"))
        .await
        .unwrap();
    assert_eq!(
        u16::from_le_bytes([bytes[8], bytes[9]]),
        3,
        "format version"
    );
    let artifact = Artifact::from_bytes(&bytes).unwrap();
    let row_groups: Vec<bool> = artifact
        .layers
        .iter()
        .map(|l| match l.weight {
            TensorData::QuantizedInt {
                bits: 4,
                group: 32,
                row_groups,
                ..
            } => row_groups,
            _ => panic!("not 4-bit groups of 32: {}", l.weight.kind()),
        })
        .collect();
    // 64 inputs split into groups of 32; 50 do not.
    assert_eq!(row_groups, [false, true]);
    let engine = Engine::from_artifact(&artifact).unwrap();
    assert_eq!(engine.int8_layers(), [true, true]);
    let claimed = quantize.metrics["test_accuracy"];
    assert_recorded_accuracy(&engine, claimed);
    assert!(claimed > 0.9, "{claimed}");
    trainer.stop().await;
    quantizer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quantize_job_with_three_bits_is_rejected_at_intake() {
    let s = stack().await;
    let quantizer = start_stage(
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
