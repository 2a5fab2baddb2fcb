//! Training tests on the real digits data: the peer's recipe reaches 97 % test accuracy,
//! the same seed gives the same model, the engine agrees with burn, and bad settings are
//! refused naming the field.

use std::sync::OnceLock;

use burn::prelude::*;
use lathe_model::artifact::Artifact;
use lathe_model::data::{Splits, builtin, split};
use lathe_model::engine::Engine;
use lathe_model::eval::{evaluate, try_evaluate};
use lathe_model::mlp::{Mlp, MlpConfig, device};
use lathe_model::train::{TrainConfig, TrainOutcome, train_mlp};

/// The digits splits: the train file with 10 % carved out for validation, and the test file.
fn digits_splits() -> Splits {
    let (train, test) = builtin("digits").expect("digits");
    split(train, Some(test), 0.1, 0.0, 0).expect("split")
}

fn teacher() -> MlpConfig {
    MlpConfig::new(64, vec![256, 128], 10)
}

/// One training with the defaults (60 epochs, batch 64, Adam 1e-3, seed 0, patience 10),
/// shared by the tests of this file.
fn trained() -> &'static (Splits, TrainOutcome) {
    static TRAINED: OnceLock<(Splits, TrainOutcome)> = OnceLock::new();
    TRAINED.get_or_init(|| {
        let splits = digits_splits();
        let mut seen = Vec::new();
        let outcome = train_mlp(&splits, &teacher(), &TrainConfig::default(), &mut |m| {
            seen.push(m.epoch)
        })
        .expect("trains");
        assert_eq!(
            seen,
            (1..=outcome.epochs.len()).collect::<Vec<_>>(),
            "on_epoch sees every epoch"
        );
        (splits, outcome)
    })
}

#[test]
fn the_digits_teacher_reaches_97_percent_test_accuracy() {
    let (splits, outcome) = trained();
    // 10 % of each class, rounded: 145 of the 1 437 training-file rows.
    assert_eq!(splits.validation.rows(), 145);
    assert!(
        outcome.test.accuracy >= 0.97,
        "test accuracy {:.4} is below 0.97",
        outcome.test.accuracy
    );
    assert!(
        outcome.validation.accuracy >= 0.95,
        "validation {:.4}",
        outcome.validation.accuracy
    );
    let last = outcome.epochs.last().expect("epochs ran");
    assert!(
        last.train_accuracy > 0.99,
        "train accuracy {}",
        last.train_accuracy
    );
    assert!(outcome.epochs.len() <= 60);
    assert!((1..=outcome.epochs.len()).contains(&outcome.best_epoch));
    // Early stopping: the best epoch has the best validation accuracy seen.
    let best_seen = outcome
        .epochs
        .iter()
        .map(|e| e.validation_accuracy)
        .fold(0.0, f64::max);
    assert_eq!(
        outcome.epochs[outcome.best_epoch - 1].validation_accuracy,
        best_seen
    );
    assert_eq!(outcome.test.confusion.iter().flatten().sum::<u32>(), 360);
    assert_eq!(
        outcome.artifact.metrics["test_accuracy"],
        outcome.test.accuracy
    );
    assert_eq!(outcome.artifact.lineage.len(), 1);
    assert_eq!(outcome.artifact.lineage[0].stage, "train");
    assert_eq!(
        outcome.artifact.lineage[0].params["train"]["batch_size"],
        64
    );
    assert_eq!(
        outcome.artifact.param_count(),
        64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    );
    let frequencies = &outcome.artifact.reference.predicted_class_frequencies;
    assert_eq!(outcome.artifact.reference.features.len(), 64);
    assert_eq!(
        outcome.artifact.drift_reference().rows,
        splits.train.rows() as u64
    );
    assert!((frequencies.iter().sum::<f64>() - 1.0).abs() < 1e-9);
}

#[test]
fn the_same_seed_gives_the_same_model() {
    let (splits, first) = trained();
    let second =
        train_mlp(splits, &teacher(), &TrainConfig::default(), &mut |_| {}).expect("trains");
    assert_eq!(second.test.accuracy, first.test.accuracy);
    assert_eq!(second.best_epoch, first.best_epoch);
    assert_eq!(
        second.artifact.layers, first.artifact.layers,
        "bit-identical weights"
    );
    let losses = |o: &TrainOutcome| o.epochs.iter().map(|e| e.train_loss).collect::<Vec<_>>();
    assert_eq!(losses(&second), losses(first));
}

#[test]
fn the_engine_predicts_what_burn_predicts() {
    let (splits, outcome) = trained();
    let artifact = &outcome.artifact;
    let device = device();
    let model =
        Mlp::from_layers(artifact.mlp_config(), &artifact.layers, &device).expect("rebuilds");
    let test = &splits.test;
    let standardised = artifact.preprocessing.transform(test);
    let input = Tensor::<2>::from_data(TensorData::new(standardised, [test.rows(), 64]), &device);
    let burn_classes: Vec<usize> = model
        .forward(input)
        .argmax(1)
        .into_data()
        .try_into_vec_as::<i64>()
        .expect("ints")
        .into_iter()
        .map(|c| c as usize)
        .collect();

    let engine = Engine::from_artifact(artifact).expect("loads");
    let engine_classes = engine
        .classes_batch(&test.features, test.rows())
        .expect("ok");
    assert_eq!(engine_classes, burn_classes);
    for (i, &burn_class) in burn_classes.iter().enumerate() {
        assert_eq!(
            engine.predict(test.row(i)).expect("ok").class,
            burn_class,
            "row {i}"
        );
    }
    // evaluate() gives the accuracy the training reported, also after a byte round trip.
    assert_eq!(evaluate(&engine, test).accuracy, outcome.test.accuracy);
    let reloaded = Artifact::from_bytes(&artifact.to_bytes()).expect("decodes");
    assert_eq!(&reloaded, artifact);
    let reloaded_engine = Engine::from_artifact(&reloaded).expect("loads");
    assert_eq!(
        try_evaluate(&reloaded_engine, test).expect("fits"),
        outcome.test
    );
    assert!(
        artifact.to_bytes().len() < 205_849,
        "smaller than PyTorch's state dict file"
    );
}

#[test]
fn bad_settings_are_refused_naming_the_field() {
    let splits = digits_splits();
    let base = TrainConfig::default();
    let cases: Vec<(TrainConfig, MlpConfig, &str)> = vec![
        (
            TrainConfig {
                epochs: 0,
                ..base.clone()
            },
            teacher(),
            "train.epochs must be at least 1, got 0",
        ),
        (
            TrainConfig {
                batch_size: 0,
                ..base.clone()
            },
            teacher(),
            "train.batch_size must be at least 1, got 0",
        ),
        (
            TrainConfig {
                learning_rate: -0.1,
                ..base.clone()
            },
            teacher(),
            "train.learning_rate must be a positive finite number, got -0.1",
        ),
        (
            TrainConfig {
                learning_rate: f64::NAN,
                ..base.clone()
            },
            teacher(),
            "train.learning_rate must be a positive finite number, got NaN",
        ),
        (
            TrainConfig {
                weight_decay: -1.0,
                ..base.clone()
            },
            teacher(),
            "train.weight_decay must be a finite number >= 0, got -1",
        ),
        (
            TrainConfig {
                patience: Some(0),
                ..base.clone()
            },
            teacher(),
            "train.patience must be at least 1 when set, got 0",
        ),
        (
            base.clone(),
            MlpConfig::new(63, vec![8], 10),
            "model.input is 63 but the data has 64",
        ),
        (
            base.clone(),
            MlpConfig::new(64, vec![8], 3),
            "model.classes is 3 but the data has 10",
        ),
        (
            base.clone(),
            MlpConfig::new(64, vec![8, 0], 10),
            "model: hidden[1] must be at least 1, got 0",
        ),
    ];
    for (cfg, model, expected) in cases {
        let message = train_mlp(&splits, &model, &cfg, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert_eq!(message, expected);
    }
    let mut no_validation = digits_splits();
    no_validation.validation = no_validation.validation.subset(&[]);
    let message = train_mlp(&no_validation, &teacher(), &base, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "train.patience needs a validation split, but it is empty"
    );
}

#[test]
fn without_patience_every_epoch_runs_and_a_tiny_model_still_learns() {
    let splits = digits_splits();
    let cfg = TrainConfig {
        epochs: 5,
        patience: None,
        seed: 3,
        ..TrainConfig::default()
    };
    let outcome = train_mlp(
        &splits,
        &MlpConfig::new(64, vec![16], 10),
        &cfg,
        &mut |_| {},
    )
    .expect("trains");
    assert_eq!(outcome.epochs.len(), 5);
    assert!(
        outcome.test.accuracy > 0.8,
        "test accuracy {}",
        outcome.test.accuracy
    );
    let json = serde_json::to_string(&cfg).expect("serializes");
    assert_eq!(
        serde_json::from_str::<TrainConfig>(&json).expect("deserializes"),
        cfg
    );
    let partial: TrainConfig = serde_json::from_str(r#"{"epochs": 3}"#).expect("defaults fill in");
    assert_eq!(
        partial,
        TrainConfig {
            epochs: 3,
            ..TrainConfig::default()
        }
    );
}
