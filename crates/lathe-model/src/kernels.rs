//! The dense-layer kernels behind [`crate::engine`]: a single-row kernel compiled for
//! AVX-512, AVX2+FMA and baseline x86-64 and picked at run time, and a batch kernel on the
//! `gemm` crate. This is the crate's only `unsafe` code.
//!
//! Layout: weights are `[in][out]` row-major (`wt[i * n_out + o]`). For one row that makes
//! the layer a sum of weight rows scaled by the inputs: broadcast-multiply-add with no
//! horizontal sums, and an input that ReLU zeroed (about half of them) skips its whole row.
//! For a batch it is the row-major right-hand side a GEMM wants.
#![allow(unsafe_code)]

/// Outputs kept in registers at once by the row kernel: four 512-bit (or eight 256-bit)
/// accumulators, leaving registers for the weight loads.
const BLOCK: usize = 64;

/// Reusable space for the row kernel's list of non-zero inputs.
#[derive(Debug, Default)]
pub(crate) struct RowScratch {
    index: Vec<u32>,
    value: Vec<f32>,
}

/// `y = bias + x · wt`, then ReLU when `relu`, for one row. `wt` is `[x.len()][y.len()]`.
pub(crate) fn dense_row(
    wt: &[f32],
    bias: &[f32],
    x: &[f32],
    y: &mut [f32],
    relu: bool,
    scratch: &mut RowScratch,
) {
    debug_assert_eq!(wt.len(), x.len() * y.len());
    debug_assert_eq!(bias.len(), y.len());
    // The non-zero inputs are listed first, without branches, so the weight rows of zero
    // inputs (raw zero pixels, ReLU-zeroed activations: about half of them) are skipped
    // without a mispredicted branch per input and block.
    scratch.index.resize(x.len(), 0);
    scratch.value.resize(x.len(), 0.0);
    let mut active = 0;
    for (i, &xi) in x.iter().enumerate() {
        scratch.index[active] = i as u32;
        scratch.value[active] = xi;
        active += usize::from(xi != 0.0);
    }
    let index = &scratch.index[..active];
    let value = &scratch.value[..active];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { dense_row_avx512(wt, bias, index, value, y, relu) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { dense_row_avx2(wt, bias, index, value, y, relu) };
            return;
        }
    }
    dense_row_portable::<false>(wt, bias, index, value, y, relu);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn dense_row_avx512(
    wt: &[f32],
    bias: &[f32],
    index: &[u32],
    value: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    dense_row_portable::<true>(wt, bias, index, value, y, relu);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dense_row_avx2(
    wt: &[f32],
    bias: &[f32],
    index: &[u32],
    value: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    dense_row_portable::<true>(wt, bias, index, value, y, relu);
}

/// The row kernel in plain Rust, written so the compiler vectorizes it: it is inlined into
/// each `target_feature` wrapper above and compiled once per instruction set. `index` and
/// `value` list the non-zero inputs. `FUSED` uses `mul_add`, which is one instruction with
/// FMA and a slow library call without it.
#[inline(always)]
fn dense_row_portable<const FUSED: bool>(
    wt: &[f32],
    bias: &[f32],
    index: &[u32],
    value: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    let n_out = y.len();
    let full_blocks = n_out / BLOCK;
    for block in 0..full_blocks {
        let start = block * BLOCK;
        let mut acc = [0f32; BLOCK];
        acc.copy_from_slice(&bias[start..start + BLOCK]);
        for (&i, &xi) in index.iter().zip(value) {
            let row = i as usize * n_out + start;
            let w: &[f32; BLOCK] = wt[row..row + BLOCK]
                .try_into()
                .expect("block slice has BLOCK elements");
            for (a, &wv) in acc.iter_mut().zip(w) {
                *a = if FUSED {
                    wv.mul_add(xi, *a)
                } else {
                    *a + wv * xi
                };
            }
        }
        finish(&acc, &mut y[start..start + BLOCK], relu);
    }
    let start = full_blocks * BLOCK;
    if start < n_out {
        let tail = n_out - start;
        let mut acc = [0f32; BLOCK];
        acc[..tail].copy_from_slice(&bias[start..]);
        for (&i, &xi) in index.iter().zip(value) {
            let row = i as usize * n_out;
            let w = &wt[row + start..row + n_out];
            for (a, &wv) in acc[..tail].iter_mut().zip(w) {
                *a = if FUSED {
                    wv.mul_add(xi, *a)
                } else {
                    *a + wv * xi
                };
            }
        }
        finish(&acc[..tail], &mut y[start..], relu);
    }
}

/// Copies accumulators out, applying ReLU when asked.
#[inline(always)]
fn finish(acc: &[f32], y: &mut [f32], relu: bool) {
    if relu {
        for (o, &a) in y.iter_mut().zip(acc) {
            *o = a.max(0.0);
        }
    } else {
        y.copy_from_slice(acc);
    }
}

/// `y = bias + x · wt` (then ReLU when `relu`) for `rows` rows: `x` is `[rows][n_in]`,
/// `wt` is `[n_in][n_out]`, `y` is `[rows][n_out]`, all row-major.
pub(crate) fn dense_batch(
    x: &[f32],
    rows: usize,
    n_in: usize,
    wt: &[f32],
    bias: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    let n_out = bias.len();
    // These are the bounds the raw-pointer call below relies on; they are real checks,
    // not debug-only, because a mistake here would read or write out of bounds.
    assert_eq!(x.len(), rows * n_in, "dense_batch: x has the wrong length");
    assert_eq!(
        wt.len(),
        n_in * n_out,
        "dense_batch: wt has the wrong length"
    );
    assert_eq!(y.len(), rows * n_out, "dense_batch: y has the wrong length");
    if rows == 0 || n_out == 0 {
        return;
    }
    for row in y.chunks_exact_mut(n_out) {
        row.copy_from_slice(bias);
    }
    if n_in > 0 {
        // SAFETY: the asserts above give dst (y) rows × n_out, lhs (x) rows × n_in and rhs
        // (wt) n_in × n_out elements, all row-major with the strides passed (column stride 1,
        // row stride = the row length), so gemm reads and writes only inside the three
        // slices; y is borrowed mutably, so it does not alias x or wt.
        unsafe {
            gemm::gemm(
                rows,
                n_out,
                n_in,
                y.as_mut_ptr(),
                1,
                n_out as isize,
                true,
                x.as_ptr(),
                1,
                n_in as isize,
                wt.as_ptr(),
                1,
                n_out as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                // One thread: the deployer runs many requests side by side, so a batch must
                // not take every core.
                gemm::Parallelism::None,
            );
        }
    }
    if relu {
        for v in y.iter_mut() {
            *v = v.max(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain triple loop to compare the kernels against.
    fn reference(x: &[f32], rows: usize, wt: &[f32], bias: &[f32], relu: bool) -> Vec<f32> {
        let n_out = bias.len();
        let n_in = x.len().checked_div(rows).unwrap_or(0);
        let mut y = Vec::new();
        for r in 0..rows {
            for o in 0..n_out {
                let mut s = f64::from(bias[o]);
                for i in 0..n_in {
                    s += f64::from(x[r * n_in + i]) * f64::from(wt[i * n_out + o]);
                }
                let s = s as f32;
                y.push(if relu { s.max(0.0) } else { s });
            }
        }
        y
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A small LCG: deterministic, spread over [-1, 1), with some exact zeros so the
        // zero-skip path is exercised.
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|k| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                if k % 7 == 3 {
                    0.0
                } else {
                    (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
                }
            })
            .collect()
    }

    #[test]
    fn row_and_batch_kernels_match_a_plain_loop() {
        for (n_in, n_out) in [(64, 256), (256, 128), (128, 10), (3, 1), (5, 130)] {
            for relu in [false, true] {
                let rows = 7;
                let x = values(rows * n_in, 1);
                let wt = values(n_in * n_out, 2);
                let bias = values(n_out, 3);
                let expected = reference(&x, rows, &wt, &bias, relu);
                let mut batch = vec![0.0; rows * n_out];
                dense_batch(&x, rows, n_in, &wt, &bias, &mut batch, relu);
                let mut scratch = RowScratch::default();
                for r in 0..rows {
                    let mut y = vec![0.0; n_out];
                    let row = &x[r * n_in..(r + 1) * n_in];
                    dense_row(&wt, &bias, row, &mut y, relu, &mut scratch);
                    for o in 0..n_out {
                        let e = expected[r * n_out + o];
                        assert!(
                            (y[o] - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "row {r} out {o}"
                        );
                        let b = batch[r * n_out + o];
                        assert!((b - e).abs() <= 1e-4 * (1.0 + e.abs()), "batch {r} out {o}");
                    }
                }
                let mut portable = vec![0.0; n_out];
                let index: Vec<u32> = (0..n_in as u32).collect();
                dense_row_portable::<false>(&wt, &bias, &index, &x[..n_in], &mut portable, relu);
                for o in 0..n_out {
                    let e = expected[o];
                    assert!((portable[o] - e).abs() <= 1e-4 * (1.0 + e.abs()));
                }
            }
        }
    }
}
