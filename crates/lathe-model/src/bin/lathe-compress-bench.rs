//! `lathe-compress-bench`: lathe's pruning against the PyTorch peer's on the built-in digits
//! data — accuracy and artifact bytes at each sparsity (one-shot and gradual, magnitude and
//! Taylor saliency), structured pruning, `auto`, and engine latency of the 90 %-sparse model
//! against the dense one (single row and batch of 1 000, one thread, side by side).
//!
//! `cargo run --release -p lathe-model --bin lathe-compress-bench -- [--peer PATH] [--out PATH]`.
//! The peer's figures are read from `--peer` (default `../shared/bench/results.json`); when
//! that file is missing the figures recorded in its README are used, and the table says so.

use std::error::Error;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use lathe_model::artifact::Artifact;
use lathe_model::data::{Splits, builtin, split};
use lathe_model::engine::{Engine, KernelChoice, int8_kernel};
use lathe_model::mlp::MlpConfig;
use lathe_model::prune::{
    PruneConfig, PruneOutcome, Saliency, Scope, Structure, Target, prune_mlp,
};
use lathe_model::quantize::{
    Activations, Bits, Granularity, QuantizeConfig, quantize_mlp, rows_off_range,
};
use lathe_model::train::{TrainConfig, train_mlp};
use serde_json::{Value, json};

/// The peer's figures as recorded in the shared `bench/README.md`, for when its JSON is
/// not at hand: (sparsity, test accuracy after fine-tuning, saved bytes).
const README_PEER: &[(f64, f64, f64)] = &[(0.9, 0.9744, 206_037.0), (0.95, 0.8306, 206_037.0)];
const README_PEER_DENSE: (f64, f64) = (0.975, 205_849.0);

struct Args {
    out: PathBuf,
    peer: PathBuf,
    calls: usize,
    batch_reps: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        out: PathBuf::from("bench/results/compress.json"),
        peer: PathBuf::from("../shared/bench/results.json"),
        calls: 5_000,
        batch_reps: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => args.out = PathBuf::from(value()?),
            "--peer" => args.peer = PathBuf::from(value()?),
            "--calls" => args.calls = count("--calls", &value()?)?,
            "--batch-reps" => args.batch_reps = count("--batch-reps", &value()?)?,
            "-h" | "--help" => {
                return Err("usage: lathe-compress-bench [--peer PATH] [--out PATH] [--calls N] [--batch-reps N]".into());
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(args)
}

fn count(flag: &str, value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!(
            "{flag} must be a positive whole number, got {value:?}"
        )),
    }
}

/// The peer's pruning figures: per sparsity (accuracy, bytes), the dense ones, and where
/// they came from.
struct Peer {
    levels: Vec<(f64, f64, f64)>,
    dense: (f64, f64),
    source: String,
    latency: Option<Value>,
    /// Dynamic int8: (dense accuracy, bytes, pruned-90 accuracy, bytes).
    int8: Option<(f64, f64, f64, f64)>,
}

fn peer(path: &PathBuf) -> Peer {
    let parsed = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let from_json = parsed.as_ref().and_then(|d| {
        let digits = &d["datasets"]["digits"];
        let levels: Vec<(f64, f64, f64)> = digits["prune"]
            .as_object()?
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    k.parse().ok()?,
                    v["test_acc_after_finetune"]["mean"].as_f64()?,
                    v["state_dict_after_prune_remove_bytes"].as_f64()?,
                ))
            })
            .collect();
        let dense = (
            digits["teacher"]["test_acc"]["mean"].as_f64()?,
            digits["teacher"]["state_dict_file_bytes"].as_f64()?,
        );
        let q = &digits["quant_dynamic_int8"];
        let int8 = (|| {
            Some((
                q["teacher"]["test_acc"]["mean"].as_f64()?,
                q["teacher"]["state_dict_file_bytes"].as_f64()?,
                q["pruned90"]["test_acc"]["mean"].as_f64()?,
                q["pruned90"]["state_dict_file_bytes"].as_f64()?,
            ))
        })();
        Some((
            levels,
            dense,
            d["latency_digits"]["threads_1"].clone(),
            int8,
        ))
    });
    match from_json {
        Some((levels, dense, latency, int8)) => Peer {
            levels,
            dense,
            source: format!("{} (5 seeds, mean)", path.display()),
            latency: Some(latency),
            int8,
        },
        None => Peer {
            levels: README_PEER.to_vec(),
            dense: README_PEER_DENSE,
            source: format!(
                "{} not readable: figures recorded in the peer's README",
                path.display()
            ),
            latency: None,
            int8: Some((0.975, 56_931.0, 0.9706, 56_949.0)),
        },
    }
}

fn config(
    saliency: Saliency,
    structure: Structure,
    target: Target,
    steps: usize,
    epochs: usize,
) -> PruneConfig {
    PruneConfig {
        saliency,
        structure,
        scope: Scope::Global,
        target,
        steps,
        finetune_epochs: epochs,
        batch_size: 64,
        learning_rate: 1e-3,
        seed: 0,
        max_accuracy_drop: 0.005,
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Rounds the timings of engines compared with each other are split into: each round
/// times every engine in turn, so that a slow spell of a shared machine (seconds long)
/// falls on all of them instead of on whichever was being timed, and their ratios hold.
const ROUNDS: usize = 10;

/// (single-row p50 µs, batch-1000 median ms) of each engine, timed in [`ROUNDS`]
/// interleaved rounds of `calls / ROUNDS` single rows and `batch_reps / ROUNDS` batches.
fn time<const N: usize>(
    engines: [&Engine; N],
    splits: &Splits,
    batch: &[f32],
    args: &Args,
) -> Result<[(f64, f64); N], Box<dyn Error>> {
    let test = &splits.test;
    for engine in engines {
        for i in 0..1000 {
            black_box(engine.predict(test.row(i % test.rows()))?);
        }
        for _ in 0..5 {
            black_box(engine.logits_batch(batch, 1000)?);
        }
    }
    let mut single: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(args.calls));
    let mut times: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(args.batch_reps));
    for round in 0..ROUNDS {
        for (e, engine) in engines.iter().enumerate() {
            let calls = args.calls.div_ceil(ROUNDS);
            for i in round * calls..(round + 1) * calls {
                let row = test.row(i % test.rows());
                let t = Instant::now();
                black_box(engine.predict(black_box(row))?);
                single[e].push(t.elapsed().as_secs_f64() * 1e6);
            }
            for _ in 0..args.batch_reps.div_ceil(ROUNDS) {
                let t = Instant::now();
                black_box(engine.logits_batch(black_box(batch), 1000)?);
                times[e].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok(std::array::from_fn(|e| {
        single[e].sort_by(f64::total_cmp);
        times[e].sort_by(f64::total_cmp);
        (quantile(&single[e], 0.5), quantile(&times[e], 0.5))
    }))
}

fn row(label: &str, o: &PruneOutcome, dense_bytes: usize, base: f64, seconds: f64) -> Value {
    let bytes = o.artifact.to_bytes().len();
    json!({
        "run": label,
        "sparsity": o.sparsity,
        "layer_sparsity": o.layer_sparsity,
        "hidden": o.hidden_after,
        "test_accuracy": o.test.accuracy,
        "drop_points": (base - o.test.accuracy) * 100.0,
        "bytes": bytes,
        "bytes_share_of_dense": bytes as f64 / dense_bytes as f64,
        "seconds": seconds,
    })
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let peer = peer(&args.peer);
    let (train_file, test_file) = builtin("digits")?;
    let batch: Vec<f32> = train_file.features[..1000 * train_file.n_features].to_vec();
    let splits = split(train_file, Some(test_file), 0.1, 0.0, 0)?;
    let model = MlpConfig::new(64, vec![256, 128], 10);
    let trained = train_mlp(&splits, &model, &TrainConfig::default(), &mut |_| {})?;
    let dense: Artifact = trained.artifact;
    let dense_bytes = dense.to_bytes().len();
    let base = trained.test.accuracy;

    let mut rows = Vec::new();
    let mut kept: Option<PruneOutcome> = None;
    let mut kept95: Option<PruneOutcome> = None;
    let mut run = |label: String, cfg: PruneConfig| -> Result<PruneOutcome, Box<dyn Error>> {
        let t = Instant::now();
        let o = prune_mlp(&dense, &splits, &cfg, &mut |_| {})?;
        if cfg.target == Target::Auto {
            eprintln!(
                "auto: baseline validation {:.4}, steps {:?}",
                o.baseline_validation, o.steps
            );
        }
        let r = row(&label, &o, dense_bytes, base, t.elapsed().as_secs_f64());
        eprintln!("{r}");
        rows.push(r);
        Ok(o)
    };
    for s in [0.5, 0.8, 0.9, 0.92, 0.95] {
        let fixed = Target::Fixed(s);
        run(
            format!("{s:.2} one-shot magnitude, 10 ep"),
            config(Saliency::Magnitude, Structure::Unstructured, fixed, 1, 10),
        )?;
        run(
            format!("{s:.2} gradual magnitude, 8×5 ep"),
            config(Saliency::Magnitude, Structure::Unstructured, fixed, 8, 5),
        )?;
        let taylor = run(
            format!("{s:.2} gradual taylor, 8×5 ep"),
            config(Saliency::Taylor, Structure::Unstructured, fixed, 8, 5),
        )?;
        // The 90 % model is timed in the engine; the 95 % one is quantized below.
        if s == 0.9 {
            kept = Some(taylor);
        } else if s == 0.95 {
            kept95 = Some(taylor);
        }
    }
    run(
        "auto taylor (budget 0.5 pt)".into(),
        config(
            Saliency::Taylor,
            Structure::Unstructured,
            Target::Auto,
            1,
            5,
        ),
    )?;
    let kept_structured = run(
        "structured 0.50 neurons taylor".into(),
        config(
            Saliency::Taylor,
            Structure::Structured,
            Target::Fixed(0.5),
            8,
            5,
        ),
    )?;
    run(
        "structured 0.50 neurons magnitude".into(),
        config(
            Saliency::Magnitude,
            Structure::Structured,
            Target::Fixed(0.5),
            8,
            5,
        ),
    )?;
    run(
        "structured 0.75 neurons taylor".into(),
        config(
            Saliency::Taylor,
            Structure::Structured,
            Target::Fixed(0.75),
            8,
            5,
        ),
    )?;

    println!("lathe-compress-bench — digits MLP 64-256-128-10, seed 0");
    println!("peer: {}", peer.source);
    println!(
        "dense: lathe {:.2} % / {} B   peer {:.2} % / {:.0} B\n",
        base * 100.0,
        dense_bytes,
        peer.dense.0 * 100.0,
        peer.dense.1
    );
    println!(
        "{:<36} {:>8} {:>8} {:>7} {:>8} {:>6} | {:>8} {:>8}",
        "lathe run", "sparsity", "acc %", "Δ pt", "bytes", "%dense", "peer %", "peer B"
    );
    for r in &rows {
        let label = r["run"].as_str().unwrap_or_default();
        let level: Option<f64> = label.split(' ').next().and_then(|t| t.parse().ok());
        let p = level.and_then(|l| peer.levels.iter().find(|(s, _, _)| (s - l).abs() < 1e-9));
        let (pa, pb) = p.map_or(("—".to_string(), "—".to_string()), |(_, a, b)| {
            (format!("{:.2}", a * 100.0), format!("{b:.0}"))
        });
        println!(
            "{:<36} {:>8.3} {:>8.2} {:>7.2} {:>8} {:>6.1} | {:>8} {:>8}",
            label,
            r["sparsity"].as_f64().unwrap_or(0.0),
            r["test_accuracy"].as_f64().unwrap_or(0.0) * 100.0,
            r["drop_points"].as_f64().unwrap_or(0.0),
            r["bytes"],
            r["bytes_share_of_dense"].as_f64().unwrap_or(0.0) * 100.0,
            pa,
            pb
        );
    }

    let mut latency = json!(null);
    if let Some(pruned) = &kept {
        let dense_engine = Engine::from_artifact(&dense)?;
        let sparse_engine = Engine::from_artifact(&pruned.artifact)?;
        let forced_dense = Engine::with_kernels(&pruned.artifact, KernelChoice::DenseOnly)?;
        let structured = Engine::from_artifact(&kept_structured.artifact)?;
        let [(d1, db), (s1, sb), (f1, fb), (t1, tb)] = time(
            [&dense_engine, &sparse_engine, &forced_dense, &structured],
            &splits,
            &batch,
            &args,
        )?;
        println!(
            "\nengine, one thread (90 % gradual Taylor model; layers as run {:?}, sparse {:?})",
            sparse_engine.layer_shapes(),
            sparse_engine.sparse_layers()
        );
        println!("{:<40} {:>12} {:>14}", "", "row p50 µs", "batch 1000 ms");
        println!(
            "{:<40} {:>12.2} {:>14.3}",
            "dense model, dense kernels", d1, db
        );
        println!(
            "{:<40} {:>12.2} {:>14.3}",
            "90 % model, dense kernels", f1, fb
        );
        println!(
            "{:<40} {:>12.2} {:>14.3}",
            "90 % model, sparse kernels", s1, sb
        );
        println!(
            "{:<40} {:>12.2} {:>14.2}",
            "speed-up, sparse vs dense model (×)",
            d1 / s1,
            db / sb
        );
        println!(
            "{:<40} {:>12.3} {:>14.3}",
            "time ratio sparse/dense (< 1: faster)",
            s1 / d1,
            sb / db
        );
        println!(
            "{:<40} {:>12.2} {:>14.3}",
            "structured 50 % neurons model", t1, tb
        );
        println!(
            "{:<40} {:>12.2} {:>14.2}",
            "speed-up, structured vs dense model (×)",
            d1 / t1,
            db / tb
        );
        if let Some(l) = &peer.latency {
            println!(
                "{:<40} {:>12} {:>14}",
                "peer pruned90 fp32 eager (its machine)",
                l["pruned90_fp32"]["single_sample"]["p50_us"].to_string(),
                l["pruned90_fp32"]["batch_1000"]["median_ms"].to_string()
            );
        }
        let mut bare = pruned.artifact.clone();
        bare.reference = Default::default();
        let mut bare_dense = dense.clone();
        bare_dense.reference = Default::default();
        println!(
            "90 % artifact without the drift reference sample: {} B (dense without it: {} B)",
            bare.to_bytes().len(),
            bare_dense.to_bytes().len()
        );
        println!(
            "resident weight bytes: dense {} / sparse {}",
            dense_engine.resident_weight_bytes(),
            sparse_engine.resident_weight_bytes()
        );
        latency = json!({
            "dense_model": {"row_p50_us": d1, "batch_1000_ms": db, "resident_bytes": dense_engine.resident_weight_bytes()},
            "pruned90_dense_kernels": {"row_p50_us": f1, "batch_1000_ms": fb},
            "pruned90_sparse_kernels": {"row_p50_us": s1, "batch_1000_ms": sb, "resident_bytes": sparse_engine.resident_weight_bytes()},
            "speedup_row": d1 / s1,
            "speedup_batch_1000": db / sb,
            "time_ratio_sparse_over_dense_row": s1 / d1,
            "time_ratio_sparse_over_dense_batch_1000": sb / db,
            "pruned90_layer_shapes_as_run": sparse_engine.layer_shapes(),
            "structured50": json!({"row_p50_us": t1, "batch_1000_ms": tb}),
        });
    }
    // Quantization: the dense model and the 95 % gradual Taylor model of the table above.
    let pruned95 = kept95.ok_or("the 95 % gradual Taylor model was not pruned")?;
    // The job spec's defaults but for bits, granularity and symmetry.
    let qcfg = |bits, granularity, symmetric| QuantizeConfig {
        bits,
        granularity: Some(granularity),
        symmetric,
        ..QuantizeConfig::default()
    };
    let peer_int8 = peer.int8;
    println!(
        "\nquantization (scales bfloat16, biases floating point at half precision); peer dynamic int8: {}",
        peer_int8.map_or("—".into(), |(a, b, pa, pb)| format!(
            "dense {:.2} % / {b:.0} B, pruned 90 % + int8 {:.2} % / {pb:.0} B",
            a * 100.0,
            pa * 100.0
        ))
    );
    println!(
        "int8 engine: weights stay int8; each layer's input is rounded to u8 over its range \
         calibrated on 512 training rows (static; \"dynamic\": each row's own range); lossy: \
         the accuracies below are the int8 engine's own; kernel {}",
        int8_kernel()
    );
    println!(
        "{:<44} {:>5} {:>8} {:>7} {:>8} {:>7} {:>8}",
        "lathe run", "bits", "acc %", "Δ pt", "bytes", "%dense", "× dense"
    );
    let mut quant_rows = Vec::new();
    let mut int8_model = None;
    let mut dynamic_model = None;
    let mut grouped_model = None;
    let mut pruned_int8_model = None;
    let mut breakdowns = Vec::new();
    for (label, input, cfg) in [
        (
            "int8 per-channel symmetric",
            &dense,
            qcfg(Bits::Eight, Granularity::PerChannel, true),
        ),
        (
            "int8 per-channel symmetric, dynamic",
            &dense,
            QuantizeConfig {
                activations: Activations::Dynamic,
                ..qcfg(Bits::Eight, Granularity::PerChannel, true)
            },
        ),
        (
            "int8 per-channel asymmetric",
            &dense,
            qcfg(Bits::Eight, Granularity::PerChannel, false),
        ),
        (
            "int8 per-tensor symmetric",
            &dense,
            qcfg(Bits::Eight, Granularity::PerTensor, true),
        ),
        (
            "int4 per-channel symmetric",
            &dense,
            qcfg(Bits::Four, Granularity::PerChannel, true),
        ),
        (
            "int4 grouped 32 symmetric",
            &dense,
            qcfg(Bits::Four, Granularity::Grouped(32), true),
        ),
        (
            "int auto per-channel (bits searched)",
            &dense,
            qcfg(Bits::Auto, Granularity::PerChannel, true),
        ),
        (
            "int auto (bits and granularity searched)",
            &dense,
            QuantizeConfig {
                granularity: None,
                ..qcfg(Bits::Auto, Granularity::PerChannel, true)
            },
        ),
        (
            "pruned 90 % + int8 per-channel",
            &kept
                .as_ref()
                .ok_or("the 90 % gradual Taylor model was not pruned")?
                .artifact,
            qcfg(Bits::Eight, Granularity::PerChannel, true),
        ),
        (
            "pruned 95 % + int8 per-channel",
            &pruned95.artifact,
            qcfg(Bits::Eight, Granularity::PerChannel, true),
        ),
        (
            "pruned 95 % + int4 grouped 32",
            &pruned95.artifact,
            qcfg(Bits::Four, Granularity::Grouped(32), true),
        ),
    ] {
        let o = quantize_mlp(input, &splits, &cfg)?;
        let bytes = o.artifact.to_bytes().len();
        println!(
            "{:<44} {:>5} {:>8.2} {:>7.2} {:>8} {:>7.1} {:>8.1}",
            label,
            o.bits,
            o.test.accuracy * 100.0,
            (base - o.test.accuracy) * 100.0,
            bytes,
            bytes as f64 / dense_bytes as f64 * 100.0,
            dense_bytes as f64 / bytes as f64
        );
        for c in &o.search {
            println!(
                "    tried {}-bit {:<22} validation {:>6.2} % {}",
                c.bits,
                format!("{:?}", c.granularity),
                c.validation_accuracy * 100.0,
                if c.inside_budget {
                    "inside the budget: chosen"
                } else {
                    "outside the budget"
                }
            );
        }
        quant_rows.push(
            json!({"run": label, "bits": o.bits, "granularity": o.granularity,
            "auto_search": o.search, "test_accuracy": o.test.accuracy,
            "drop_points": (base - o.test.accuracy) * 100.0, "bytes": bytes,
            "bytes_share_of_dense": bytes as f64 / dense_bytes as f64,
            "times_smaller_than_dense": dense_bytes as f64 / bytes as f64,
            "max_weight_error": o.max_weight_error}),
        );
        if label == "pruned 90 % + int8 per-channel" {
            pruned_int8_model = Some(o.artifact.clone());
        }
        if label == "int8 per-channel symmetric" || label.starts_with("pruned 95 % + int8") {
            breakdowns.push((label, o.artifact.byte_breakdown()));
        }
        if label == "int8 per-channel symmetric" {
            int8_model = Some(o.artifact);
        } else if label == "int8 per-channel symmetric, dynamic" {
            dynamic_model = Some(o.artifact);
        } else if label == "int4 grouped 32 symmetric" {
            grouped_model = Some(o.artifact);
        }
    }
    for (label, parts) in &breakdowns {
        let total: usize = parts.iter().map(|(_, n)| n).sum();
        println!("\nwhere the bytes go: {label} ({total} B)");
        for (part, n) in parts {
            println!(
                "  {part:<40} {n:>8} {:>6.1} %",
                *n as f64 / total.max(1) as f64 * 100.0
            );
        }
    }
    // What lossless coding of the int8 codes can reach: their zeroth-order entropy. The
    // first run (int8 per-channel symmetric) is both `int8_model` and the first breakdown.
    if let (Some(q), Some((label, parts))) = (&int8_model, breakdowns.first()) {
        println!("\n{label}: the weight codes' entropy against what is stored");
        println!(
            "{:<10} {:>8} {:>16} {:>16}",
            "layer", "codes", "entropy bits", "stored bits"
        );
        for (i, (n, entropy)) in code_entropy_per_layer(q).iter().enumerate() {
            let name = format!("layer {i} weight values");
            let stored = parts
                .iter()
                .find(|(p, _)| *p == name)
                .map_or(0, |(_, b)| *b);
            println!(
                "{:<10} {:>8} {:>16.3} {:>16.3}",
                i,
                n,
                entropy,
                stored as f64 * 8.0 / *n.max(&1) as f64
            );
        }
    }
    // The int8 codes of this model are close to uniform (trained weights stay near their
    // uniform initialisation), so no lossless coder stores them in much under 8 bits while
    // the float artifact stores about 27 bits a weight. How the share moves when training
    // pulls the weights towards zero (Adam's L2 penalty), each model trained afresh:
    println!("\nint8 per-channel share of the float artifact against the training's weight decay");
    println!(
        "{:<14} {:>10} {:>12} {:>10} {:>12} {:>9}",
        "weight decay", "float acc %", "float bytes", "int8 acc %", "int8 bytes", "share %"
    );
    let mut decay_rows = Vec::new();
    for decay in [0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1] {
        // No decay is the default training: the dense model above.
        let (float_model, float_accuracy) = if decay == 0.0 {
            (dense.clone(), base)
        } else {
            let trained = train_mlp(
                &splits,
                &model,
                &TrainConfig {
                    weight_decay: decay,
                    ..TrainConfig::default()
                },
                &mut |_| {},
            )?;
            (trained.artifact, trained.test.accuracy)
        };
        let float_bytes = float_model.to_bytes().len();
        let o = quantize_mlp(
            &float_model,
            &splits,
            &qcfg(Bits::Eight, Granularity::PerChannel, true),
        )?;
        let int8_bytes = o.artifact.to_bytes().len();
        let share = int8_bytes as f64 / float_bytes as f64;
        println!(
            "{:<14} {:>10.2} {:>12} {:>10.2} {:>12} {:>9.1}",
            decay,
            float_accuracy * 100.0,
            float_bytes,
            o.test.accuracy * 100.0,
            int8_bytes,
            share * 100.0
        );
        decay_rows.push(
            json!({"weight_decay": decay, "float_test_accuracy": float_accuracy,
            "float_bytes": float_bytes, "int8_test_accuracy": o.test.accuracy,
            "int8_bytes": int8_bytes, "int8_share_of_float": share}),
        );
    }
    let breakdown_json: serde_json::Map<String, serde_json::Value> = breakdowns
        .iter()
        .map(|(label, parts)| {
            (
                label.to_string(),
                parts
                    .iter()
                    .map(|(p, n)| json!({"part": p, "bytes": n}))
                    .collect(),
            )
        })
        .collect();
    let mut quant_latency = json!(null);
    if let (Some(q), Some(d), Some(g)) = (&int8_model, &dynamic_model, &grouped_model) {
        let float_engine = Engine::from_artifact(&dense)?;
        let int8_engine = Engine::from_artifact(q)?;
        let dynamic_engine = Engine::from_artifact(d)?;
        let grouped_engine = Engine::from_artifact(g)?;
        let [(f1, fb), (q1, qb), (d1, db), (g1, gb)] = time(
            [
                &float_engine,
                &int8_engine,
                &dynamic_engine,
                &grouped_engine,
            ],
            &splits,
            &batch,
            &args,
        )?;
        let gr = grouped_engine.resident_weight_bytes();
        println!("\nengine, one thread: float vs int8 per-channel (same run)");
        println!(
            "{:<40} {:>12} {:>14} {:>14}",
            "", "row p50 µs", "batch 1000 ms", "weight bytes"
        );
        let (fr, qr, dr) = (
            float_engine.resident_weight_bytes(),
            int8_engine.resident_weight_bytes(),
            dynamic_engine.resident_weight_bytes(),
        );
        for (label, row, batch_ms, bytes) in [
            ("float", f1, fb, fr),
            ("int8, static activations", q1, qb, qr),
            ("int8, dynamic activations", d1, db, dr),
            ("int4 grouped 32", g1, gb, gr),
        ] {
            println!("{label:<40} {row:>12.2} {batch_ms:>14.3} {bytes:>14}");
        }
        for (label, row, batch_ms, bytes) in [
            ("ratio int8 static/float (< 1: better)", q1, qb, qr),
            ("ratio int8 dynamic/float", d1, db, dr),
            ("ratio int4 grouped 32/float", g1, gb, gr),
        ] {
            println!(
                "{label:<40} {:>12.3} {:>14.3} {:>14.3}",
                row / f1,
                batch_ms / fb,
                bytes as f64 / fr as f64
            );
        }
        println!(
            "int4 grouped 32 on the integer kernels (per layer): {:?}, codes two a byte: {:?}",
            grouped_engine.int8_layers(),
            grouped_engine.packed_layers()
        );
        let n_test = splits.test.rows();
        let classes = |e: &Engine| e.classes_batch(&splits.test.features, n_test);
        let float_classes = classes(&float_engine)?;
        let agree = |a: &[usize], b: &[usize]| a.iter().zip(b).filter(|(x, y)| x == y).count();
        let mut agreement = Vec::new();
        for (label, model, engine) in [("static", q, &int8_engine), ("dynamic", d, &dynamic_engine)]
        {
            let int8_classes = classes(engine)?;
            let dequantized_classes =
                classes(&Engine::with_kernels(model, KernelChoice::DenseOnly)?)?;
            let (agree_float, agree_dequantized) = (
                agree(&int8_classes, &float_classes),
                agree(&int8_classes, &dequantized_classes),
            );
            println!(
                "int8 engine ({label} activations), classes on the {n_test} test rows: same as \
                 the float model's on {agree_float}, as the dequantized model's (f32 \
                 activations) on {agree_dequantized}"
            );
            agreement.push(
                json!({"activations": label, "same_class_as_float": agree_float,
                "same_class_as_dequantized": agree_dequantized}),
            );
        }
        // How often the static engine quantizes a row over its own range instead.
        let off = rows_off_range(q, &splits.test);
        println!(
            "test rows off the calibrated range, quantized over their own (per layer): {}",
            off.iter()
                .map(|n| n.map_or("—".to_string(), |n| n.to_string()))
                .collect::<Vec<_>>()
                .join(" / ")
        );
        // The pruned model served from its integer codes against the same pruned model in
        // f32 on the sparse kernels (both compacted: dead neurons and unread features gone).
        let mut pruned_engines = json!(null);
        if let (Some(p8), Some(p32)) = (&pruned_int8_model, &kept) {
            let f32_engine = Engine::from_artifact(&p32.artifact)?;
            let int8_engine = Engine::from_artifact(p8)?;
            let [(s1, sb), (i1, ib)] = time([&f32_engine, &int8_engine], &splits, &batch, &args)?;
            let (sr, ir) = (
                f32_engine.resident_weight_bytes(),
                int8_engine.resident_weight_bytes(),
            );
            println!(
                "\nengine, one thread: 90 % pruned, f32 (sparse kernels) vs + int8 (integer \
                 kernels {:?}, batches on the sparse codes {:?}), layers as run {:?}",
                int8_engine.int8_layers(),
                int8_engine.sparse_layers(),
                int8_engine.layer_shapes()
            );
            println!(
                "{:<40} {:>12} {:>14} {:>14}",
                "", "row p50 µs", "batch 1000 ms", "weight bytes"
            );
            println!("{:<40} {s1:>12.2} {sb:>14.3} {sr:>14}", "90 % pruned, f32");
            println!(
                "{:<40} {i1:>12.2} {ib:>14.3} {ir:>14}",
                "90 % pruned + int8"
            );
            println!(
                "{:<40} {:>12.3} {:>14.3} {:>14.3}",
                "ratio int8/f32 (< 1: better)",
                i1 / s1,
                ib / sb,
                ir as f64 / sr as f64
            );
            pruned_engines = json!({
                "pruned90_f32": {"row_p50_us": s1, "batch_1000_ms": sb, "resident_bytes": sr},
                "pruned90_int8": {"row_p50_us": i1, "batch_1000_ms": ib, "resident_bytes": ir,
                    "int8_layers": int8_engine.int8_layers(), "sparse_batch_layers": int8_engine.sparse_layers(),
                    "layers_as_run": int8_engine.layer_shapes()}});
        }
        println!(
            "(Deep Compression reports 40× for prune + quantize + Huffman on LeNet-300-100; \
             the \"× dense\" column above is lathe's figure on this MLP, whole artifact)"
        );
        quant_latency = json!({"float": {"row_p50_us": f1, "batch_1000_ms": fb, "resident_bytes": fr},
            "int8": {"row_p50_us": q1, "batch_1000_ms": qb, "resident_bytes": qr},
            "int8_dynamic": {"row_p50_us": d1, "batch_1000_ms": db, "resident_bytes": dr},
            "int4_grouped32": {"row_p50_us": g1, "batch_1000_ms": gb, "resident_bytes": gr,
                "int8_layers": grouped_engine.int8_layers(), "packed_layers": grouped_engine.packed_layers()},
            "time_ratio_int8_over_float_row": q1 / f1,
            "time_ratio_int8_over_float_batch_1000": qb / fb,
            "resident_ratio_int8_over_float": qr as f64 / fr as f64,
            "time_ratio_int8_dynamic_over_float_row": d1 / f1,
            "time_ratio_int8_dynamic_over_float_batch_1000": db / fb,
            "int8_kernel": int8_kernel(),
            "test_rows": n_test,
            "int8_same_class_as_float": agreement[0]["same_class_as_float"],
            "int8_same_class_as_dequantized": agreement[0]["same_class_as_dequantized"],
            "agreement": agreement,
            "test_rows_off_calibrated_range_per_layer": off,
            "pruned": pruned_engines,
            "int8_activations": "u8 over calibrated ranges (static)"});
    }
    let report = json!({
        "quantize": quant_rows,
        "quantize_engine": quant_latency,
        "int8_share_by_weight_decay": decay_rows,
        "byte_breakdown": breakdown_json,
        "model": "digits 64-256-128-10, seed 0",
        "dense": {"test_accuracy": base, "bytes": dense_bytes},
        "peer": {"source": peer.source, "dense": peer.dense, "levels": peer.levels},
        "prune": rows,
        "engine": latency,
    });
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Per layer of a quantized model: how many codes its weight stores, and their zeroth-order
/// entropy in bits a code (the floor for coding them one at a time without context).
fn code_entropy_per_layer(artifact: &lathe_model::Artifact) -> Vec<(usize, f64)> {
    artifact
        .layers
        .iter()
        .filter_map(|l| match &l.weight {
            lathe_model::artifact::TensorData::QuantizedInt {
                bits,
                sparse,
                indices,
                data,
                ..
            } => {
                let n = if *sparse {
                    indices.len()
                } else {
                    l.weight.element_count()
                };
                let mut counts = [0usize; 256];
                for k in 0..n {
                    counts
                        [lathe_model::artifact::quantized_value(data, *bits, k) as u8 as usize] +=
                        1;
                }
                let entropy = counts
                    .iter()
                    .filter(|&&c| c > 0)
                    .map(|&c| {
                        let p = c as f64 / n as f64;
                        -p * p.log2()
                    })
                    .sum();
                Some((n, entropy))
            }
            _ => None,
        })
        .collect()
}
