//! The contract in `proto/` and the Rust types agree: schemas regenerate to the same files,
//! valid examples parse, every invalid example is refused with its documented message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lathe_proto::codec::Format;
use lathe_proto::{JobSpec, schema};

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto")
}

#[test]
fn schema_files_match_the_rust_types() {
    let dir = proto_dir().join("schemas");
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let generated = schema::all();
    let mut stale = Vec::new();
    for (name, text) in &generated {
        let path = dir.join(name);
        if update {
            std::fs::write(&path, text).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(on_disk) if on_disk == *text => {}
            Ok(_) => stale.push(format!("{name} differs from the Rust types")),
            Err(_) => stale.push(format!("{name} is missing")),
        }
    }
    let known: Vec<&str> = generated.iter().map(|(n, _)| *n).collect();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        if !known.contains(&name.as_str()) {
            stale.push(format!("{name} has no Rust type behind it"));
        }
    }
    assert!(
        stale.is_empty(),
        "proto/schemas is out of date ({}); run `UPDATE_SCHEMAS=1 cargo test -p lathe-proto --test contract` after a deliberate change",
        stale.join("; ")
    );
}

#[test]
fn valid_examples_are_accepted() {
    let dir = proto_dir().join("examples/valid");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => JobSpec::parse(text.as_bytes(), Format::Json),
            Some("toml") => JobSpec::parse_toml(&text),
            _ => continue,
        };
        if let Err(errs) = parsed {
            panic!("{} was refused: {errs:?}", path.display());
        }
        seen += 1;
    }
    assert!(
        seen >= 4,
        "expected at least 4 valid examples, found {seen}"
    );
}

#[test]
fn invalid_examples_are_refused_with_their_message() {
    let dir = proto_dir().join("examples/invalid");
    let expected: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert!(expected.len() >= 12, "at least 12 invalid examples");
    for (file, message) in &expected {
        let bytes = std::fs::read(dir.join(file))
            .unwrap_or_else(|_| panic!("{file} is listed but missing"));
        let errs = JobSpec::parse(&bytes, Format::Json).expect_err(file);
        let all: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            all.iter().any(|e| e.starts_with(message.as_str())),
            "{file}: expected an error starting with {message:?}, got {all:?}"
        );
    }
    // Every example file is listed, so none is left untested.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            name == "expected.json" || expected.contains_key(&name),
            "{name} has no expected message"
        );
    }
}

#[test]
fn a_spec_survives_msgpack_and_json() {
    let text = std::fs::read(proto_dir().join("examples/valid/csv-file.json")).unwrap();
    let spec = JobSpec::parse(&text, Format::Json).unwrap();
    let mp = lathe_proto::codec::to_msgpack(&spec);
    assert_eq!(JobSpec::parse(&mp, Format::MsgPack).unwrap(), spec);
    let js = lathe_proto::codec::to_json(&spec);
    assert_eq!(JobSpec::parse(&js, Format::Json).unwrap(), spec);
}

#[test]
fn several_bad_fields_are_all_named() {
    let spec = br#"{ "name": "", "dataset": { "source": "builtin:digits" },
        "train": { "epochs": 0, "batch_size": 0, "learning_rate": 0 } }"#;
    let errs = JobSpec::parse(spec, Format::Json).unwrap_err();
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "name",
            "train.epochs",
            "train.batch_size",
            "train.learning_rate"
        ]
    );
}

/// The example chain spec, parsed.
fn chain_spec() -> JobSpec {
    let text = std::fs::read(proto_dir().join("examples/valid/digits-chain.json")).unwrap();
    JobSpec::parse(&text, Format::Json).unwrap()
}

#[test]
fn a_nan_where_json_cannot_carry_one_is_refused_in_messagepack() {
    // JSON has no NaN, MessagePack does: fields that a spec may leave unused are still
    // checked, so no NaN rides along in a stored spec.
    let mut spec = chain_spec();
    spec.dataset.test_fraction = f64::NAN;
    spec.deploy.as_mut().unwrap().canary_percent = f64::NAN;
    spec.monitor.as_mut().unwrap().min_accuracy = Some(f64::NAN);
    let errs = JobSpec::parse(&lathe_proto::codec::to_msgpack(&spec), Format::MsgPack).unwrap_err();
    let all: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert_eq!(
        all,
        [
            "dataset.test_fraction: must be in [0, 0.5], got NaN",
            "deploy.canary_percent: must be in [0, 100], got NaN",
            "monitor.min_accuracy: must be a fraction in [0, 1], got NaN",
        ]
    );
}

fn task(spec: JobSpec, step: u32, stage: lathe_proto::Stage) -> lathe_proto::StageTask {
    lathe_proto::StageTask {
        schema_version: 1,
        job_id: lathe_proto::JobId::new(),
        step,
        stage,
        spec,
        input: None,
        accepted_at_ms: 0,
    }
}

#[test]
fn a_stage_task_is_checked_as_intake_checks_its_spec() {
    use lathe_proto::Stage;
    assert_eq!(task(chain_spec(), 3, Stage::Quantize).validate(), Ok(()));

    // The spec's errors are named under `spec.`, every one of them.
    let mut spec = chain_spec();
    spec.train.learning_rate = f64::NAN;
    spec.quantize.as_mut().unwrap().group_size = 0;
    let errs = task(spec, 3, Stage::Quantize).validate().unwrap_err();
    let all: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert_eq!(
        all,
        [
            "spec.train.learning_rate: must be in (0, 10], got NaN",
            "spec.quantize.group_size: must be at least 1",
        ]
    );

    // The step must name the task's stage in the pipeline.
    let errs = task(chain_spec(), 2, Stage::Quantize)
        .validate()
        .unwrap_err();
    assert_eq!(
        errs[0].to_string(),
        "step: step 2 of the pipeline is `prune`, not this task's `quantize`"
    );
    let errs = task(chain_spec(), 6, Stage::Monitor)
        .validate()
        .unwrap_err();
    assert_eq!(
        errs[0].to_string(),
        "step: step 6 is past the pipeline's 6 stages"
    );
    let mut newer = task(chain_spec(), 0, Stage::Train);
    newer.schema_version = 9;
    assert_eq!(
        newer.validate().unwrap_err()[0].to_string(),
        "schema_version: must be in 1..=1, got 9"
    );
}

#[test]
fn stage_parameters_are_bounded_as_training_is() {
    // Epochs as many as `train.epochs` allows, and as many student layers as `model.hidden`:
    // a u32 of epochs would hold a stage worker for good.
    let spec = br#"{ "name": "d", "dataset": { "source": "builtin:digits" },
        "pipeline": ["train", "distill", "prune"],
        "distill": { "epochs": 4000000000, "student_hidden": [8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8] },
        "prune": { "target_sparsity": 0.5, "finetune_epochs": 4000000000 } }"#;
    let errs = JobSpec::parse(spec, Format::Json).unwrap_err();
    let all: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert_eq!(
        all,
        [
            "distill.student_hidden: at most 16 hidden layers, got 17",
            "distill.epochs: must be in 1..=100000, got 4000000000",
            "prune.finetune_epochs: must be in 0..=100000, got 4000000000",
        ]
    );
}
