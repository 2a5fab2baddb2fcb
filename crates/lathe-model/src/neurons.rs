//! Removing the hidden neurons of a ReLU MLP that cannot change an output, without changing
//! what the network computes (up to the float rounding of folded biases). One algorithm for
//! the pruner (layers stored `[out][in]`, with masks) and the engine (layers transposed for
//! its kernels): both see their layers through [`NeuronLayers`].
//!
//! - A hidden neuron whose outgoing weights are all zero cannot influence the output,
//!   whatever its activation: it is removed.
//! - One whose incoming weights are all zero outputs the constant `relu(bias)`: that constant
//!   times its outgoing weights is added to the next layer's biases, and it is removed.
//!
//! Removing a neuron can leave a neuron of the layer before it without outgoing weights (or
//! one of the layer after without incoming ones), so passes repeat until nothing changes.
//! Every hidden layer keeps at least one neuron (a layer of width 0 has no kernel).
//! Unstructured pruning leaves many such neurons (at 90 % on the digits MLP about a third of
//! the first hidden layer); each costs a bias, a scale once quantized, a row of positions,
//! and time in every kernel.

/// A stack of fully connected layers, `layer(l)` feeding `layer(l + 1)` through a ReLU.
pub(crate) trait NeuronLayers {
    fn depth(&self) -> usize;
    /// Layer `l`'s inputs.
    fn n_in(&self, l: usize) -> usize;
    /// Layer `l`'s outputs (neurons).
    fn n_out(&self, l: usize) -> usize;
    /// The weight from input `i` to output `o` of layer `l`.
    fn weight(&self, l: usize, o: usize, i: usize) -> f32;
    fn bias(&self, l: usize, o: usize) -> f32;
    fn add_to_bias(&mut self, l: usize, o: usize, v: f32);
    /// Keeps only the listed outputs of layer `l` (in order), with their biases.
    fn keep_outputs(&mut self, l: usize, keep: &[usize]);
    /// Keeps only the listed inputs of layer `l` (in order).
    fn keep_inputs(&mut self, l: usize, keep: &[usize]);
}

/// Removes every hidden neuron that cannot change an output, to a fixed point (see the
/// module's documentation). Returns whether any was removed.
pub(crate) fn remove_dead_neurons<L: NeuronLayers + ?Sized>(layers: &mut L) -> bool {
    let mut removed_any = false;
    let mut changed = true;
    while changed {
        changed = false;
        for l in 0..layers.depth().saturating_sub(1) {
            let (width, n_in, next_out) = (layers.n_out(l), layers.n_in(l), layers.n_out(l + 1));
            // Neurons that feed something, split by whether anything feeds them.
            let (mut live, mut constant) = (Vec::with_capacity(width), Vec::new());
            for j in 0..width {
                if (0..next_out).all(|o| layers.weight(l + 1, o, j) == 0.0) {
                    continue;
                }
                if (0..n_in).all(|i| layers.weight(l, j, i) == 0.0) {
                    constant.push(j);
                } else {
                    live.push(j);
                }
            }
            // A layer with nothing live keeps one neuron: a constant one if there is one (it
            // is then not folded as well), else any.
            let keep = if !live.is_empty() {
                live
            } else {
                vec![constant.pop().unwrap_or(0)]
            };
            for j in constant {
                let c = layers.bias(l, j).max(0.0);
                for o in 0..next_out {
                    let folded = c * layers.weight(l + 1, o, j);
                    layers.add_to_bias(l + 1, o, folded);
                }
            }
            if keep.len() < width {
                layers.keep_outputs(l, &keep);
                layers.keep_inputs(l + 1, &keep);
                changed = true;
                removed_any = true;
            }
        }
    }
    removed_any
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[out][in]` layers with biases, for the tests.
    struct Plain(Vec<(usize, usize, Vec<f32>, Vec<f32>)>);

    impl NeuronLayers for Plain {
        fn depth(&self) -> usize {
            self.0.len()
        }
        fn n_in(&self, l: usize) -> usize {
            self.0[l].1
        }
        fn n_out(&self, l: usize) -> usize {
            self.0[l].0
        }
        fn weight(&self, l: usize, o: usize, i: usize) -> f32 {
            self.0[l].2[o * self.0[l].1 + i]
        }
        fn bias(&self, l: usize, o: usize) -> f32 {
            self.0[l].3[o]
        }
        fn add_to_bias(&mut self, l: usize, o: usize, v: f32) {
            self.0[l].3[o] += v;
        }
        fn keep_outputs(&mut self, l: usize, keep: &[usize]) {
            let (_, n_in, w, b) = &self.0[l];
            let w = keep
                .iter()
                .flat_map(|&o| w[o * n_in..(o + 1) * n_in].to_vec())
                .collect();
            let b = keep.iter().map(|&o| b[o]).collect();
            self.0[l] = (keep.len(), *n_in, w, b);
        }
        fn keep_inputs(&mut self, l: usize, keep: &[usize]) {
            let (n_out, n_in, w, b) = &self.0[l];
            let w = (0..*n_out)
                .flat_map(|o| keep.iter().map(move |&i| w[o * n_in + i]))
                .collect();
            self.0[l] = (*n_out, keep.len(), w, b.clone());
        }
    }

    fn forward(p: &Plain, x: &[f32]) -> Vec<f32> {
        let mut a = x.to_vec();
        for (l, (n_out, n_in, w, b)) in p.0.iter().enumerate() {
            let mut out: Vec<f32> = (0..*n_out)
                .map(|o| b[o] + (0..*n_in).map(|i| w[o * n_in + i] * a[i]).sum::<f32>())
                .collect();
            if l + 1 < p.0.len() {
                out.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            a = out;
        }
        a
    }

    #[test]
    fn removal_reaches_a_fixed_point_and_keeps_the_function() {
        // 2 → 3 → 2 → 1. Hidden neuron 1 of layer 0 has no inputs (constant relu(0.5));
        // neuron 1 of layer 1 feeds nothing; once it goes, neuron 2 of layer 0, which fed
        // only it, feeds nothing either: only a second pass finds that.
        let mut p = Plain(vec![
            (
                3,
                2,
                vec![1.0, -1.0, 0.0, 0.0, 2.0, 1.0],
                vec![0.1, 0.5, -0.2],
            ),
            (2, 3, vec![1.0, 3.0, 0.0, 0.0, 0.0, 4.0], vec![0.0, 0.3]),
            (1, 2, vec![2.0, 0.0], vec![0.7]),
        ]);
        let before: Vec<Vec<f32>> = [[0.3, -1.2], [2.0, 0.5], [-1.0, -1.0]]
            .iter()
            .map(|x| forward(&p, x))
            .collect();
        assert!(remove_dead_neurons(&mut p));
        assert_eq!((p.n_out(0), p.n_out(1)), (1, 1));
        for (x, want) in [[0.3, -1.2], [2.0, 0.5], [-1.0, -1.0]].iter().zip(before) {
            let got = forward(&p, x);
            assert!((got[0] - want[0]).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert!(!remove_dead_neurons(&mut p), "a second call finds nothing");
    }

    #[test]
    fn a_layer_of_constant_neurons_keeps_one_unfolded() {
        // Both hidden neurons have no inputs: one is folded, the other kept as it is.
        let mut p = Plain(vec![
            (2, 1, vec![0.0, 0.0], vec![0.5, 2.0]),
            (1, 2, vec![3.0, -1.0], vec![0.25]),
        ]);
        let want = forward(&p, &[7.0]);
        remove_dead_neurons(&mut p);
        assert_eq!(p.n_out(0), 1);
        assert_eq!(forward(&p, &[7.0]), want);
        assert_eq!(forward(&p, &[-7.0]), want);
    }

    #[test]
    fn a_layer_keeps_one_neuron_when_all_are_dead() {
        let mut p = Plain(vec![
            (2, 1, vec![1.0, 1.0], vec![0.0, 0.0]),
            (1, 2, vec![0.0, 0.0], vec![0.25]),
        ]);
        remove_dead_neurons(&mut p);
        assert_eq!(p.n_out(0), 1);
        assert_eq!(forward(&p, &[3.0]), vec![0.25]);
    }
}
