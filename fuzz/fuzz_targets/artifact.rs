//! The artifact reader: `Artifact::from_bytes` must return an error or an artifact that
//! re-encodes to itself and that the engine loads and answers with. Each input is tried
//! three ways: as a file; as a body (first byte: plain or zstd) sealed with a correct
//! length and digest, so it reaches the body decoders; and as byte edits applied to the
//! MessagePack body of a real artifact (dense, sparse, int8, int4 or sparse int8
//! weights) before sealing, so mutations reach validation and the engine.
#![no_main]

use std::sync::OnceLock;

use lathe_model::artifact::{LayerTensors, TensorData};
use lathe_model::data::Standardizer;
use lathe_model::quantize::quantize_tensor;
use lathe_model::{Artifact, Engine, MlpConfig};
use libfuzzer_sys::fuzz_target;


/// MessagePack bodies of a small 6-5-3 model in each storage the stages write.
fn bodies() -> &'static [Vec<u8>] {
    static BODIES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    BODIES.get_or_init(|| {
        let value = |i: usize| ((i * 37 % 19) as f32 - 9.0) / 10.0;
        let layer = |n_in: usize, n_out: usize| LayerTensors {
            weight: TensorData::DenseF32 {
                shape: vec![n_out, n_in],
                values: (0..n_in * n_out)
                    .map(|i| if i % 3 == 0 { 0.0 } else { value(i) })
                    .collect(),
            },
            bias: TensorData::DenseF32 {
                shape: vec![n_out],
                values: (0..n_out).map(value).collect(),
            },
            input_range: None,
        };
        let dense = Artifact::from_imported(
            MlpConfig::new(6, vec![5], 3),
            vec![layer(6, 5), layer(5, 3)],
            Standardizer {
                mean: vec![0.5; 6],
                scale: vec![2.0; 6],
            },
            (0..6).map(|i| format!("f{i}")).collect(),
            vec!["a".into(), "b".into(), "c".into()],
        )
        .expect("a consistent artifact");
        let convert = |f: &dyn Fn(&[usize], &[f32]) -> TensorData| {
            let mut a = dense.clone();
            for l in &mut a.layers {
                l.weight = f(l.weight.shape(), &l.weight.to_dense_values());
            }
            a
        };
        [
            dense.clone(),
            convert(&|s, v| TensorData::sparse_from_dense(s.to_vec(), v).unwrap()),
            convert(&|s, v| quantize_tensor(s.to_vec(), v, 8, s[1], true, false)),
            convert(&|s, v| quantize_tensor(s.to_vec(), v, 4, 2, false, false)),
            convert(&|s, v| quantize_tensor(s.to_vec(), v, 8, s[1], true, true)),
        ]
        .iter()
        .map(|a| rmp_serde::to_vec_named(a).unwrap())
        .collect()
    })
}

fn check(bytes: &[u8]) {
    if let Ok(artifact) = Artifact::from_bytes(bytes) {
        let encoded = artifact.to_bytes();
        let again = Artifact::from_bytes(&encoded).expect("a decoded artifact re-encodes");
        assert_eq!(again.to_bytes(), encoded);
        let engine = Engine::from_artifact(&artifact).expect("a decoded artifact loads");
        let row = vec![1.0f32; engine.n_features()];
        let p = engine.predict(&row).expect("a decoded artifact predicts");
        assert_eq!(p.probabilities.len(), artifact.class_labels.len());
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    check(&lathe_model::artifact::frame(first & 1, rest));
    // Edits of a real body: (position high, position low, value) triples.
    let bodies = bodies();
    let mut body = bodies[first as usize % bodies.len()].clone();
    for edit in rest.chunks_exact(3) {
        let at = u16::from_le_bytes([edit[0], edit[1]]) as usize % body.len();
        body[at] = edit[2];
    }
    check(&lathe_model::artifact::frame(0, &body));
});
