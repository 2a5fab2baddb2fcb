//! Safetensors interop tests against a real PyTorch state dict (tests/fixtures, made by
//! make_torch_fixture.py), and rejection of files that are not a Linear/ReLU stack.

use std::collections::HashMap;

use lathe_model::artifact::{Artifact, TensorData};
use lathe_model::data::Standardizer;
use lathe_model::engine::Engine;
use lathe_model::interop::{export_safetensors, import_safetensors};
use lathe_model::mlp::MlpConfig;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

const TORCH_FIXTURE: &[u8] = include_bytes!("fixtures/torch_mlp_64_32_10.safetensors");
const TORCH_LOGITS: &str = include_str!("fixtures/torch_mlp_64_32_10_logits.json");

/// The imported torch model as an artifact with an identity standardiser, so the engine
/// sees exactly the inputs PyTorch saw.
fn imported_artifact() -> Artifact {
    let (config, layers) = import_safetensors(TORCH_FIXTURE).expect("imports");
    Artifact::from_imported(
        config,
        layers,
        Standardizer {
            mean: vec![0.0; 64],
            scale: vec![1.0; 64],
        },
        (0..64).map(|i| format!("p{i}")).collect(),
        (0..10).map(|i| i.to_string()).collect(),
    )
    .expect("valid artifact")
}

#[test]
fn a_torch_state_dict_imports_and_reproduces_torch_logits() {
    let (config, layers) = import_safetensors(TORCH_FIXTURE).expect("imports");
    assert_eq!(config, MlpConfig::new(64, vec![32], 10));
    assert_eq!(layers[0].weight.shape(), [32, 64]);
    assert_eq!(layers[1].bias.shape(), [10]);

    let fixture: serde_json::Value = serde_json::from_str(TORCH_LOGITS).expect("json");
    let inputs: Vec<Vec<f32>> = serde_json::from_value(fixture["inputs"].clone()).expect("inputs");
    let logits: Vec<Vec<f32>> = serde_json::from_value(fixture["logits"].clone()).expect("logits");
    let engine = Engine::from_artifact(&imported_artifact()).expect("loads");
    for (row, expected) in inputs.iter().zip(&logits) {
        let ours = engine.logits(row).expect("ok");
        for (a, b) in ours.iter().zip(expected) {
            assert!((a - b).abs() < 1e-5, "{a} vs torch {b}");
        }
    }
    let batch = engine
        .logits_batch(&inputs.concat(), inputs.len())
        .expect("ok");
    for (a, b) in batch.iter().zip(logits.concat()) {
        assert!((a - b).abs() < 1e-5, "{a} vs torch {b}");
    }
}

#[test]
fn an_export_has_torch_keys_and_reimports_identically() {
    let artifact = imported_artifact();
    let exported = export_safetensors(&artifact).expect("exports");
    let file = SafeTensors::deserialize(&exported).expect("valid safetensors");
    let mut names = file.names();
    names.sort_unstable();
    assert_eq!(names, ["0.bias", "0.weight", "2.bias", "2.weight"]);
    assert_eq!(file.tensor("0.weight").expect("present").shape(), [32, 64]);
    assert_eq!(
        file.tensor("2.weight").expect("present").dtype(),
        Dtype::F32
    );

    let (config, layers) = import_safetensors(&exported).expect("reimports");
    assert_eq!(&config, artifact.mlp_config());
    assert_eq!(layers, artifact.layers);
    // The original torch file and lathe's export hold the same tensors.
    let original = SafeTensors::deserialize(TORCH_FIXTURE).expect("valid");
    for name in ["0.weight", "0.bias", "2.weight", "2.bias"] {
        assert_eq!(
            original.tensor(name).expect("present").data(),
            file.tensor(name).expect("present").data()
        );
    }
}

/// One tensor of a hand-made safetensors file: key, dtype, shape, little-endian bytes.
type Entry = (&'static str, Dtype, Vec<usize>, Vec<u8>);

/// A safetensors file from its entries.
fn file_of(entries: &[Entry]) -> Vec<u8> {
    let views: HashMap<String, TensorView<'_>> = entries
        .iter()
        .map(|(key, dtype, shape, bytes)| {
            (
                key.to_string(),
                TensorView::new(*dtype, shape.clone(), bytes).expect("consistent view"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serializes")
}

/// `n` little-endian f32 values 0.0, 0.5, 1.0, …
fn f32s(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect()
}

#[test]
fn files_that_are_not_a_linear_stack_are_rejected_clearly() {
    use Dtype::F32;
    let cases: Vec<(Vec<Entry>, &str)> = vec![
        (
            vec![
                ("0.weight", F32, vec![4, 3], f32s(12)),
                ("0.bias", F32, vec![4], f32s(4)),
                ("2.weight", F32, vec![2, 5], f32s(10)),
                ("2.bias", F32, vec![2], f32s(2)),
            ],
            "tensor \"2.weight\" has shape [2, 5]: its 5 inputs do not match the 4 outputs of \"0.weight\"",
        ),
        (
            vec![
                ("0.weight", F32, vec![8, 1, 3, 3], f32s(72)),
                ("0.bias", F32, vec![8], f32s(8)),
            ],
            "tensor \"0.weight\" has shape [8, 1, 3, 3]: a Linear weight must be 2-D [out, in] (this looks like a convolution kernel",
        ),
        (
            vec![("0.weight", F32, vec![4, 3], f32s(12))],
            "layer 0: \"0.bias\" is missing",
        ),
        (
            vec![("net.3.bias", F32, vec![4], f32s(4))],
            "layer 3: \"net.3.weight\" is missing",
        ),
        (
            vec![
                ("0.weight", F32, vec![4, 3], f32s(12)),
                ("0.bias", F32, vec![3], f32s(3)),
            ],
            "tensor \"0.bias\" has shape [3], expected [4] to match the weight",
        ),
        (
            vec![
                ("0.weight", F32, vec![4, 3], f32s(12)),
                ("0.bias", F32, vec![4], f32s(4)),
                ("1.running_mean", F32, vec![4], f32s(4)),
            ],
            "tensor \"1.running_mean\" is not a Linear layer parameter",
        ),
        (
            vec![
                ("a.0.weight", F32, vec![4, 3], f32s(12)),
                ("a.0.bias", F32, vec![4], f32s(4)),
                ("b.2.weight", F32, vec![2, 4], f32s(8)),
                ("b.2.bias", F32, vec![2], f32s(2)),
            ],
            "tensor \"b.2.bias\" has prefix \"b\" but earlier keys use \"a\"",
        ),
        (
            vec![
                ("0.weight", Dtype::I64, vec![2, 2], vec![0; 32]),
                ("0.bias", F32, vec![2], f32s(2)),
            ],
            "tensor \"0.weight\" has dtype I64; only F32, F64, F16 and BF16 are accepted",
        ),
        (
            vec![
                (
                    "0.weight",
                    F32,
                    vec![1, 2],
                    [1.0f32, f32::NAN]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                ),
                ("0.bias", F32, vec![1], f32s(1)),
            ],
            "tensor \"0.weight\" holds a non-finite value at element 1",
        ),
        (vec![], "the safetensors file holds no tensors"),
    ];
    for (entries, expected) in cases {
        let message = import_safetensors(&file_of(&entries))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(expected),
            "{message:?} does not contain {expected:?}"
        );
    }
    let message = import_safetensors(b"definitely not safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("not a valid safetensors file"),
        "{message}"
    );
}

#[test]
fn layers_are_ordered_by_index_and_other_float_types_convert() {
    // Indices 0, 2 and 10 (10 sorts before 2 as text), a prefix, and F64/F16/BF16 tensors.
    let f64s = |values: &[f64]| {
        values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let one_f16 = 0x3c00u16.to_le_bytes().to_vec();
    let one_bf16 = 0x3f80u16.to_le_bytes().to_vec();
    let file = file_of(&[
        (
            "model.0.weight",
            Dtype::F64,
            vec![2, 1],
            f64s(&[0.25, -4.0]),
        ),
        ("model.0.bias", Dtype::F64, vec![2], f64s(&[1.0, 2.0])),
        (
            "model.2.weight",
            Dtype::F16,
            vec![1, 2],
            [one_f16.clone(), 0xc000u16.to_le_bytes().to_vec()].concat(),
        ),
        ("model.2.bias", Dtype::F16, vec![1], one_f16),
        (
            "model.10.weight",
            Dtype::BF16,
            vec![3, 1],
            [
                one_bf16.clone(),
                one_bf16.clone(),
                0x4040u16.to_le_bytes().to_vec(),
            ]
            .concat(),
        ),
        (
            "model.10.bias",
            Dtype::BF16,
            vec![3],
            [one_bf16.clone(), one_bf16.clone(), one_bf16].concat(),
        ),
    ]);
    let (config, layers) = import_safetensors(&file).expect("imports");
    assert_eq!(config, MlpConfig::new(1, vec![2, 1], 3));
    let values = |t: &TensorData| t.dense_values().expect("dense").to_vec();
    assert_eq!(values(&layers[0].weight), [0.25, -4.0]);
    assert_eq!(values(&layers[1].weight), [1.0, -2.0]);
    assert_eq!(values(&layers[2].weight), [1.0, 1.0, 3.0]);
    assert_eq!(values(&layers[2].bias), [1.0, 1.0, 1.0]);
}
