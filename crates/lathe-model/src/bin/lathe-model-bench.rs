//! `lathe-model-bench`: lathe's side of the PyTorch peer comparison on the built-in digits
//! data — training time and accuracy of the 64-256-128-10 MLP, engine latency for one row and
//! for 1 000 rows, and the artifact's size. Prints a table and writes JSON (`--out`).
//!
//! Run it with `cargo run --release -p lathe-model --bin lathe-model-bench`; the figures
//! are only comparable with the peer's when both run on the same machine.

use std::error::Error;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use lathe_model::data::{builtin, split};
use lathe_model::engine::Engine;
use lathe_model::mlp::MlpConfig;
use lathe_model::train::{TrainConfig, train_mlp};

/// The PyTorch peer's fp32 state-dict file for the same network (bench/README.md).
const TORCH_STATE_DICT_BYTES: usize = 205_849;

/// What the user asked for on the command line.
struct Args {
    out: PathBuf,
    calls: usize,
    batch_reps: usize,
    epochs: usize,
    seeds: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        out: PathBuf::from("bench/results/model.json"),
        calls: 10_000,
        batch_reps: 200,
        epochs: 60,
        seeds: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => args.out = PathBuf::from(value()?),
            "--calls" => args.calls = parse_count("--calls", &value()?)?,
            "--batch-reps" => args.batch_reps = parse_count("--batch-reps", &value()?)?,
            "--epochs" => args.epochs = parse_count("--epochs", &value()?)?,
            "--seeds" => args.seeds = parse_count("--seeds", &value()?)? as u64,
            "-h" | "--help" => {
                return Err("usage: lathe-model-bench [--out PATH] [--calls N] [--batch-reps N] [--epochs N] [--seeds N]".into());
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(args)
}

fn parse_count(flag: &str, value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{flag} must be a positive integer, got {value:?}")),
    }
}

/// The value at quantile `q` of sorted samples.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let (train_file, test_file) = builtin("digits")?;
    let batch_rows: Vec<f32> = train_file.features[..1000 * train_file.n_features].to_vec();
    let splits = split(train_file, Some(test_file), 0.1, 0.0, 0)?;
    let model = MlpConfig::new(64, vec![256, 128], 10);
    let cfg = TrainConfig {
        epochs: args.epochs,
        ..TrainConfig::default()
    };

    // Seeds 0..N; the seed-0 model is the one timed below, as in the peer.
    let mut runs = Vec::new();
    for seed in 0..args.seeds {
        let cfg = TrainConfig {
            seed,
            ..cfg.clone()
        };
        let started = Instant::now();
        let outcome = train_mlp(&splits, &model, &cfg, &mut |_| {})?;
        runs.push((outcome, started.elapsed().as_secs_f64()));
    }
    let accuracies: Vec<f64> = runs.iter().map(|(o, _)| o.test.accuracy).collect();
    let train_seconds: Vec<f64> = runs.iter().map(|(o, _)| o.train_seconds).collect();
    let mean_accuracy = accuracies.iter().sum::<f64>() / accuracies.len() as f64;
    let (outcome, train_wall) = runs.swap_remove(0);
    // The peer always trains every epoch; this run does the same, for the time comparison.
    let full_cfg = TrainConfig {
        patience: None,
        ..cfg.clone()
    };
    let full = train_mlp(&splits, &model, &full_cfg, &mut |_| {})?;
    let bytes = outcome.artifact.to_bytes();
    let uncompressed_body = rmp_serde::to_vec_named(&outcome.artifact)?.len();
    let mut without_reference = outcome.artifact.clone();
    without_reference.reference = Default::default();
    let bytes_without_reference = without_reference.to_bytes().len();
    let engine = Engine::from_artifact(&outcome.artifact)?;

    // Single row: every call timed, rows cycled through the test set, after a warm-up.
    let test = &splits.test;
    for i in 0..1000 {
        black_box(engine.predict(test.row(i % test.rows()))?);
    }
    let mut single = Vec::with_capacity(args.calls);
    for i in 0..args.calls {
        let row = test.row(i % test.rows());
        let t = Instant::now();
        black_box(engine.predict(black_box(row))?);
        single.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let single_mean = single.iter().sum::<f64>() / single.len() as f64;
    single.sort_by(f64::total_cmp);

    // Batch of 1 000 raw rows (the first 1 000 training-file rows, as the peer uses).
    for _ in 0..10 {
        black_box(engine.logits_batch(&batch_rows, 1000)?);
    }
    let mut batch = Vec::with_capacity(args.batch_reps);
    for _ in 0..args.batch_reps {
        let t = Instant::now();
        black_box(engine.logits_batch(black_box(&batch_rows), 1000)?);
        batch.push(t.elapsed().as_secs_f64() * 1e3);
    }
    batch.sort_by(f64::total_cmp);
    let batch_median = quantile(&batch, 0.5);

    let report = serde_json::json!({
        "model": "digits 64-256-128-10",
        "threads_note": "training runs on burn flex (rayon pool; RAYON_NUM_THREADS below, unset = all cores); engine latency is one thread",
        "rayon_num_threads": std::env::var("RAYON_NUM_THREADS").ok(),
        "train": {
            "epochs_requested": cfg.epochs,
            "epochs_run": outcome.epochs.len(),
            "best_epoch": outcome.best_epoch,
            "batch_size": cfg.batch_size,
            "train_seconds": outcome.train_seconds,
            "wall_seconds_including_setup_and_eval": train_wall,
            "test_accuracy": outcome.test.accuracy,
            "validation_accuracy": outcome.validation.accuracy,
            "seeds": args.seeds,
            "test_accuracy_per_seed": accuracies,
            "test_accuracy_mean": mean_accuracy,
            "train_seconds_per_seed": train_seconds,
            "without_early_stopping": {
                "epochs_run": full.epochs.len(),
                "best_epoch": full.best_epoch,
                "train_seconds": full.train_seconds,
                "test_accuracy": full.test.accuracy,
            },
        },
        "engine": {
            "single_row": {
                "calls": args.calls,
                "p50_us": quantile(&single, 0.5),
                "p99_us": quantile(&single, 0.99),
                "mean_us": single_mean,
                "min_us": single[0],
            },
            "batch_1000": {
                "reps": args.batch_reps,
                "median_ms": batch_median,
                "samples_per_s": 1000.0 / (batch_median / 1e3),
            },
        },
        "artifact": {
            "bytes": bytes.len(),
            "param_count": outcome.artifact.param_count(),
            "param_bytes_fp32": outcome.artifact.param_count() * 4,
            "reference_features": outcome.artifact.drift_reference().features.len(),
            "reference_training_rows": outcome.artifact.drift_reference().rows,
            "msgpack_body_bytes_uncompressed": uncompressed_body,
            "bytes_without_reference_sample": bytes_without_reference,
            "torch_state_dict_bytes": TORCH_STATE_DICT_BYTES,
        },
    });

    let mut table = vec![
        (
            format!(
                "train, early stopping (ran {} of {} epochs), s",
                outcome.epochs.len(),
                cfg.epochs
            ),
            format!("{:.3}", outcome.train_seconds),
        ),
        (
            "test accuracy (seed 0)".to_string(),
            format!("{:.2} %", outcome.test.accuracy * 100.0),
        ),
        (
            format!("train, all {} epochs, s", cfg.epochs),
            format!("{:.3}", full.train_seconds),
        ),
        (
            format!("test accuracy after all {} epochs", cfg.epochs),
            format!("{:.2} %", full.test.accuracy * 100.0),
        ),
    ];
    if args.seeds > 1 {
        table.push((
            format!("test accuracy, mean of {} seeds", args.seeds),
            format!("{:.2} %", mean_accuracy * 100.0),
        ));
    }
    table.extend([
        (
            "single row p50 / p99, µs".to_string(),
            format!(
                "{:.2} / {:.2}",
                quantile(&single, 0.5),
                quantile(&single, 0.99)
            ),
        ),
        (
            "batch 1000 median, ms".to_string(),
            format!("{batch_median:.3}"),
        ),
        (
            format!("artifact bytes (torch state dict {TORCH_STATE_DICT_BYTES})"),
            bytes.len().to_string(),
        ),
    ]);
    println!("lathe-model-bench — digits MLP 64-256-128-10");
    for (what, value) in &table {
        println!("{what:<48} {value:>16}");
    }

    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("wrote {}", args.out.display());
    Ok(())
}
