//! `lathe-distill-bench`: distillation on the built-in digits data against students trained
//! from scratch and against the PyTorch peer's figures. For each seed it trains the teacher
//! 64-256-128-10, then the students 64-32-10 and 64-16-10 from scratch (labels only) and
//! distilled under every setting of a sweep (T, α, epochs, teacher-labelled mixup/noise),
//! all on the seed's own train/validation split. The setting each student size uses is
//! chosen by mean *validation* accuracy; test accuracy is only reported. Prints tables and
//! writes JSON (`--out`).
//!
//! Run it with `cargo run --release -p lathe-model --bin lathe-distill-bench`.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use lathe_model::data::{builtin, split};
use lathe_model::distill::{Augment, DistillConfig, distill_mlp};
use lathe_model::mlp::MlpConfig;
use lathe_model::train::{TrainConfig, train_mlp};
use serde::Serialize;

/// The PyTorch peer's best distillation per student width (bench/README.md), and its
/// from-scratch figure at the same epochs.
const PEER: &[(usize, f64, f64, usize)] = &[(32, 0.9750, 0.9744, 150), (16, 0.9700, 0.9644, 300)];

struct Args {
    out: PathBuf,
    seeds: u64,
    epochs: Vec<usize>,
    widths: Vec<usize>,
}

fn parse_list(flag: &str, value: &str) -> Result<Vec<usize>, String> {
    value
        .split(',')
        .map(|v| match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "{flag} takes positive integers separated by commas, got {value:?}"
            )),
        })
        .collect()
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        out: PathBuf::from("bench/results/distill.json"),
        seeds: 5,
        epochs: vec![60, 150],
        widths: vec![32, 16],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => args.out = PathBuf::from(value()?),
            "--seeds" => {
                args.seeds = parse_list("--seeds", &value()?)?[0] as u64;
            }
            "--epochs" => args.epochs = parse_list("--epochs", &value()?)?,
            "--widths" => args.widths = parse_list("--widths", &value()?)?,
            "-h" | "--help" => {
                return Err(
                    "usage: lathe-distill-bench [--out PATH] [--seeds N] [--epochs 60,150] [--widths 32,16]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(args)
}

/// One distillation setting of the sweep.
#[derive(Clone, Serialize)]
struct Setting {
    name: String,
    temperature: f64,
    alpha: f64,
    augment: Augment,
}

fn sweep() -> Vec<Setting> {
    let s = |name: &str, temperature: f64, alpha: f64, augment: Augment| Setting {
        name: name.into(),
        temperature,
        alpha,
        augment,
    };
    vec![
        s("T4 a0.7 (peer recipe)", 4.0, 0.7, Augment::None),
        s("T2 a0.5", 2.0, 0.5, Augment::None),
        s("T8 a0.9", 8.0, 0.9, Augment::None),
        s(
            "T4 a0.7 noise0.5x1",
            4.0,
            0.7,
            Augment::Noise {
                copies: 1,
                std: 0.5,
            },
        ),
        s("T4 a0.7 mixup x1", 4.0, 0.7, Augment::Mixup { copies: 1 }),
        s("T2 a0.7 mixup x1", 2.0, 0.7, Augment::Mixup { copies: 1 }),
        s("T4 a0.9 mixup x2", 4.0, 0.9, Augment::Mixup { copies: 2 }),
    ]
}

/// Per-seed figures of one row of the table.
#[derive(Default, Clone, Serialize)]
struct Row {
    validation: Vec<f64>,
    test: Vec<f64>,
    seconds: Vec<f64>,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn std(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let (train_file, test_file) = builtin("digits")?;
    let settings = sweep();
    // (width, epochs, name) -> per-seed figures; name "scratch" is labels only.
    let mut rows: BTreeMap<(usize, usize, String), Row> = BTreeMap::new();
    let mut teacher_test = Vec::new();
    // Artifact file bytes of each distilled student (seed 0, first setting and epochs).
    let mut student_bytes: BTreeMap<usize, usize> = BTreeMap::new();
    let total = Instant::now();
    for seed in 0..args.seeds {
        let splits = split(train_file.clone(), Some(test_file.clone()), 0.1, 0.0, seed)?;
        let teacher_cfg = TrainConfig {
            seed,
            patience: None,
            ..TrainConfig::default()
        };
        let teacher = train_mlp(
            &splits,
            &MlpConfig::new(64, vec![256, 128], 10),
            &teacher_cfg,
            &mut |_| {},
        )?;
        teacher_test.push(teacher.test.accuracy);
        eprintln!("seed {seed}: teacher test {:.4}", teacher.test.accuracy);
        for &width in &args.widths {
            let student = MlpConfig::new(64, vec![width], 10);
            for &epochs in &args.epochs {
                let cfg = TrainConfig {
                    epochs,
                    seed,
                    patience: None,
                    ..TrainConfig::default()
                };
                let started = Instant::now();
                let scratch = train_mlp(&splits, &student, &cfg, &mut |_| {})?;
                let row = rows.entry((width, epochs, "scratch".into())).or_default();
                row.validation.push(scratch.validation.accuracy);
                row.test.push(scratch.test.accuracy);
                row.seconds.push(started.elapsed().as_secs_f64());
                for setting in &settings {
                    let dcfg = DistillConfig {
                        temperature: setting.temperature,
                        alpha: setting.alpha,
                        epochs,
                        seed,
                        augment: setting.augment,
                        ..DistillConfig::default()
                    };
                    let started = Instant::now();
                    let out =
                        distill_mlp(&splits, &teacher.artifact, &student, &dcfg, &mut |_| {})?;
                    let row = rows
                        .entry((width, epochs, setting.name.clone()))
                        .or_default();
                    row.validation.push(out.validation.accuracy);
                    row.test.push(out.test.accuracy);
                    row.seconds.push(started.elapsed().as_secs_f64());
                    student_bytes
                        .entry(width)
                        .or_insert_with(|| out.artifact.to_bytes().len());
                }
                eprintln!(
                    "seed {seed}: 64-{width}-10 at {epochs} epochs done ({:.0} s so far)",
                    total.elapsed().as_secs_f64()
                );
            }
        }
    }

    println!(
        "\nDistillation on digits, {} seeds (teacher 64-256-128-10 test {:.2} % ± {:.2}); \
         validation decides, test is reported",
        args.seeds,
        100.0 * mean(&teacher_test),
        100.0 * std(&teacher_test)
    );
    println!("| student | epochs | setting | val % | test % (± std) | vs scratch | s / run |");
    println!("|---|---|---|---|---|---|---|");
    for ((width, epochs, name), row) in &rows {
        let scratch = mean(&rows[&(*width, *epochs, "scratch".to_string())].test);
        println!(
            "| 64-{width}-10 | {epochs} | {name} | {:.2} | {:.2} (± {:.2}) | {:+.2} | {:.1} |",
            100.0 * mean(&row.validation),
            100.0 * mean(&row.test),
            100.0 * std(&row.test),
            100.0 * (mean(&row.test) - scratch),
            mean(&row.seconds)
        );
    }

    // The distiller's own choice: the best mean validation accuracy over every distilled
    // setting and epoch count, per student width; the scratch student gets the same choice
    // over its epoch counts.
    println!(
        "\n| student | chosen on validation | distilled test % | scratch test % (its best-val epochs) | peer distilled | peer scratch |"
    );
    println!("|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for &width in &args.widths {
        let pick = |distilled: bool| {
            rows.iter()
                .filter(|((w, _, name), _)| *w == width && (name != "scratch") == distilled)
                .max_by(|a, b| {
                    mean(&a.1.validation)
                        .total_cmp(&mean(&b.1.validation))
                        // Ties go to the shorter run.
                        .then(b.0.1.cmp(&a.0.1))
                })
        };
        let (Some(d), Some(s)) = (pick(true), pick(false)) else {
            continue;
        };
        let peer = PEER.iter().find(|p| p.0 == width);
        println!(
            "| 64-{width}-10 | {} @ {} epochs | {:.2} (± {:.2}) | {:.2} @ {} epochs | {} | {} |",
            d.0.2,
            d.0.1,
            100.0 * mean(&d.1.test),
            100.0 * std(&d.1.test),
            100.0 * mean(&s.1.test),
            s.0.1,
            peer.map_or("-".into(), |p| format!("{:.2} @ {}", 100.0 * p.1, p.3)),
            peer.map_or("-".into(), |p| format!("{:.2}", 100.0 * p.2)),
        );
        summary.push(serde_json::json!({
            "student": format!("64-{width}-10"),
            "chosen_setting": d.0.2,
            "chosen_epochs": d.0.1,
            "distilled_test_mean": mean(&d.1.test),
            "distilled_test_per_seed": d.1.test,
            "scratch_epochs": s.0.1,
            "scratch_test_mean": mean(&s.1.test),
            "scratch_test_per_seed": s.1.test,
            "peer_distilled_best": peer.map(|p| p.1),
            "artifact_bytes": student_bytes.get(&width),
        }));
    }

    let table: Vec<serde_json::Value> = rows
        .iter()
        .map(|((width, epochs, name), row)| {
            serde_json::json!({
                "student": format!("64-{width}-10"),
                "parameters": MlpConfig::new(64, vec![*width], 10).param_count(),
                "epochs": epochs,
                "setting": name,
                "validation_mean": mean(&row.validation),
                "test_mean": mean(&row.test),
                "test_std": std(&row.test),
                "seconds_mean": mean(&row.seconds),
                "per_seed": row,
            })
        })
        .collect();
    let json = serde_json::json!({
        "seeds": args.seeds,
        "teacher_test_per_seed": teacher_test,
        "settings": settings,
        "rows": table,
        "summary": summary,
        "total_seconds": total.elapsed().as_secs_f64(),
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)?)?;
    println!("\nwrote {}", args.out.display());
    Ok(())
}
