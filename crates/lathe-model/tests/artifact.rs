//! Artifact format tests: exact round trips, every kind of damaged file, validation of
//! inconsistent artifacts, and a property test that decoding never panics.

use std::collections::BTreeMap;

use lathe_model::artifact::{
    Artifact, ArtifactError, DriftReference, FORMAT_VERSION, InputRange, LayerTensors, TensorData,
    digest_hex,
};
use lathe_model::data::Standardizer;
use lathe_model::engine::Engine;
use lathe_model::mlp::MlpConfig;
use lathe_model::quantize::quantize_tensor;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A dense layer of the given size.
fn layer(n_in: usize, n_out: usize, seed: u64) -> LayerTensors {
    LayerTensors {
        weight: TensorData::DenseF32 {
            shape: vec![n_out, n_in],
            values: values(n_in * n_out, seed),
        },
        bias: TensorData::DenseF32 {
            shape: vec![n_out],
            values: values(n_out, seed + 100),
        },
        input_range: None,
    }
}

/// A small but complete artifact: 6-5-4-3 with a reference sample, lineage and metrics.
fn sample_artifact() -> Artifact {
    let config = MlpConfig::new(6, vec![5, 4], 3);
    let layers = vec![layer(6, 5, 1), layer(5, 4, 2), layer(4, 3, 3)];
    let standardizer = Standardizer {
        mean: vec![0.5, 1.0, -2.0, 0.0, 3.0, 7.5],
        scale: vec![1.0, 2.0, 0.5, 1.0, 4.0, 1.5],
    };
    let mut artifact = Artifact::from_imported(
        config,
        layers,
        standardizer,
        (0..6).map(|i| format!("f{i}")).collect(),
        vec!["a".into(), "b".into(), "c".into()],
    )
    .expect("consistent artifact");
    let rows: Vec<f32> = (0..10)
        .flat_map(|r| values(6, 50 + r).into_iter().map(|v| v * 100.0))
        .collect();
    artifact.reference = DriftReference::from_rows(&rows, 6, vec![0.5, 0.25, 0.25]);
    artifact.push_lineage(
        "train",
        serde_json::json!({"epochs": 3, "lr": 0.001, "nested": {"list": [1, 2.5, "x", null]}}),
        BTreeMap::from([("test_accuracy".to_string(), 0.975)]),
    );
    artifact.metrics.insert("test_accuracy".into(), 0.975);
    artifact
}

/// The artifact encoded with an uncompressed (encoding 0) body, which the writer would
/// only choose when zstd does not help.
fn plain_bytes(artifact: &Artifact) -> Vec<u8> {
    let body = rmp_serde::to_vec_named(artifact).expect("serializes");
    let mut bytes = b"LATHEART".to_vec();
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.push(0);
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&body);
    reseal_digest_only(bytes)
}

/// Appends the SHA-256 of `bytes`.
fn reseal_digest_only(mut bytes: Vec<u8>) -> Vec<u8> {
    let digest = Sha256::digest(&bytes);
    bytes.extend_from_slice(&digest);
    bytes
}

/// Recomputes the length field and the digest after the body was changed, so the decoder
/// reaches the body parser.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.truncate(bytes.len().saturating_sub(32));
    if bytes.len() >= 19 {
        let body_len = (bytes.len() - 19) as u64;
        bytes[11..19].copy_from_slice(&body_len.to_le_bytes());
    }
    let digest = Sha256::digest(&bytes);
    bytes.extend_from_slice(&digest);
    bytes
}

#[test]
fn an_artifact_round_trips_exactly() {
    let artifact = sample_artifact();
    let bytes = artifact.to_bytes();
    assert_eq!(&bytes[..8], b"LATHEART");
    // A float artifact needs nothing newer than version 2.
    assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 2);
    let back = Artifact::from_bytes(&bytes).expect("decodes");
    assert_eq!(back, artifact);
    assert_eq!(back.to_bytes(), bytes, "encoding is deterministic");
    assert_eq!(back.param_count(), 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3);
    assert_eq!(
        back.lineage
            .iter()
            .map(|l| l.stage.as_str())
            .collect::<Vec<_>>(),
        ["import", "train"]
    );
    assert_eq!(back.lineage[1].params["nested"]["list"][1], 2.5);
    // Both body encodings decode to the same artifact.
    assert_eq!(bytes[10], 1, "this artifact compresses");
    assert_eq!(
        Artifact::from_bytes(&plain_bytes(&artifact)).expect("decodes"),
        artifact
    );
}

#[test]
fn the_drift_reference_keeps_quantile_bins_per_feature() {
    let artifact = sample_artifact();
    let reference = artifact.drift_reference();
    assert_eq!(reference.rows, 10);
    assert_eq!(reference.features.len(), 6);
    for profile in &reference.features {
        // Ten distinct values: up to ten edges (two may share a bfloat16), one bin more,
        // the last one empty (edges are rounded up, so the largest value is at or below
        // the last edge).
        assert!((8..=10).contains(&profile.edges.len()), "{profile:?}");
        assert_eq!(profile.proportions.len(), profile.edges.len() + 1);
        assert_eq!(profile.proportions.last(), Some(&0.0));
        let total: f32 = profile.proportions.iter().sum();
        assert!((total - 1.0).abs() < 1e-4);
    }
    let back = Artifact::from_bytes(&artifact.to_bytes()).unwrap();
    assert_eq!(back.drift_reference(), reference);
}

#[test]
fn digest_hex_is_sha256() {
    assert_eq!(
        digest_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

/// Checks that `bytes` fails to decode with a message containing `expected`.
fn check_decode_error(bytes: &[u8], expected: &str) {
    match Artifact::from_bytes(bytes) {
        Ok(_) => panic!("decoded, but should fail with {expected:?}"),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(expected),
                "{message:?} does not contain {expected:?}"
            );
        }
    }
}

#[test]
fn damaged_artifacts_are_rejected_with_distinct_errors() {
    let bytes = sample_artifact().to_bytes();
    let len = bytes.len();

    check_decode_error(
        &bytes[..len - 10],
        &format!(
            "artifact is truncated: {len} bytes expected, {} present",
            len - 10
        ),
    );
    check_decode_error(&bytes[..12], "artifact is truncated");
    check_decode_error(&bytes[..4], "artifact is truncated");
    check_decode_error(b"", "artifact is truncated");

    let mut flipped = bytes.clone();
    flipped[len / 2] ^= 0x01;
    check_decode_error(&flipped, "artifact is corrupted: its SHA-256 is");
    assert!(matches!(
        Artifact::from_bytes(&flipped),
        Err(ArtifactError::DigestMismatch { .. })
    ));
    let mut bad_digest = bytes.clone();
    bad_digest[len - 1] ^= 0x80;
    check_decode_error(&bad_digest, "artifact is corrupted");

    let mut wrong_magic = bytes.clone();
    wrong_magic[0] = b'X';
    check_decode_error(&wrong_magic, "not a lathe artifact");
    check_decode_error(b"PK\x03\x04 a zip file", "not a lathe artifact");
    check_decode_error(b"{\"json\": true}", "not a lathe artifact");

    let mut newer = bytes.clone();
    newer[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    check_decode_error(
        &newer,
        &format!(
            "artifact format version {} is newer than this build supports ({FORMAT_VERSION})",
            FORMAT_VERSION + 1
        ),
    );
    let mut zero = bytes.clone();
    zero[8..10].copy_from_slice(&0u16.to_le_bytes());
    check_decode_error(&zero, "artifact format version 0 is not a valid version");

    let mut trailing = bytes.clone();
    trailing.extend_from_slice(b"extra");
    check_decode_error(
        &trailing,
        "artifact has 5 unexpected bytes after its digest",
    );

    let mut encoding = bytes.clone();
    encoding[10] = 7;
    check_decode_error(&reseal(encoding), "artifact body encoding 7 is unknown");

    let mut garbage = bytes[..19].to_vec();
    garbage.extend_from_slice(b"this is not zstd");
    garbage.extend_from_slice(&[0; 32]);
    check_decode_error(&reseal(garbage), "artifact body is malformed");
}

/// Checks that `artifact` fails validation with a message containing `expected`.
fn check_invalid(artifact: Artifact, expected: &str) {
    let message = artifact.validate().unwrap_err().to_string();
    assert!(
        message.contains(expected),
        "{message:?} does not contain {expected:?}"
    );
    // The same inconsistency is caught when the bytes are read back.
    let message = Artifact::from_bytes(&artifact.to_bytes())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(expected),
        "{message:?} does not contain {expected:?}"
    );
}

#[test]
fn inconsistent_artifacts_are_rejected_naming_the_field() {
    let mut a = sample_artifact();
    a.layers[1] = layer(6, 4, 9);
    check_invalid(
        a,
        "artifact field layers[1].weight is invalid: shape [4, 6] does not chain: expected [4, 5]",
    );

    let mut a = sample_artifact();
    a.layers[2].bias = TensorData::DenseF32 {
        shape: vec![2],
        values: vec![0.0, 1.0],
    };
    check_invalid(
        a,
        "layers[2].bias is invalid: shape [2] does not match the layer's 3 outputs",
    );

    let mut a = sample_artifact();
    a.layers[0].bias = TensorData::DenseF32 {
        shape: vec![5],
        values: vec![0.0; 4],
    };
    check_invalid(
        a,
        "layers[0].bias is invalid: shape [5] needs 5 values, 4 stored",
    );

    let mut a = sample_artifact();
    a.layers.pop();
    check_invalid(a, "the architecture has 3 linear layers but 2 are stored");

    // A calibrated input range must be finite and ordered; a valid one survives the bytes.
    let mut a = sample_artifact();
    a.layers[1].input_range = Some(InputRange {
        min: -0.5,
        max: 2.25,
    });
    assert_eq!(Artifact::from_bytes(&a.to_bytes()).unwrap(), a);
    a.layers[1].input_range = Some(InputRange { min: 3.0, max: 1.0 });
    check_invalid(
        a.clone(),
        "layers[1].input_range is invalid: [3, 1] is not a finite range with min <= max",
    );
    a.layers[1].input_range = Some(InputRange {
        min: 0.0,
        max: f32::NAN,
    });
    check_invalid(
        a,
        "layers[1].input_range is invalid: [0, NaN] is not a finite range",
    );

    let mut a = sample_artifact();
    a.preprocessing.mean.pop();
    check_invalid(
        a,
        "field preprocessing is invalid: 5 means and 6 scales for 6 input features",
    );

    let mut a = sample_artifact();
    a.preprocessing.scale[3] = 0.0;
    check_invalid(
        a,
        "preprocessing.scale[3] is invalid: 0 is not a positive finite number",
    );

    let mut a = sample_artifact();
    a.class_labels.pop();
    check_invalid(a, "class_labels is invalid: 2 labels for 3 classes");

    let mut a = sample_artifact();
    a.feature_names.push("extra".into());
    check_invalid(a, "feature_names is invalid: 7 names for 6 input features");

    let mut a = sample_artifact();
    a.reference.features[4].proportions[0] += 0.25;
    let share = a.reference.features[4].proportions[0];
    check_invalid(
        a,
        "reference.features[4] is invalid: shares sum to 1.2500, not 1",
    );
    assert!(share <= 1.0, "the damaged share still fits the stored form");

    // The stored form has one share more than edges by construction, so this one is
    // caught by validation before writing and cannot be read back either.
    let mut a = sample_artifact();
    let edges = a.reference.features[4].edges.len();
    a.reference.features[4].proportions.pop();
    let message = a.validate().unwrap_err().to_string();
    assert!(
        message.contains(&format!(
            "reference.features[4] is invalid: {edges} shares for {edges} edges (need one more)"
        )),
        "{message}"
    );
    assert!(Artifact::from_bytes(&a.to_bytes()).is_err());

    let mut a = sample_artifact();
    a.reference.features.pop();
    check_invalid(
        a,
        "reference.features is invalid: 5 feature profiles for 6 input features",
    );

    let mut a = sample_artifact();
    let TensorData::DenseF32 { values, .. } = &mut a.layers[0].weight else {
        panic!("the sample artifact's layers are dense");
    };
    values[7] = f32::NAN;
    check_invalid(a, "layers[0].weight is invalid: value 7 is not finite");
}

#[test]
fn from_imported_checks_the_shapes() {
    let error = Artifact::from_imported(
        MlpConfig::new(3, vec![], 2),
        vec![layer(4, 2, 1)],
        Standardizer {
            mean: vec![0.0; 3],
            scale: vec![1.0; 3],
        },
        vec!["a".into(), "b".into(), "c".into()],
        vec!["x".into(), "y".into()],
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "artifact field layers[0].weight is invalid: shape [2, 4] does not chain: expected [2, 3]"
    );
}

/// The sample artifact in every storage the stages write: dense f32 (trainer, distiller),
/// sparse f32 (pruner), int8 per channel, int4 grouped with zero points, and sparse int8
/// (quantizer after the pruner), each encoded by the real writer.
fn written_artifacts() -> Vec<(&'static str, Artifact)> {
    let dense = sample_artifact();
    let convert = |f: &dyn Fn(&[usize], &[f32]) -> TensorData| {
        let mut a = dense.clone();
        for layer in &mut a.layers {
            let values = layer.weight.to_dense_values();
            // Half the weights zero, as after pruning.
            let pruned: Vec<f32> = values
                .iter()
                .enumerate()
                .map(|(i, &v)| if i % 2 == 0 { 0.0 } else { v })
                .collect();
            layer.weight = f(layer.weight.shape(), &pruned);
        }
        a.validate().expect("converted artifact is consistent");
        a
    };
    vec![
        ("dense", dense.clone()),
        (
            "sparse",
            convert(&|shape, v| TensorData::sparse_from_dense(shape.to_vec(), v).unwrap()),
        ),
        (
            "int8-channel",
            convert(&|shape, v| quantize_tensor(shape.to_vec(), v, 8, shape[1], true, false)),
        ),
        (
            "int4-grouped",
            convert(&|shape, v| quantize_tensor(shape.to_vec(), v, 4, 2, false, false)),
        ),
        (
            "int8-sparse",
            convert(&|shape, v| quantize_tensor(shape.to_vec(), v, 8, shape[1], true, true)),
        ),
        (
            "int8-row-groups",
            convert(&|shape, v| quantize_tensor(shape.to_vec(), v, 8, 4, true, false)),
        ),
    ]
}

/// Groups of scales that restart at every row (a group shorter than a row that does not
/// divide it) need format version 3; everything else is still written as version 2, which
/// a build one version behind reads. A version-2 file that holds such groups is refused,
/// not read as groups running across rows.
#[test]
fn only_groups_per_row_are_written_as_version_3() {
    let version = |bytes: &[u8]| u16::from_le_bytes([bytes[8], bytes[9]]);
    for (kind, artifact) in written_artifacts() {
        let row_groups = artifact.layers.iter().any(|l| {
            matches!(
                l.weight,
                TensorData::QuantizedInt {
                    row_groups: true,
                    ..
                }
            )
        });
        // Groups of 2 and 4 restart at every row of the 5- and 6-input layers.
        assert_eq!(
            row_groups,
            kind.ends_with("groups") || kind.ends_with("grouped"),
            "{kind}"
        );
        let bytes = artifact.to_bytes();
        assert_eq!(version(&bytes), if row_groups { 3 } else { 2 }, "{kind}");
        assert_eq!(Artifact::from_bytes(&bytes).unwrap(), artifact, "{kind}");
        if row_groups {
            let mut old = plain_bytes(&artifact);
            old.truncate(old.len() - 32);
            old[8..10].copy_from_slice(&2u16.to_le_bytes());
            let error = Artifact::from_bytes(&reseal_digest_only(old)).unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains("groups of scales per row need format version 3, the file says 2"),
                "{kind}: {error}"
            );
        }
    }
}

/// What a decoded artifact must allow: the engine loads it and answers a row with one
/// probability per class, and re-encoding it reproduces the same artifact.
fn check_usable(artifact: &Artifact) -> Result<(), TestCaseError> {
    let again = Artifact::from_bytes(&artifact.to_bytes())
        .map_err(|e| TestCaseError::fail(format!("re-encoded artifact fails: {e}")))?;
    prop_assert_eq!(again.to_bytes(), artifact.to_bytes());
    let engine = Engine::from_artifact(artifact)
        .map_err(|e| TestCaseError::fail(format!("decoded artifact does not load: {e}")))?;
    let row = vec![1.0f32; engine.n_features()];
    let p = engine
        .predict(&row)
        .map_err(|e| TestCaseError::fail(format!("decoded artifact does not predict: {e}")))?;
    prop_assert_eq!(p.probabilities.len(), artifact.class_labels.len());
    prop_assert!(p.class < artifact.class_labels.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Bit flips, truncation and extension of real artifact bytes (compressed as written,
    /// and with an uncompressed body): damage the digest can see is always refused; damage
    /// re-sealed past the digest is refused or yields a usable artifact.
    #[test]
    fn damaged_written_artifacts_are_refused_or_usable(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..6),
        cut in any::<prop::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        for (kind, artifact) in written_artifacts() {
            for original in [artifact.to_bytes(), plain_bytes(&artifact)] {
                let back = Artifact::from_bytes(&original)
                    .map_err(|e| TestCaseError::fail(format!("{kind}: {e}")))?;
                prop_assert_eq!(&back, &artifact);
                check_usable(&back)?;

                // One bit flipped anywhere: magic, version, encoding, length, body or digest.
                let (at, bit) = &flips[0];
                let mut one = original.clone();
                let i = at.index(one.len());
                one[i] ^= 1 << bit;
                prop_assert!(Artifact::from_bytes(&one).is_err(), "{kind}: a flipped bit was accepted");

                let mut flipped = original.clone();
                for (at, bit) in &flips {
                    let i = at.index(flipped.len());
                    flipped[i] ^= 1 << bit;
                }
                // (Two flips of the same bit cancel: only bytes that differ must be refused.)
                if flipped != original {
                    prop_assert!(Artifact::from_bytes(&flipped).is_err(), "{kind}: flipped bits were accepted");
                }
                if let Ok(a) = Artifact::from_bytes(&reseal(flipped)) {
                    check_usable(&a)?;
                }

                let truncated = &original[..cut.index(original.len())];
                prop_assert!(Artifact::from_bytes(truncated).is_err());
                if let Ok(a) = Artifact::from_bytes(&reseal(truncated.to_vec())) {
                    check_usable(&a)?;
                }

                let mut extended = original.clone();
                extended.extend_from_slice(&extra);
                prop_assert!(
                    matches!(Artifact::from_bytes(&extended), Err(ArtifactError::TrailingBytes { .. })),
                    "{kind}: extension not refused as trailing bytes"
                );
                if let Ok(a) = Artifact::from_bytes(&reseal(extended)) {
                    check_usable(&a)?;
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Artifact::from_bytes(&bytes);
        let mut with_magic = b"LATHEART".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = Artifact::from_bytes(&with_magic);
        let _ = Artifact::from_bytes(&reseal(with_magic));
    }

    #[test]
    fn decoding_mutated_artifacts_never_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        // One compressed and one uncompressed body, so both decoders see garbage.
        let compressed = sample_artifact().to_bytes();
        let plain = plain_bytes(&sample_artifact());
        for original in [compressed, plain] {
            let mut mutated = original.clone();
            for (at, value) in &flips {
                let i = at.index(mutated.len());
                mutated[i] = *value;
            }
            let _ = Artifact::from_bytes(&mutated);
            // Re-sealed, the mutation gets past the digest and into the body decoders.
            let resealed = reseal(mutated.clone());
            let _ = Artifact::from_bytes(&resealed);
            let truncated = &original[..cut.index(original.len())];
            prop_assert!(Artifact::from_bytes(truncated).is_err());
            let _ = Artifact::from_bytes(&reseal(truncated.to_vec()));
        }
    }
}
