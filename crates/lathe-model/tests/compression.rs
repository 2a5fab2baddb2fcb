//! The compression figures the pruner and quantizer promise, on the digits MLP
//! 64-256-128-10 as the peer trains it (seeded, so the same build gives the same model):
//! gradual Taylor pruning to 95 % followed by per-channel int8 is at least 20 times smaller
//! than the dense float artifact within half a point of its test accuracy; per-channel int8
//! alone stays within 0.3 points and its engine holds about a quarter of the float weight
//! bytes. `just bench` prints the same runs with their timings beside the PyTorch peer.

use lathe_model::artifact::Artifact;
use lathe_model::data::{Splits, builtin, split};
use lathe_model::engine::Engine;
use lathe_model::mlp::MlpConfig;
use lathe_model::prune::{PruneConfig, Saliency, Scope, Structure, Target, prune_mlp};
use lathe_model::quantize::{Bits, Calibration, Granularity, QuantizeConfig, quantize_mlp};
use lathe_model::train::{TrainConfig, train_mlp};

fn dense() -> (Artifact, f64, Splits) {
    let (train, test) = builtin("digits").unwrap();
    let splits = split(train, Some(test), 0.1, 0.0, 0).unwrap();
    let trained = train_mlp(
        &splits,
        &MlpConfig::new(64, vec![256, 128], 10),
        &TrainConfig::default(),
        &mut |_| {},
    )
    .unwrap();
    (trained.artifact, trained.test.accuracy, splits)
}

fn int8_per_channel() -> QuantizeConfig {
    QuantizeConfig {
        bits: Bits::Eight,
        granularity: Granularity::PerChannel,
        symmetric: true,
        calibration: Calibration::Percentile(99.99),
        calibration_rows: 512,
        max_accuracy_drop: 0.005,
    }
}

#[test]
fn pruning_then_int8_is_twenty_times_smaller_within_half_a_point() {
    let (dense, accuracy, splits) = dense();
    let dense_bytes = dense.to_bytes().len();
    let pruned = prune_mlp(
        &dense,
        &splits,
        &PruneConfig {
            saliency: Saliency::Taylor,
            structure: Structure::Unstructured,
            scope: Scope::Global,
            target: Target::Fixed(0.95),
            steps: 8,
            finetune_epochs: 5,
            batch_size: 64,
            learning_rate: 1e-3,
            seed: 0,
            max_accuracy_drop: 0.005,
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(pruned.sparsity >= 0.95, "sparsity {}", pruned.sparsity);
    let q = quantize_mlp(&pruned.artifact, &splits, &int8_per_channel()).unwrap();
    let bytes = q.artifact.to_bytes();
    let times = dense_bytes as f64 / bytes.len() as f64;
    assert!(
        times >= 20.0,
        "{} B against {dense_bytes} B: {times:.1}× smaller",
        bytes.len()
    );
    assert!(
        q.test.accuracy >= accuracy - 0.005,
        "{} against {accuracy}",
        q.test.accuracy
    );
    // What was measured is what is stored: the file gives the same accuracy.
    let back = Artifact::from_bytes(&bytes).unwrap();
    let engine = Engine::from_artifact(&back).unwrap();
    assert_eq!(
        lathe_model::eval::evaluate(&engine, &splits.test).accuracy,
        q.test.accuracy
    );
    // The breakdown accounts for every byte; the weights (values, positions, scales) are
    // the largest share, though at this size no longer most of it.
    let parts = back.byte_breakdown();
    assert_eq!(parts.iter().map(|(_, n)| n).sum::<usize>(), bytes.len());
    let weights: usize = parts
        .iter()
        .filter(|(p, _)| p.contains("weight"))
        .map(|(_, n)| n)
        .sum();
    assert!(weights * 3 > bytes.len(), "{parts:?}");
    assert!(parts.iter().all(|(_, n)| *n > 0), "{parts:?}");
}

#[test]
fn int8_per_channel_keeps_the_accuracy_and_a_quarter_of_the_weight_memory() {
    let (dense, accuracy, splits) = dense();
    let q = quantize_mlp(&dense, &splits, &int8_per_channel()).unwrap();
    assert!(
        q.test.accuracy >= accuracy - 0.003,
        "{} against {accuracy}",
        q.test.accuracy
    );
    let float = Engine::from_artifact(&dense).unwrap();
    let int8 = Engine::from_artifact(&q.artifact).unwrap();
    let ratio = int8.resident_weight_bytes() as f64 / float.resident_weight_bytes() as f64;
    assert!((0.24..=0.30).contains(&ratio), "resident ratio {ratio}");
    // Less than a third of the float artifact (lathe's float artifact is itself
    // entropy-coded, about 15 % under raw f32).
    let share = q.artifact.to_bytes().len() as f64 / dense.to_bytes().len() as f64;
    assert!(share < 0.33, "int8 artifact is {share:.3} of the float one");
}
