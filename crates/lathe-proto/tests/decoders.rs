//! Property tests: no decoder panics on arbitrary or mutated bytes; it returns an error. Every
//! valid example spec, a stage task, a telemetry batch and a feedback message are mutated
//! (bit flips, byte overwrites, truncation, extension, deleted ranges) in JSON and
//! MessagePack; whatever a decoder accepts must survive a round trip through its encoder.

use std::path::PathBuf;

use lathe_proto::codec::{self, Format};
use lathe_proto::{
    ArtifactRef, Feedback, InferRequest, JobEvent, JobId, JobRecord, JobSpec, ModelName, StageTask,
    TelemetryBatch, TelemetryRecord,
};
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto/examples/valid")
}

/// Every valid example spec, as (file name, parsed spec); the TOML one is parsed from TOML.
fn valid_specs() -> Vec<(String, JobSpec)> {
    let mut out = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(examples_dir())
        .expect("proto/examples/valid exists")
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let spec = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => JobSpec::parse(text.as_bytes(), Format::Json),
            Some("toml") => JobSpec::parse_toml(&text),
            _ => continue,
        }
        .unwrap_or_else(|e| panic!("{name} is a valid example: {e:?}"));
        out.push((name, spec));
    }
    assert!(
        out.len() >= 8,
        "expected every valid example, found {}",
        out.len()
    );
    out
}

fn sample_task(spec: JobSpec) -> StageTask {
    StageTask {
        schema_version: 1,
        job_id: JobId::new(),
        step: spec.pipeline.len() as u32 - 1,
        stage: *spec.pipeline.last().unwrap(),
        spec,
        input: Some(ArtifactRef {
            bucket: "lathe-artifacts".into(),
            name: "job/0-train".into(),
            digest: "SHA-256=abc".into(),
            bytes: 1234,
        }),
        accepted_at_ms: 1_700_000_000_000,
    }
}

fn sample_telemetry() -> TelemetryBatch {
    let model: ModelName = "digits".parse().unwrap();
    let record = |i: u32, error: Option<&str>| TelemetryRecord {
        schema_version: 1,
        model: model.clone(),
        version: 3,
        at_ms: 1_700_000_000_000 + i as u64,
        request_id: Some(format!("req-{i}")),
        latency_us: 40 + i as u64,
        rows: 2,
        predicted: vec![i % 10, 7],
        error: error.map(str::to_string),
        sampled_inputs: vec![vec![0.0, 5.0, 13.5, -1.0]],
    };
    TelemetryBatch {
        schema_version: 1,
        model: model.clone(),
        replica: "host:1".into(),
        records: vec![record(0, None), record(1, Some("400: inputs: missing"))],
    }
}

#[test]
fn telemetry_with_a_non_finite_sampled_input_is_refused_naming_it() {
    // A MessagePack float64 too large for an f32 (a corrupted byte, as proptest found) decodes
    // to infinity; NaN is written directly.
    for bad in [f32::INFINITY, f32::NAN] {
        let mut batch = sample_telemetry();
        batch.records[1].sampled_inputs[0][3] = bad;
        let err = codec::from_msgpack::<TelemetryBatch>(&codec::to_msgpack(&batch))
            .expect_err("a non-finite sampled input was accepted")
            .to_string();
        assert!(
            err.contains("sampled_inputs[0][3]") && err.contains("not a finite number"),
            "{err}"
        );
    }
    let good = sample_telemetry();
    let back: TelemetryBatch = codec::from_msgpack(&codec::to_msgpack(&good)).unwrap();
    assert_eq!(back, good);
}

fn sample_feedback() -> Feedback {
    Feedback {
        schema_version: 1,
        request_id: "req-0".into(),
        labels: vec!["7".into(), "3".into()],
    }
}

/// One way of damaging a message.
#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(prop::sample::Index, u8),
    SetByte(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Extend(Vec<u8>),
    DeleteRange(prop::sample::Index, usize),
    Insert(prop::sample::Index, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
        (any::<prop::sample::Index>(), 1usize..16).prop_map(|(i, n)| Mutation::DeleteRange(i, n)),
        (
            any::<prop::sample::Index>(),
            proptest::collection::vec(any::<u8>(), 1..8)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        if let Mutation::Extend(extra) | Mutation::Insert(_, extra) = m {
            bytes.extend_from_slice(extra);
        }
        return;
    }
    match m {
        Mutation::FlipBit(i, bit) => {
            let at = i.index(bytes.len());
            bytes[at] ^= 1 << bit;
        }
        Mutation::SetByte(i, b) => {
            let at = i.index(bytes.len());
            bytes[at] = *b;
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        Mutation::Extend(extra) => bytes.extend_from_slice(extra),
        Mutation::DeleteRange(i, n) => {
            let at = i.index(bytes.len());
            let end = (at + n).min(bytes.len());
            bytes.drain(at..end);
        }
        Mutation::Insert(i, extra) => {
            let at = i.index(bytes.len() + 1);
            bytes.splice(at..at, extra.iter().copied());
        }
    }
}

/// Whatever a decoder accepted must encode and decode to the same value in both formats.
fn round_trips<T>(value: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let again: T = codec::from_msgpack(&codec::to_msgpack(value))
        .map_err(|e| TestCaseError::fail(format!("accepted value fails MessagePack: {e}")))?;
    prop_assert_eq!(&again, value);
    let again: T = codec::decode(&codec::to_json(value), Format::Json)
        .map_err(|e| TestCaseError::fail(format!("accepted value fails JSON: {e}")))?;
    prop_assert_eq!(&again, value);
    Ok(())
}

/// Decodes the damaged bytes; a strict prefix of a valid message must be refused, and
/// anything accepted must round-trip.
fn check_decoder<T>(
    original: &[u8],
    mutations: &[Mutation],
    decode: impl Fn(&[u8]) -> Option<T>,
) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    prop_assert!(
        decode(original).is_some(),
        "the unmutated message must decode"
    );
    let mut bytes = original.to_vec();
    for m in mutations {
        mutate(&mut bytes, m);
        // (A JSON file's trailing newline is not part of the value.)
        if bytes.len() < original.len()
            && original.starts_with(&bytes)
            && original[bytes.len()..]
                .iter()
                .any(|b| !b.is_ascii_whitespace())
        {
            prop_assert!(
                decode(&bytes).is_none(),
                "a strict prefix ({} of {} bytes) was accepted",
                bytes.len(),
                original.len()
            );
        }
        if let Some(value) = decode(&bytes) {
            round_trips(&value)?;
        }
    }
    Ok(())
}

fn spec_json(b: &[u8]) -> Option<JobSpec> {
    JobSpec::parse(b, Format::Json).ok()
}
fn spec_msgpack(b: &[u8]) -> Option<JobSpec> {
    JobSpec::parse(b, Format::MsgPack).ok()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        // Random bytes practically never form a valid message; whatever is accepted must
        // still round-trip.
        if let Ok(s) = JobSpec::parse(&bytes, Format::Json) { round_trips(&s)?; }
        if let Ok(s) = JobSpec::parse(&bytes, Format::MsgPack) { round_trips(&s)?; }
        if let Ok(t) = codec::from_msgpack::<StageTask>(&bytes)
            && t.validate().is_ok()
        {
            round_trips(&t)?;
        }
        let _ = codec::from_msgpack::<JobRecord>(&bytes);
        let _ = codec::from_msgpack::<JobEvent>(&bytes);
        let _ = codec::decode_any::<InferRequest>(&bytes, None);
        if let Ok(t) = codec::from_msgpack::<TelemetryBatch>(&bytes) { round_trips(&t)?; }
        if let Ok(f) = codec::decode_any::<Feedback>(&bytes, None) { round_trips(&f)?; }
        if let Ok(text) = std::str::from_utf8(&bytes) { let _ = JobSpec::parse_toml(text); }
    }
}

proptest! {
    // Each case checks every example (9 files × 2 encodings), so fewer cases suffice.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn mutated_example_specs_are_refused_or_round_trip(
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        for (name, spec) in valid_specs() {
            let json = std::fs::read(examples_dir().join(&name)).unwrap();
            if name.ends_with(".json") {
                check_decoder(&json, &mutations, spec_json)?;
            } else {
                let mut text = json.clone();
                for m in &mutations { mutate(&mut text, m); }
                if let Ok(s) = std::str::from_utf8(&text).map_err(|_| ()).and_then(|t| {
                    JobSpec::parse_toml(t).map_err(|_| ())
                }) {
                    round_trips(&s)?;
                }
            }
            check_decoder(&codec::to_json(&spec), &mutations, spec_json)?;
            check_decoder(&codec::to_msgpack(&spec), &mutations, spec_msgpack)?;
        }
    }

    #[test]
    fn mutated_stage_tasks_are_refused_or_round_trip(
        mutations in proptest::collection::vec(mutation(), 1..4),
        example in any::<prop::sample::Index>(),
    ) {
        let specs = valid_specs();
        let task = sample_task(specs[example.index(specs.len())].1.clone());
        // What a worker accepts: a task that decodes and passes `StageTask::validate`.
        check_decoder(&codec::to_msgpack(&task), &mutations, |b| {
            codec::from_msgpack::<StageTask>(b).ok().filter(|t| t.validate().is_ok())
        })?;
    }

    #[test]
    fn mutated_telemetry_and_feedback_are_refused_or_round_trip(
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        // The monitor reads telemetry as MessagePack and feedback as either encoding.
        check_decoder(&codec::to_msgpack(&sample_telemetry()), &mutations, |b| {
            codec::from_msgpack::<TelemetryBatch>(b).ok()
        })?;
        let feedback = sample_feedback();
        for bytes in [codec::to_msgpack(&feedback), codec::to_json(&feedback)] {
            check_decoder(&bytes, &mutations, |b| {
                codec::decode_any::<Feedback>(b, None).ok()
            })?;
        }
    }
}
