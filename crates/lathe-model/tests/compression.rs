//! The compression figures the pruner and quantizer promise, on the digits MLP
//! 64-256-128-10 as the peer trains it (seeded, so the same build gives the same model):
//! gradual Taylor pruning to 95 % followed by per-channel int8 is at least 20 times smaller
//! than the dense float artifact within half a point of its test accuracy, and is served from
//! its integer codes; per-channel int8 alone stays within 0.3 points and its engine holds
//! about a quarter of the float weight bytes. `just bench` prints the same runs with their timings beside the PyTorch peer.

use lathe_model::artifact::{Artifact, TensorData};
use lathe_model::data::{Splits, builtin, split};
use lathe_model::engine::{Engine, KernelChoice, argmax};
use lathe_model::mlp::MlpConfig;
use lathe_model::prune::{PruneConfig, Saliency, Scope, Structure, Target, prune_mlp};
use lathe_model::quantize::{Bits, Granularity, QuantizeConfig, quantize_mlp};
use lathe_model::train::{TrainConfig, train_mlp};

fn dense() -> (Artifact, f64, Splits) {
    let (train, test) = builtin("digits").unwrap();
    let splits = split(train, Some(test), 0.1, 0.0, 0).unwrap();
    let trained = train_mlp(
        &splits,
        &MlpConfig::new(64, vec![256, 128], 10),
        &TrainConfig::default(),
        &mut |_| {},
    )
    .unwrap();
    (trained.artifact, trained.test.accuracy, splits)
}

fn int8_per_channel() -> QuantizeConfig {
    QuantizeConfig {
        granularity: Some(Granularity::PerChannel),
        ..QuantizeConfig::default()
    }
}

/// The integer engine's logits are within 3 % of the row's largest logit of the dequantized
/// model's, the class is the same on at least 99 % of the test rows, and single rows give
/// exactly the batch's answers.
fn close_to_dequantized(engine: &Engine, artifact: &Artifact, splits: &Splits) {
    let dequantized = Engine::with_kernels(artifact, KernelChoice::DenseOnly).unwrap();
    let n = splits.test.rows();
    let ints = engine.logits_batch(&splits.test.features, n).unwrap();
    let floats = dequantized.logits_batch(&splits.test.features, n).unwrap();
    let mut same = 0;
    for (a, b) in ints.chunks_exact(10).zip(floats.chunks_exact(10)) {
        let size = 1.0 + b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (p, q) in a.iter().zip(b) {
            assert!((p - q).abs() <= 0.03 * size, "{p} against {q}");
        }
        same += usize::from(argmax(a) == argmax(b));
    }
    assert!(same * 100 >= n * 99, "{same} of {n} agree");
    for r in 0..n {
        let row = engine.logits(splits.test.row(r)).unwrap();
        assert_eq!(row, ints[r * 10..(r + 1) * 10], "row {r}");
    }
}

#[test]
fn pruning_then_int8_is_twenty_times_smaller_within_half_a_point() {
    let (dense, accuracy, splits) = dense();
    let dense_bytes = dense.to_bytes().len();
    let pruned = prune_mlp(
        &dense,
        &splits,
        &PruneConfig {
            saliency: Saliency::Taylor,
            structure: Structure::Unstructured,
            scope: Scope::Global,
            target: Target::Fixed(0.95),
            steps: 8,
            finetune_epochs: 5,
            batch_size: 64,
            learning_rate: 1e-3,
            seed: 0,
            max_accuracy_drop: 0.005,
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(pruned.sparsity >= 0.95, "sparsity {}", pruned.sparsity);
    let q = quantize_mlp(&pruned.artifact, &splits, &int8_per_channel()).unwrap();
    let bytes = q.artifact.to_bytes();
    let times = dense_bytes as f64 / bytes.len() as f64;
    assert!(
        times >= 20.0,
        "{} B against {dense_bytes} B: {times:.1}× smaller",
        bytes.len()
    );
    assert!(
        q.test.accuracy >= accuracy - 0.005,
        "{} against {accuracy}",
        q.test.accuracy
    );
    // What was measured is what is stored: the file gives the same accuracy.
    let back = Artifact::from_bytes(&bytes).unwrap();
    let engine = Engine::from_artifact(&back).unwrap();
    assert_eq!(
        lathe_model::eval::evaluate(&engine, &splits.test).accuracy,
        q.test.accuracy
    );
    // It is served from its integer codes, not dequantized: every layer runs on the integer
    // kernels once the pruned neurons are gone, in less memory than the same pruned model
    // takes in f32 on the sparse kernels, close to its dequantized form, and rows and
    // batches give identical answers.
    assert_eq!(engine.int8_layers(), [true, true, true]);
    // Where the engine allows it (not on VNNI), its batches sum only the non-zero codes of
    // the sparsest layers, in exact integers: the row/batch identity below covers them.
    if lathe_model::engine::int8_sparse_max_density().is_some() {
        assert!(
            engine.sparse_layers().contains(&true),
            "{:?}",
            engine.sparse_layers()
        );
        // A narrow layer after one of those stays on that path, its activations transposed.
        let (sparse, shapes) = (engine.sparse_layers(), engine.layer_shapes());
        for l in 1..sparse.len() {
            if sparse[l - 1] && shapes[l].0 <= lathe_model::engine::INT8_AFTER_SPARSE_MAX_INPUTS {
                assert!(sparse[l], "{sparse:?} {shapes:?}");
            }
        }
    }
    let sparse_f32 = Engine::from_artifact(&pruned.artifact).unwrap();
    assert!(
        engine.resident_weight_bytes() * 2 < sparse_f32.resident_weight_bytes(),
        "{} B against {} B",
        engine.resident_weight_bytes(),
        sparse_f32.resident_weight_bytes()
    );
    // The integer engine also rounds each layer's input to 8 bits: only near ties can
    // change class (2 of the 360 here, where the dequantized model's top two logits are
    // 0.09 and 0.10 apart).
    close_to_dequantized(&engine, &back, &splits);

    // With 4-bit codes and a scale and zero point per 32 weights too. Compaction leaves
    // layers whose widths are not multiples of 32, so the runs of inputs sharing a scale
    // have all lengths; each starts on a group of four slots of the integer kernel.
    let mut grouped = int8_per_channel();
    grouped.bits = Bits::Four;
    grouped.granularity = Some(Granularity::Grouped(32));
    grouped.symmetric = false;
    let q4 = quantize_mlp(&pruned.artifact, &splits, &grouped).unwrap();
    let back4 = Artifact::from_bytes(&q4.artifact.to_bytes()).unwrap();
    let engine4 = Engine::from_artifact(&back4).unwrap();
    assert_eq!(engine4.int8_layers(), [true, true, true]);
    assert_eq!(
        lathe_model::eval::evaluate(&engine4, &splits.test).accuracy,
        q4.test.accuracy
    );
    close_to_dequantized(&engine4, &back4, &splits);
    // The breakdown accounts for every byte; the weights (values, positions, scales) are
    // the largest share, though at this size no longer most of it.
    let parts = back.byte_breakdown();
    assert_eq!(parts.iter().map(|(_, n)| n).sum::<usize>(), bytes.len());
    let weights: usize = parts
        .iter()
        .filter(|(p, _)| p.contains("weight"))
        .map(|(_, n)| n)
        .sum();
    assert!(weights * 3 > bytes.len(), "{parts:?}");
    assert!(parts.iter().all(|(_, n)| *n > 0), "{parts:?}");
}

#[test]
fn int8_per_channel_keeps_the_accuracy_and_a_quarter_of_the_weight_memory() {
    let (dense, accuracy, splits) = dense();
    let q = quantize_mlp(&dense, &splits, &int8_per_channel()).unwrap();
    assert!(
        q.test.accuracy >= accuracy - 0.003,
        "{} against {accuracy}",
        q.test.accuracy
    );
    let float = Engine::from_artifact(&dense).unwrap();
    let int8 = Engine::from_artifact(&q.artifact).unwrap();
    let ratio = int8.resident_weight_bytes() as f64 / float.resident_weight_bytes() as f64;
    assert!((0.24..=0.30).contains(&ratio), "resident ratio {ratio}");
    // Less than a third of the float artifact (lathe's float artifact is itself
    // entropy-coded, about 15 % under raw f32).
    let share = q.artifact.to_bytes().len() as f64 / dense.to_bytes().len() as f64;
    assert!(share < 0.33, "int8 artifact is {share:.3} of the float one");
}

#[test]
fn auto_takes_the_fewest_bits_then_the_coarsest_granularity_inside_the_budget() {
    let (dense, _, splits) = dense();
    let auto = QuantizeConfig {
        bits: Bits::Auto,
        granularity: None,
        ..int8_per_channel()
    };
    let order = [
        (4, Granularity::PerTensor),
        (4, Granularity::PerChannel),
        (4, Granularity::Grouped(32)),
        (8, Granularity::PerTensor),
        (8, Granularity::PerChannel),
        (8, Granularity::Grouped(32)),
    ];
    // Candidates are tried in that order up to the first inside the budget, which is kept.
    let tried_in_order = |q: &lathe_model::quantize::QuantizeOutcome| {
        let tried: Vec<_> = q.search.iter().map(|c| (c.bits, c.granularity)).collect();
        assert_eq!(tried[..], order[..tried.len()], "{:?}", q.search);
        let (last, before) = q.search.split_last().expect("auto tried something");
        assert!(last.inside_budget, "{:?}", q.search);
        assert!(before.iter().all(|c| !c.inside_budget), "{:?}", q.search);
        assert_eq!((q.bits, q.granularity), (last.bits, last.granularity));
        for layer in &q.artifact.layers {
            let TensorData::QuantizedInt {
                bits, group, shape, ..
            } = &layer.weight
            else {
                panic!("not quantized: {}", layer.weight.kind());
            };
            let expected = match q.granularity {
                Granularity::PerTensor => shape[0] * shape[1],
                Granularity::PerChannel => shape[1],
                Granularity::Grouped(g) => g,
            };
            assert_eq!((*bits, *group), (q.bits, expected));
        }
    };
    let q = quantize_mlp(&dense, &splits, &auto).unwrap();
    tried_in_order(&q);
    // The digits model keeps its accuracy with one 4-bit scale per tensor.
    assert_eq!((q.bits, q.granularity), (4, Granularity::PerTensor));

    // Pixel 0 is 0 in every digits image, so a weight on it changes no prediction; made a
    // hundred times the largest weight, it sets the single per-tensor scale of layer 0, and
    // every other weight of that layer rounds to zero at 4 bits.
    let mut skewed = dense.clone();
    let TensorData::DenseF32 { values, .. } = &mut skewed.layers[0].weight else {
        panic!("the trained model is dense");
    };
    let largest = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    values[0] = 100.0 * largest;
    let same = Engine::from_artifact(&skewed).unwrap();
    let original = Engine::from_artifact(&dense).unwrap();
    let n = splits.test.rows();
    assert_eq!(
        same.classes_batch(&splits.test.features, n).unwrap(),
        original.classes_batch(&splits.test.features, n).unwrap()
    );
    let q = quantize_mlp(&skewed, &splits, &auto).unwrap();
    tried_in_order(&q);
    assert!(q.search.len() > 1, "{:?}", q.search);
    assert_ne!(q.granularity, Granularity::PerTensor);
}
