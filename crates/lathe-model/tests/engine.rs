//! Engine tests on hand-checked weights: preprocessing folded into the first layer, ReLU,
//! softmax, the batch path agreeing with the single-row path, and request errors.

use lathe_model::artifact::{Artifact, LayerTensors, TensorData};
use lathe_model::data::Standardizer;
use lathe_model::engine::{Engine, EngineError};
use lathe_model::mlp::MlpConfig;

fn dense(shape: Vec<usize>, values: Vec<f32>) -> TensorData {
    TensorData::DenseF32 { shape, values }
}

/// 2 inputs → 2 hidden (ReLU) → 2 classes, with standardisation mean [1, 2], scale [2, 4].
fn tiny_engine() -> Engine {
    let layers = vec![
        LayerTensors {
            // hidden0 = x0 + 2 x1 + 0.5, hidden1 = -3 x0 - x1 - 0.5 (on standardised x)
            weight: dense(vec![2, 2], vec![1.0, 2.0, -3.0, -1.0]),
            bias: dense(vec![2], vec![0.5, -0.5]),
            input_range: None,
        },
        LayerTensors {
            // logit0 = h0 - h1, logit1 = 2 h1 + 1
            weight: dense(vec![2, 2], vec![1.0, -1.0, 0.0, 2.0]),
            bias: dense(vec![2], vec![0.0, 1.0]),
            input_range: None,
        },
    ];
    let artifact = Artifact::from_imported(
        MlpConfig::new(2, vec![2], 2),
        layers,
        Standardizer {
            mean: vec![1.0, 2.0],
            scale: vec![2.0, 4.0],
        },
        vec!["width".into(), "height".into()],
        vec!["small".into(), "large".into()],
    )
    .expect("valid artifact");
    Engine::from_artifact(&artifact).expect("loads")
}

#[test]
fn logits_fold_the_standardisation_and_apply_relu() {
    let engine = tiny_engine();
    assert_eq!(engine.n_features(), 2);
    assert_eq!(engine.class_labels(), ["small", "large"]);
    // x = [3, 6] standardises to [1, 1]: h = [3.5, relu(-4.5) = 0], logits = [3.5, 1].
    assert_eq!(engine.logits(&[3.0, 6.0]).expect("ok"), [3.5, 1.0]);
    // x = [-1, -2] standardises to [-1, -1]: h = [relu(-2.5) = 0, 3.5], logits = [-3.5, 8].
    assert_eq!(engine.logits(&[-1.0, -2.0]).expect("ok"), [-3.5, 8.0]);

    let p = engine.predict(&[3.0, 6.0]).expect("ok");
    assert_eq!(p.class, 0);
    let expected = 1.0 / (1.0 + (-2.5f32).exp());
    assert!((p.probabilities[0] - expected).abs() < 1e-6);
    assert!((p.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    assert_eq!(engine.predict(&[-1.0, -2.0]).expect("ok").class, 1);
}

#[test]
fn the_batch_path_matches_the_single_row_path() {
    let engine = tiny_engine();
    // 600 rows: more than one internal chunk, with a partial last chunk.
    let rows: Vec<f32> = (0..1200)
        .map(|i| ((i * 37) % 101) as f32 / 10.0 - 5.0)
        .collect();
    let batch = engine.predict_batch(&rows, 600).expect("ok");
    let logits = engine.logits_batch(&rows, 600).expect("ok");
    let classes = engine.classes_batch(&rows, 600).expect("ok");
    assert_eq!(batch.len(), 600);
    for (i, row) in rows.chunks(2).enumerate() {
        let single = engine.predict(row).expect("ok");
        assert_eq!(single.class, batch[i].class, "row {i}");
        assert_eq!(single.class, classes[i], "row {i}");
        for (a, b) in single.probabilities.iter().zip(&batch[i].probabilities) {
            assert!((a - b).abs() < 1e-6, "row {i}");
        }
        let single_logits = engine.logits(row).expect("ok");
        for (a, b) in single_logits.iter().zip(&logits[i * 2..i * 2 + 2]) {
            assert!((a - b).abs() < 1e-5, "row {i}: {a} vs {b}");
        }
    }
    assert!(
        engine
            .predict_batch(&[], 0)
            .expect("empty batch")
            .is_empty()
    );
}

#[test]
fn bad_requests_are_errors_naming_what_is_wrong() {
    let engine = tiny_engine();
    let cases: Vec<(Result<_, EngineError>, &str)> = vec![
        (
            engine.predict(&[1.0]).map(|_| ()),
            "expected 2 features, got 1",
        ),
        (
            engine.predict(&[1.0, 2.0, 3.0]).map(|_| ()),
            "expected 2 features, got 3",
        ),
        (
            engine.predict(&[]).map(|_| ()),
            "expected 2 features, got 0",
        ),
        (
            engine.predict(&[1.0, f32::NAN]).map(|_| ()),
            "row 0, feature 1 (height): NaN is not a finite number",
        ),
        (
            engine
                .predict_batch(&[1.0, 2.0, f32::INFINITY, 0.0], 2)
                .map(|_| ()),
            "row 1, feature 0 (width): inf is not a finite number",
        ),
        (
            engine.logits_batch(&[1.0, 2.0, 3.0], 2).map(|_| ()),
            "a batch of 2 rows of 2 features needs 4 values, got 3",
        ),
    ];
    for (result, expected) in cases {
        match result {
            Ok(()) => panic!("succeeded, expected {expected:?}"),
            Err(e) => assert!(e.to_string().contains(expected), "{e} vs {expected:?}"),
        }
    }
}

#[test]
fn the_engine_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
    let engine = std::sync::Arc::new(tiny_engine());
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || engine.predict(&[t as f32, 1.0]).expect("ok").class)
        })
        .collect();
    for handle in handles {
        assert!(handle.join().expect("thread") < 2);
    }
}
