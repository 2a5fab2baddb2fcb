//! The dense-layer kernels behind [`crate::engine`]: a single-row kernel compiled for
//! AVX-512, AVX2+FMA and baseline x86-64 and picked at run time, and a batch kernel on the
//! `gemm` crate. This is the crate's only `unsafe` code.
//!
//! Layout: weights are `[in][out]` row-major, each weight row padded with zeros to a
//! multiple of [`ROW_LANES`] outputs (`wt[i * padded_width(n_out) + o]`; see
//! [`pad_columns`]). For one row that makes the layer a sum of weight rows scaled by the
//! inputs: broadcast-multiply-add with no horizontal sums, and an input that ReLU zeroed
//! (about half of them) skips its whole row. The padding lets every output be computed in
//! whole vectors: widths that compaction leaves (165, 122, 10) otherwise ran their last
//! few outputs through a scalar loop over memory, which cost a pruned model most of its
//! single-row advantage. For a batch it is the row-major right-hand side a GEMM wants (with
//! the padded row stride).
#![allow(unsafe_code)]

/// Outputs kept in registers at once by the row kernel: four 512-bit (or eight 256-bit)
/// accumulators, leaving registers for the weight loads.
const BLOCK: usize = 64;

/// Outputs per vector of the row kernel (one 512-bit register of `f32`): the dense weight
/// rows are padded to a multiple of this.
pub(crate) const ROW_LANES: usize = 16;

/// The padded row length of a dense weight with `n_out` outputs.
pub(crate) fn padded_width(n_out: usize) -> usize {
    n_out.div_ceil(ROW_LANES) * ROW_LANES
}

/// One vector of the row kernel, aligned to a cache line.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(64))]
struct AlignedLanes([f32; ROW_LANES]);

/// A dense weight whose rows are padded to [`padded_width`] and start on a cache line
/// (the stride is 64 bytes × a whole number), so that no vector load of the row kernel
/// straddles two lines: with `Vec<f32>`'s 16-byte alignment, whether they did depended on
/// where the allocator put the weight, and the dense model's single row varied by about
/// a third between otherwise identical runs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PaddedWeight(Vec<AlignedLanes>);

impl PaddedWeight {
    /// The weights as `f32`, `[n_in][padded_width(n_out)]`.
    pub(crate) fn as_slice(&self) -> &[f32] {
        // SAFETY: `AlignedLanes` is `repr(C)` around `[f32; ROW_LANES]` and its size is
        // exactly ROW_LANES · 4 = 64 bytes (its alignment), so the vector's memory is
        // `len · ROW_LANES` initialized, contiguous `f32`s, borrowed for `&self`'s lifetime.
        unsafe {
            std::slice::from_raw_parts(self.0.as_ptr().cast::<f32>(), self.0.len() * ROW_LANES)
        }
    }

    /// The number of `f32` values held (padding included).
    pub(crate) fn len(&self) -> usize {
        self.0.len() * ROW_LANES
    }
}

/// A `[n_in][n_out]` weight with each row padded with zeros to [`padded_width`].
pub(crate) fn pad_columns(wt: &[f32], n_in: usize, n_out: usize) -> PaddedWeight {
    let stride = padded_width(n_out);
    let mut out = vec![AlignedLanes([0.0; ROW_LANES]); n_in * stride / ROW_LANES];
    if n_out > 0 {
        for (dst, src) in out
            .chunks_exact_mut(stride / ROW_LANES)
            .zip(wt.chunks_exact(n_out))
        {
            for (lanes, chunk) in dst.iter_mut().zip(src.chunks(ROW_LANES)) {
                lanes.0[..chunk.len()].copy_from_slice(chunk);
            }
        }
    }
    PaddedWeight(out)
}

/// Reusable space for the row kernel's list of non-zero inputs.
#[derive(Debug, Default)]
pub(crate) struct RowScratch {
    index: Vec<u32>,
    value: Vec<f32>,
}

/// `y = bias + x · wt`, then ReLU when `relu`, for one row. `wt` is
/// `[x.len()][padded_width(y.len())]` (see [`pad_columns`]).
pub(crate) fn dense_row(
    wt: &[f32],
    bias: &[f32],
    x: &[f32],
    y: &mut [f32],
    relu: bool,
    scratch: &mut RowScratch,
) {
    assert_eq!(
        wt.len(),
        x.len() * padded_width(y.len()),
        "dense_row: wt length"
    );
    assert_eq!(bias.len(), y.len(), "dense_row: bias length");
    // The non-zero inputs are listed first, without branches, so the weight rows of zero
    // inputs (raw zero pixels, ReLU-zeroed activations: about half of them) are skipped
    // without a mispredicted branch per input and block.
    let active = list_active(x, scratch);
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

/// The row kernel with AVX-512 intrinsics: the same passes as [`dense_row_portable`], with
/// the accumulators as `__m512` values (compiled from plain Rust, the array of accumulators
/// was written back to the stack on every input) and the last vector's bias load and
/// output store masked to the real width.
///
/// # Safety
/// The CPU must support AVX-512F; `wt.len()` must be at least `(max(index) + 1) ×
/// padded_width(y.len())` and `bias.len() == y.len()` (`dense_row` checks both: every index
/// is below `x.len()`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dense_row_avx512(
    wt: &[f32],
    bias: &[f32],
    index: &[u32],
    value: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    let vectors = padded_width(y.len()) / ROW_LANES;
    let mut v = 0;
    // SAFETY (all calls): v + VECS ≤ vectors; the rest is the caller's contract.
    while v + 4 <= vectors {
        unsafe { dense_row_pass_avx512::<4>(wt, bias, index, value, y, relu, v) };
        v += 4;
    }
    match vectors - v {
        1 => unsafe { dense_row_pass_avx512::<1>(wt, bias, index, value, y, relu, v) },
        2 => unsafe { dense_row_pass_avx512::<2>(wt, bias, index, value, y, relu, v) },
        3 => unsafe { dense_row_pass_avx512::<3>(wt, bias, index, value, y, relu, v) },
        _ => {}
    }
}

/// One pass of [`dense_row_avx512`]: outputs `v0 · 16 .. (v0 + VECS) · 16`.
///
/// # Safety
/// As for [`dense_row_avx512`], and `(v0 + VECS) · 16 ≤ padded_width(y.len())`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn dense_row_pass_avx512<const VECS: usize>(
    wt: &[f32],
    bias: &[f32],
    index: &[u32],
    value: &[f32],
    y: &mut [f32],
    relu: bool,
    v0: usize,
) {
    use std::arch::x86_64::*;
    let n_out = y.len();
    let stride = padded_width(n_out);
    let start = v0 * ROW_LANES;
    // The outputs of vector k that exist: a full mask but for the last vector.
    let mask = |k: usize| -> __mmask16 {
        let from = start + k * ROW_LANES;
        let live = n_out.saturating_sub(from).min(ROW_LANES);
        ((1u32 << live) - 1) as __mmask16
    };
    let mut acc = [_mm512_setzero_ps(); VECS];
    for (k, a) in acc.iter_mut().enumerate() {
        // SAFETY: the mask covers only outputs below n_out = bias.len().
        *a = unsafe { _mm512_maskz_loadu_ps(mask(k), bias.as_ptr().add(start + k * ROW_LANES)) };
    }
    for (&i, &xi) in index.iter().zip(value) {
        // SAFETY: i is a row of wt (caller's contract) and start + VECS · 16 ≤ stride, so
        // the VECS vectors lie inside that row.
        let row = unsafe { wt.as_ptr().add(i as usize * stride + start) };
        let x = _mm512_set1_ps(xi);
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: see above.
            let w = unsafe { _mm512_loadu_ps(row.add(k * ROW_LANES)) };
            *a = _mm512_fmadd_ps(w, x, *a);
        }
    }
    for (k, a) in acc.iter().enumerate() {
        let out = if relu {
            _mm512_max_ps(*a, _mm512_setzero_ps())
        } else {
            *a
        };
        // SAFETY: the mask covers only outputs below n_out = y.len().
        unsafe { _mm512_mask_storeu_ps(y.as_mut_ptr().add(start + k * ROW_LANES), mask(k), out) };
    }
}

/// Lists the non-zero inputs of `x` (index and value) at the front of `scratch`; returns
/// how many there are.
fn list_active(x: &[f32], scratch: &mut RowScratch) -> usize {
    scratch.index.resize(x.len(), 0);
    scratch.value.resize(x.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above; both lists hold
            // x.len() values (resized above).
            return unsafe { list_active_avx512(x, &mut scratch.index, &mut scratch.value) };
        }
    }
    list_active_portable(x, &mut scratch.index, &mut scratch.value)
}

/// [`list_active`] without branches: every input is written at the next free place, which
/// only advances past the non-zero ones.
fn list_active_portable(x: &[f32], index: &mut [u32], value: &mut [f32]) -> usize {
    let mut active = 0;
    for (i, &xi) in x.iter().enumerate() {
        index[active] = i as u32;
        value[active] = xi;
        active += usize::from(xi != 0.0);
    }
    active
}

/// [`list_active`] sixteen inputs at a time with AVX-512's compress-store (the portable
/// loop took about a sixth of a single row of the pruned model).
///
/// # Safety
/// The CPU must support AVX-512F; `index` and `value` must hold at least `x.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn list_active_avx512(x: &[f32], index: &mut [u32], value: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    debug_assert!(index.len() >= x.len() && value.len() >= x.len());
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut active = 0usize;
    let mut start = 0usize;
    while start < x.len() {
        let live = (x.len() - start).min(ROW_LANES);
        let load = ((1u32 << live) - 1) as __mmask16;
        // SAFETY: the mask covers only values below x.len().
        let v = unsafe { _mm512_maskz_loadu_ps(load, x.as_ptr().add(start)) };
        let nonzero = _mm512_mask_cmp_ps_mask::<_CMP_NEQ_UQ>(load, v, _mm512_setzero_ps());
        let ids = _mm512_add_epi32(lanes, _mm512_set1_epi32(start as i32));
        // SAFETY: at most `live` values are stored from `active` ≤ start, so the writes
        // end at or before start + live ≤ x.len(), inside both lists.
        unsafe {
            _mm512_mask_compressstoreu_ps(value.as_mut_ptr().add(active).cast(), nonzero, v);
            _mm512_mask_compressstoreu_epi32(index.as_mut_ptr().add(active).cast(), nonzero, ids);
        }
        active += nonzero.count_ones() as usize;
        start += live;
    }
    active
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
/// FMA and a slow library call without it. The outputs go in passes of four vectors (64),
/// then one pass of the one to three vectors left, all over the padded weight rows.
#[inline(always)]
fn dense_row_portable<const FUSED: bool>(
    wt: &[f32],
    bias: &[f32],
    index: &[u32],
    value: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    let vectors = padded_width(y.len()) / ROW_LANES;
    let mut v = 0;
    while v + 4 <= vectors {
        dense_row_pass::<FUSED, 4>(wt, bias, index, value, y, relu, v);
        v += 4;
    }
    match vectors - v {
        1 => dense_row_pass::<FUSED, 1>(wt, bias, index, value, y, relu, v),
        2 => dense_row_pass::<FUSED, 2>(wt, bias, index, value, y, relu, v),
        3 => dense_row_pass::<FUSED, 3>(wt, bias, index, value, y, relu, v),
        _ => {}
    }
}

/// Outputs `v0 · 16 .. (v0 + VECS) · 16` (those below `y.len()`) of [`dense_row_portable`],
/// with `VECS` accumulator vectors kept in registers across the inputs.
#[inline(always)]
fn dense_row_pass<const FUSED: bool, const VECS: usize>(
    wt: &[f32],
    bias: &[f32],
    index: &[u32],
    value: &[f32],
    y: &mut [f32],
    relu: bool,
    v0: usize,
) {
    let n_out = y.len();
    let stride = padded_width(n_out);
    let start = v0 * ROW_LANES;
    let end = (start + VECS * ROW_LANES).min(n_out);
    let mut acc = [[0f32; ROW_LANES]; VECS];
    for (k, b) in bias[start..end].iter().enumerate() {
        acc[k / ROW_LANES][k % ROW_LANES] = *b;
    }
    for (&i, &xi) in index.iter().zip(value) {
        let row = i as usize * stride + start;
        // `get` rather than indexing: a panic path inside the loop made the compiler store
        // the accumulators to memory on every input. `dense_row` checked the length.
        let Some(w) = wt.get(row..row + VECS * ROW_LANES) else {
            continue;
        };
        for (a, wc) in acc.iter_mut().zip(w.chunks_exact(ROW_LANES)) {
            let Ok(wc) = <&[f32; ROW_LANES]>::try_from(wc) else {
                continue;
            };
            for (a, &wv) in a.iter_mut().zip(wc) {
                *a = if FUSED {
                    wv.mul_add(xi, *a)
                } else {
                    *a + wv * xi
                };
            }
        }
    }
    for (out, a) in y[start..end].chunks_mut(ROW_LANES).zip(&acc) {
        finish(&a[..out.len()], out, relu);
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

/// A sparse weight stored twice, once per access order the kernels need: by input (for
/// the single-row kernel, which skips the inputs that are zero) and by output (for the
/// batch kernel, which keeps one output's accumulators in registers).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SparseWeight {
    pub(crate) n_in: usize,
    pub(crate) n_out: usize,
    /// By input: the entries of input `i` are `by_input_ptr[i]..by_input_ptr[i + 1]`.
    by_input_ptr: Vec<u32>,
    by_input_out: Vec<u32>,
    by_input_val: Vec<f32>,
    /// By output: the entries of output `o` are `by_output_ptr[o]..by_output_ptr[o + 1]`.
    by_output_ptr: Vec<u32>,
    by_output_in: Vec<u32>,
    by_output_val: Vec<f32>,
}

impl SparseWeight {
    /// The non-zeros of a dense `[n_in][n_out]` weight (`wt[i * n_out + o]`). The by-input
    /// order (for [`sparse_row`]) is only built when `for_rows`; without it `sparse_row`
    /// must not be called, and the weight takes half the memory.
    pub(crate) fn from_in_out(
        wt: &[f32],
        n_in: usize,
        n_out: usize,
        for_rows: bool,
    ) -> SparseWeight {
        assert_eq!(
            wt.len(),
            n_in * n_out,
            "SparseWeight: wt has the wrong length"
        );
        let mut by_input_ptr = Vec::with_capacity(n_in + 1);
        let mut by_input_out = Vec::new();
        let mut by_input_val = Vec::new();
        by_input_ptr.push(0);
        for i in (0..n_in).filter(|_| for_rows) {
            for o in 0..n_out {
                let w = wt[i * n_out + o];
                if w != 0.0 {
                    by_input_out.push(o as u32);
                    by_input_val.push(w);
                }
            }
            by_input_ptr.push(by_input_out.len() as u32);
        }
        let mut by_output_ptr = Vec::with_capacity(n_out + 1);
        let mut by_output_in = Vec::with_capacity(by_input_out.len());
        let mut by_output_val = Vec::with_capacity(by_input_out.len());
        by_output_ptr.push(0);
        for o in 0..n_out {
            for i in 0..n_in {
                let w = wt[i * n_out + o];
                if w != 0.0 {
                    by_output_in.push(i as u32);
                    by_output_val.push(w);
                }
            }
            by_output_ptr.push(by_output_in.len() as u32);
        }
        SparseWeight {
            n_in,
            n_out,
            by_input_ptr,
            by_input_out,
            by_input_val,
            by_output_ptr,
            by_output_in,
            by_output_val,
        }
    }

    /// The number of stored (non-zero) weights.
    #[cfg(test)]
    pub(crate) fn nnz(&self) -> usize {
        self.by_output_val.len()
    }

    /// Bytes of weight data held in memory (both orders).
    pub(crate) fn resident_bytes(&self) -> usize {
        4 * (self.by_input_ptr.len()
            + self.by_input_out.len()
            + self.by_input_val.len()
            + self.by_output_ptr.len()
            + self.by_output_in.len()
            + self.by_output_val.len())
    }
}

/// `y = bias + W x` for one row with a sparse weight, then ReLU when `relu`: a scatter of
/// each non-zero input's weights into the outputs. The non-zero inputs are listed first,
/// without branches (as in [`dense_row`]), because about half the inputs are zero in an
/// order no branch predictor guesses.
pub(crate) fn sparse_row(
    w: &SparseWeight,
    bias: &[f32],
    x: &[f32],
    y: &mut [f32],
    relu: bool,
    scratch: &mut RowScratch,
) {
    assert_eq!(x.len(), w.n_in, "sparse_row: x length");
    assert_eq!(y.len(), w.n_out, "sparse_row: y length");
    assert_eq!(bias.len(), w.n_out, "sparse_row: bias length");
    assert_eq!(
        w.by_input_ptr.len(),
        w.n_in + 1,
        "sparse_row: built without rows"
    );
    y.copy_from_slice(bias);
    let active = list_active(x, scratch);
    for (&i, &xi) in scratch.index[..active].iter().zip(&scratch.value[..active]) {
        let i = i as usize;
        let (start, end) = (w.by_input_ptr[i] as usize, w.by_input_ptr[i + 1] as usize);
        let outs = &w.by_input_out[start..end];
        let vals = &w.by_input_val[start..end];
        for (&o, &wv) in outs.iter().zip(vals) {
            // SAFETY: `SparseWeight::from_in_out` stores only outputs `o < n_out`, and
            // `y.len() == n_out` is asserted above, so the index is in bounds; skipping the
            // check here keeps the scatter one load, one multiply-add and one store.
            unsafe {
                *y.get_unchecked_mut(o as usize) += wv * xi;
            }
        }
    }
    if relu {
        for v in y.iter_mut() {
            *v = v.max(0.0);
        }
    }
}

/// An int8 weight laid out for `u8 × i8` dot products with `i32` accumulation (AVX-512
/// VNNI's `vpdpbusd`; AVX2's `vpmaddwd`, each group's codes for four outputs widened to one
/// register; or the scalar loop computing the same integers): input slots in groups of four, `q4[(g · n_out_pad + o) · 4 + k]` = the weight of the input in slot `4g + k`
/// into output `o`, zero-padded to whole groups and to a multiple of 16 outputs.
///
/// The inputs fall into one or more *segments*: the inputs sharing each output's scale and
/// zero point (one segment for a scale per output or per tensor; with grouped scales, the
/// inputs between two group boundaries). Each segment starts on a group of four, so one
/// dot product over its groups gives the integer sum its scale multiplies; an input's slot
/// is its position unless some segment's length is not a multiple of four.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Int8Weight {
    pub(crate) n_in: usize,
    pub(crate) n_out: usize,
    n_groups: usize,
    n_out_pad: usize,
    q4: Codes,
    /// Each segment's scale per output, `[segment][n_out_pad]` (zero-padded).
    scale: Vec<f32>,
    /// One segment: `Σᵢ q[i][o]` per output, for the activations' zero point (exact, in
    /// integers). Several: empty.
    colsum: Vec<i32>,
    /// Several segments: `Σₛ scaleₛ[o] · Σᵢ∈ₛ q[i][o]` per output, the same term once the
    /// segments' sums are scaled. One: empty.
    scaled_colsum: Vec<f32>,
    /// Each segment's groups of four slots, `start..end`, and its number of inputs.
    segments: Vec<(u32, u32, u32)>,
    /// Each input's slot, where that is not its position.
    slots: Option<Vec<u32>>,
    /// A pruned layer's non-zero codes by output, for its batches (see
    /// [`Int8Weight::with_sparse_batches`]); `None` for the dense kernels only.
    sparse: Option<SparseCodes>,
    /// Codes of at most 64 in magnitude (4-bit ones: at most 8): how many groups of four
    /// the AVX2 kernel may sum in `i16` before widening them ([`int8_dot_avx2_small`]).
    /// `None` for larger codes.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    small_run: Option<usize>,
}

/// The codes of [`Int8Weight`] in its layout: one a byte, or 4-bit codes two a byte.
#[derive(Debug, Clone, PartialEq)]
enum Codes {
    Bytes(Vec<i8>),
    /// Codes of −8..=7 stored as `code + 8`, each block of 64 (16 outputs of a group) in 32
    /// bytes: byte `j` holds code `j` in its low half and code `32 + j` in its high half, so
    /// one 32-byte load, a mask and a shift give two registers of eight outputs each
    /// ([`int8_dot_avx2_small`]).
    Nibbles(Vec<u8>),
}

impl Codes {
    /// The code at `index` of the one-a-byte layout.
    fn get(&self, index: usize) -> i8 {
        match self {
            Codes::Bytes(q) => q[index],
            Codes::Nibbles(n) => {
                let (block, j) = (index / 64, index % 64);
                let byte = n[block * 32 + j % 32];
                let half = if j < 32 { byte & 0x0F } else { byte >> 4 };
                half as i8 - 8
            }
        }
    }

    /// The codes one a byte. Only the AVX2 kernel for small codes and the portable one read
    /// packed codes; `int8_dot_on` sends packed weights to those alone.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn one_a_byte(&self) -> &[i8] {
        match self {
            Codes::Bytes(q) => q,
            Codes::Nibbles(_) => unreachable!("packed 4-bit codes reach only their own kernels"),
        }
    }

    /// Bytes held.
    fn bytes(&self) -> usize {
        match self {
            Codes::Bytes(q) => q.len(),
            Codes::Nibbles(n) => n.len(),
        }
    }
}

/// The non-zero codes of a one-segment int8 weight, by output: those of output `o` are
/// `ptr[o]..ptr[o + 1]`, each with its input slot. Batches of a pruned layer sum only these
/// ([`int8_sparse_layer_t`]) instead of every code of the dense layout.
#[derive(Debug, Clone, PartialEq)]
struct SparseCodes {
    ptr: Vec<u32>,
    slot: Slots,
    code: Vec<i8>,
}

/// The input slot of each non-zero code: a byte where the layer has at most 256 slots (every
/// compacted layer of the pruned digits models; it saves a byte a code, about a tenth of
/// the 90 % pruned + int8 model's resident bytes), else two.
#[derive(Debug, Clone, PartialEq)]
enum Slots {
    Byte(Vec<u8>),
    Wide(Vec<u16>),
}

impl Slots {
    /// Bytes held.
    fn bytes(&self) -> usize {
        match self {
            Slots::Byte(s) => s.len(),
            Slots::Wide(s) => 2 * s.len(),
        }
    }
}

/// `2²⁴`: below it every integer is an `f32`, so sums of `u8 × i8` products that stay
/// below it are exact in `f32` whatever the order of the additions.
const F32_EXACT: i64 = 1 << 24;

/// Outputs per vector of the int8 kernel (sixteen `i32` lanes).
const INT8_LANES: usize = 16;

/// For codes of at most `max_abs` in magnitude, how many groups of four inputs `vpmaddubsw`
/// may sum into `i16` lanes exactly: each group adds two `u8 × code` products to a lane, at
/// most `2 · 255 · max_abs`, and neither one instruction's sums nor their running total
/// may pass `i16::MAX`. `None` when one instruction could already saturate (`max_abs` > 64).
fn small_codes_run(max_abs: i32) -> Option<usize> {
    let step = 2 * 255 * max_abs.max(1);
    (step <= i32::from(i16::MAX)).then(|| (i32::from(i16::MAX) / step) as usize)
}

impl Int8Weight {
    /// From `q[i * n_out + o]` (`[n_in][n_out]`), one segment (a scale per output).
    #[cfg(test)]
    pub(crate) fn from_in_out(q: &[i8], n_in: usize, n_out: usize, scale: &[f32]) -> Int8Weight {
        Int8Weight::with_segments(q, n_in, n_out, &[], 1, scale)
    }

    /// From `q[i * n_out + o]` (`[n_in][n_out]`), input `i` in segment `segment_of[i]` (of
    /// `n_seg`; `segment_of` may be empty when `n_seg` is 1), and each segment's scale per
    /// output, `scale[s * n_out + o]`.
    pub(crate) fn with_segments(
        q: &[i8],
        n_in: usize,
        n_out: usize,
        segment_of: &[u32],
        n_seg: usize,
        scale: &[f32],
    ) -> Int8Weight {
        assert_eq!(q.len(), n_in * n_out, "Int8Weight: q has the wrong length");
        let n_seg = n_seg.max(1);
        assert_eq!(
            scale.len(),
            n_seg * n_out,
            "Int8Weight: one scale per segment and output"
        );
        if n_seg > 1 {
            assert_eq!(segment_of.len(), n_in, "Int8Weight: one segment per input");
            assert!(
                segment_of.iter().all(|&s| (s as usize) < n_seg),
                "Int8Weight: segment out of range"
            );
        }
        let seg = |i: usize| {
            if n_seg == 1 {
                0
            } else {
                segment_of[i] as usize
            }
        };
        // Slots: each segment's inputs in order, from a multiple of four.
        let mut count = vec![0usize; n_seg];
        for i in 0..n_in {
            count[seg(i)] += 1;
        }
        let mut start = Vec::with_capacity(n_seg);
        let mut segments = Vec::with_capacity(n_seg);
        let mut next = 0usize;
        for &c in &count {
            start.push(next);
            let end = next + c.div_ceil(4) * 4;
            segments.push(((next / 4) as u32, (end / 4) as u32, c as u32));
            next = end;
        }
        let slot: Vec<u32> = (0..n_in)
            .map(|i| {
                let s = &mut start[seg(i)];
                *s += 1;
                (*s - 1) as u32
            })
            .collect();
        let n_groups = next / 4;
        let n_out_pad = n_out.div_ceil(INT8_LANES) * INT8_LANES;
        let mut q4 = vec![0i8; n_groups * n_out_pad * 4];
        let mut colsum = vec![0i32; n_seg * n_out];
        for (i, &p) in slot.iter().enumerate() {
            let p = p as usize;
            for o in 0..n_out {
                let v = q[i * n_out + o];
                q4[((p / 4) * n_out_pad + o) * 4 + p % 4] = v;
                colsum[seg(i) * n_out + o] += i32::from(v);
            }
        }
        let identity = slot.iter().enumerate().all(|(i, &p)| p as usize == i);
        let mut padded = vec![0f32; n_seg * n_out_pad];
        for (row, s) in padded
            .chunks_exact_mut(n_out_pad)
            .zip(scale.chunks_exact(n_out.max(1)))
        {
            row[..n_out].copy_from_slice(s);
        }
        let (colsum, scaled_colsum) = if n_seg == 1 {
            (colsum, Vec::new())
        } else {
            let scaled = (0..n_out)
                .map(|o| {
                    (0..n_seg)
                        .map(|s| scale[s * n_out + o] * colsum[s * n_out + o] as f32)
                        .sum()
                })
                .collect();
            (Vec::new(), scaled)
        };
        let small_run = small_codes_run(q.iter().map(|&v| i32::from(v).abs()).max().unwrap_or(0));
        Int8Weight {
            n_in,
            n_out,
            n_groups,
            n_out_pad,
            small_run,
            q4: Codes::Bytes(q4),
            scale: padded,
            colsum,
            scaled_colsum,
            segments,
            slots: (!identity).then_some(slot),
            sparse: None,
        }
    }

    /// Keeps the non-zero codes by output beside the dense layout when at most
    /// `max_density` of the codes are non-zero, so that batches sum only those
    /// ([`int8_sparse_layer_t`]): a pruned layer's zeros otherwise cost the dense kernels as
    /// much work as its weights. Only for one segment (a scale per output or per tensor),
    /// and only when every output's sums are exact in `f32` (`255 · Σᵢ |q[i][o]| < 2²⁴`),
    /// so that they are the same integers the dense kernels give and rows and batches
    /// still agree exactly.
    pub(crate) fn with_sparse_batches(mut self, max_density: f64) -> Int8Weight {
        let stride = self.row_stride();
        if self.segments.len() != 1 || stride > usize::from(u16::MAX) + 1 {
            return self;
        }
        let pad = self.n_out_pad;
        let mut ptr = Vec::with_capacity(self.n_out + 1);
        let mut slot = Vec::new();
        let mut codes = Vec::new();
        ptr.push(0);
        for o in 0..self.n_out {
            let mut bound = 0i64;
            for p in 0..stride {
                let q = self.q4.get(((p / 4) * pad + o) * 4 + p % 4);
                if q != 0 {
                    slot.push(p as u16);
                    codes.push(q);
                    bound += i64::from(q).abs();
                }
            }
            if 255 * bound >= F32_EXACT {
                return self;
            }
            ptr.push(codes.len() as u32);
        }
        let cells = (self.n_in * self.n_out).max(1);
        if codes.len() as f64 / cells as f64 > max_density {
            return self;
        }
        let slot = if stride <= 256 {
            Slots::Byte(slot.iter().map(|&p| p as u8).collect())
        } else {
            Slots::Wide(slot)
        };
        self.sparse = Some(SparseCodes {
            ptr,
            slot,
            code: codes,
        });
        self
    }

    /// Holds 4-bit codes (every code in −8..=7) two a byte, half the bytes of one a byte; the
    /// AVX2 kernel unpacks them as it loads them, into the same integers. Other codes stay
    /// as they are. The VNNI kernel does not read this layout: a packed weight runs on the
    /// AVX2 one there (`engine` packs only where VNNI is missing).
    pub(crate) fn with_packed_nibbles(mut self) -> Int8Weight {
        let Codes::Bytes(q) = &self.q4 else {
            return self;
        };
        if !q.iter().all(|v| (-8..=7).contains(v)) {
            return self;
        }
        // n_out_pad is a multiple of 16, so every group is a whole number of 64-code blocks.
        let mut packed = vec![0u8; q.len() / 2];
        for (block, out) in q.chunks_exact(64).zip(packed.chunks_exact_mut(32)) {
            for (j, byte) in out.iter_mut().enumerate() {
                let (lo, hi) = ((block[j] + 8) as u8, (block[32 + j] + 8) as u8);
                *byte = lo | (hi << 4);
            }
        }
        self.q4 = Codes::Nibbles(packed);
        self
    }

    /// Whether the codes are held two a byte (see [`Int8Weight::with_packed_nibbles`]).
    pub(crate) fn packed_nibbles(&self) -> bool {
        matches!(self.q4, Codes::Nibbles(_))
    }

    /// Whether batches sum only the non-zero codes (see [`Int8Weight::with_sparse_batches`]).
    pub(crate) fn sparse_batches(&self) -> bool {
        self.sparse.is_some()
    }

    /// Bytes held in memory.
    pub(crate) fn resident_bytes(&self) -> usize {
        self.q4.bytes()
            + 4 * (self.scale.len() + self.colsum.len() + self.scaled_colsum.len())
            + 12 * self.segments.len()
            + self.slots.as_ref().map_or(0, |s| 4 * s.len())
            + self
                .sparse
                .as_ref()
                .map_or(0, |s| 4 * s.ptr.len() + s.slot.bytes() + s.code.len())
    }

    /// The padded input width of one quantized row.
    pub(crate) fn row_stride(&self) -> usize {
        4 * self.n_groups
    }

    /// The number of segments (scales per output).
    pub(crate) fn n_segments(&self) -> usize {
        self.segments.len()
    }
}

/// Scratch space of [`int8_layer`] and [`int8_sparse_layer_t`], reused between calls.
#[derive(Debug, Default)]
pub(crate) struct Int8Scratch {
    xq: Vec<u8>,
    acc: Vec<i32>,
    /// Several segments: each row's scaled sums.
    scaled: Vec<f32>,
    active: Vec<u32>,
    quants: Vec<RowQuant>,
    /// A row quantized in input order, before it goes to its slots.
    staged: Vec<u8>,
    /// With zero points: each row's quantized sum over each segment's inputs,
    /// `[row][segment]`.
    sums: Vec<f32>,
    /// Rows' inputs widened for the AVX2 kernel (see [`int8_dot`]).
    wide: Vec<u64>,
    /// A sparse batch's quantized levels, transposed (see [`int8_sparse_layer_t`]).
    lanes: Vec<f32>,
}

/// An int8 layer's outputs for `rows` rows of `x` (row-major, `w.n_in` each) into `y`
/// (`w.n_out` each): each row quantized to `u8` ([`quantize_row`]: over `grid`, or the row's
/// own range), then one [`int8_dot`] in which each segment's sums take that segment's scale,
/// then the zero points (`zero`, `[segment][n_out]`, empty when all are 0) and the bias. A
/// single row sums only its non-zero groups. Rows and batches go through the same
/// arithmetic, so they give identical answers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn int8_layer(
    w: &Int8Weight,
    zero: &[f32],
    input_scale: Option<&[f32]>,
    grid: Option<ActivationGrid>,
    bias: &[f32],
    x: &[f32],
    rows: usize,
    y: &mut [f32],
    relu: bool,
    scratch: &mut Int8Scratch,
) {
    let n_seg = w.n_segments();
    assert!(
        zero.is_empty() || zero.len() == n_seg * w.n_out,
        "int8_layer: zero length"
    );
    let Int8Scratch {
        xq,
        acc,
        scaled,
        active,
        quants,
        staged,
        sums,
        wide,
        ..
    } = scratch;
    let stride = w.row_stride();
    // Every byte of a row is written below (`quantize_row` zeroes its padding).
    xq.resize(rows * stride, 0);
    quants.clear();
    sums.clear();
    for (row, q) in x
        .chunks_exact(w.n_in.max(1))
        .zip(xq.chunks_exact_mut(stride))
    {
        let quant = match &w.slots {
            None => quantize_row(row, input_scale, grid, q),
            Some(slots) => {
                staged.resize(w.n_in, 0);
                let quant = quantize_row(row, input_scale, grid, staged);
                q.fill(0);
                for (&p, &v) in slots.iter().zip(staged.iter()) {
                    q[p as usize] = v;
                }
                quant
            }
        };
        quants.push(quant);
        // With zero points: the sum of each segment's quantized inputs, `Σ xq − zx · n` (in
        // units of `sx`). The zero-point term then cancels the rounding the dot product sees,
        // so an output's error is bounded by `Σ |q − zero|` half steps; the exact `f32` sum
        // would leave it at `Σ |q|`, many times more for groups whose zero point is far from
        // 0 (a group of a pruned layer whose non-zeros share a sign).
        if !zero.is_empty() {
            for &(start, end, len) in &w.segments {
                let levels: u32 = q[4 * start as usize..4 * end as usize]
                    .iter()
                    .map(|&b| u32::from(b))
                    .sum();
                let centred = i64::from(levels) - i64::from(quant.zero) * i64::from(len);
                sums.push(centred as f32);
            }
        }
    }
    if rows == 1 {
        active_groups(xq, active);
    }
    int8_dot(
        w,
        xq,
        rows,
        (rows == 1).then_some(active.as_slice()),
        acc,
        scaled,
        wide,
    );
    let (n, pad) = (w.n_out, w.n_out_pad);
    for (r, (out, quant)) in y.chunks_exact_mut(n.max(1)).zip(quants.iter()).enumerate() {
        let zero_sums = (!zero.is_empty()).then(|| (zero, &sums[r * n_seg..(r + 1) * n_seg]));
        if n_seg == 1 {
            int8_finish_row(
                &w.colsum,
                &acc[r * pad..r * pad + n],
                *quant,
                zero_sums.map(|(z, s)| (z, s[0])),
                &w.scale[..n],
                bias,
                out,
                relu,
            );
        } else {
            int8_finish_scaled(
                w,
                &scaled[r * pad..r * pad + n],
                *quant,
                zero_sums,
                bias,
                out,
                relu,
            );
        }
    }
}

/// How one row of activations was quantized to `u8`: `x ≈ scale · (xq − zero)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowQuant {
    pub(crate) scale: f32,
    pub(crate) zero: i32,
}

/// The `u8` grid over a range of activations, widened to include 0 so that a zero (a ReLU's
/// or a pruned input's) stays exactly zero: `x ≈ scale · (xq − zero)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ActivationGrid {
    pub(crate) scale: f32,
    pub(crate) zero: i32,
}

impl ActivationGrid {
    /// The grid of 256 levels spanning `[min(lo, 0), max(hi, 0)]`.
    pub(crate) fn spanning(lo: f32, hi: f32) -> ActivationGrid {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let span = hi - lo;
        let scale = if span > 0.0 { span / 255.0 } else { 1.0 };
        let zero = (-lo / scale).round().clamp(0.0, 255.0) as i32;
        ActivationGrid { scale, zero }
    }

    /// Whether a value's position on the grid (`value / scale + zero`) lies within half a
    /// step of it, so that rounding, not clamping, decides its level.
    pub(crate) fn within(position: f32) -> bool {
        (-0.5..255.5).contains(&position)
    }

    /// Whether `value` is within half a step of the grid, computed as the kernel does.
    pub(crate) fn holds(&self, value: f32) -> bool {
        ActivationGrid::within(value * (1.0 / self.scale) + self.zero as f32)
    }
}

/// Quantizes one row (times `input_scale` per value when given) to `u8` in `xq` (of
/// [`Int8Weight::row_stride`] bytes; the padding is zeroed). With a `grid` (static
/// quantization, calibrated ranges) values are rounded onto it, unless one falls outside it:
/// clamping that value would cost more than the grid's half step, so such a row is quantized
/// as without a grid. Without one (dynamic) the grid spans the row's own range: `[0, max]`
/// for a non-negative row (ReLU outputs), else `[min, max]` with a zero point.
pub(crate) fn quantize_row(
    x: &[f32],
    input_scale: Option<&[f32]>,
    grid: Option<ActivationGrid>,
    xq: &mut [u8],
) -> RowQuant {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU supports AVX-512F/BW, checked just above.
            return unsafe { quantize_row_avx512(x, input_scale, grid, xq) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { quantize_row_avx2(x, input_scale, grid, xq) };
        }
    }
    quantize_row_portable(x, input_scale, grid, xq)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_row_avx2(
    x: &[f32],
    input_scale: Option<&[f32]>,
    grid: Option<ActivationGrid>,
    xq: &mut [u8],
) -> RowQuant {
    quantize_row_portable(x, input_scale, grid, xq)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
fn quantize_row_avx512(
    x: &[f32],
    input_scale: Option<&[f32]>,
    grid: Option<ActivationGrid>,
    xq: &mut [u8],
) -> RowQuant {
    quantize_row_portable(x, input_scale, grid, xq)
}

/// [`quantize_row`] in plain Rust, inlined into the wrappers above so that its loops
/// vectorize for the instruction set there.
#[inline(always)]
fn quantize_row_portable(
    x: &[f32],
    input_scale: Option<&[f32]>,
    grid: Option<ActivationGrid>,
    xq: &mut [u8],
) -> RowQuant {
    match (input_scale, grid) {
        (Some(s), None) => quantize_row_lanes::<true>(x, s, xq),
        (None, None) => quantize_row_lanes::<false>(x, x, xq),
        (Some(s), Some(grid)) => quantize_row_on_grid::<true>(x, s, grid, xq),
        (None, Some(grid)) => quantize_row_on_grid::<false>(x, x, grid, xq),
    }
}

/// `1.5 · 2²³`: adding it to an `f32` in `[0, 2²²)` rounds it to an integer held in the
/// low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Lanes of the range reductions in [`quantize_row_lanes`].
const QUANT_LANES: usize = 16;

/// `t` (in `[0, 255]`) rounded to nearest, ties to even, by adding 1.5 · 2²³: the sum's
/// last mantissa bits are then the rounded integer. Bit operations vectorize; `f32::round`
/// is a library call on baseline x86-64, and a saturating `as i32` (NaN → 0) compiled to a
/// scalar compare and conversion per value.
#[inline(always)]
fn round_to_u8(t: f32) -> u8 {
    ((t + ROUND_MAGIC).to_bits() & 0xff) as u8
}

/// [`quantize_row`] without a grid, with the input scale applied when `SCALED` (else `s` is
/// ignored). The range is reduced over [`QUANT_LANES`] independent lanes with plain
/// comparisons, so it compiles to vector min/max: a single running `f32::min` and
/// `f32::max` is a chain of dependent scalar instructions (with NaN handling) that, with a
/// sum beside it, took about 70 % of an int8 batch before. The inputs are finite (the engine
/// checks requests), so the comparisons need no NaN handling.
#[inline(always)]
fn quantize_row_lanes<const SCALED: bool>(x: &[f32], s: &[f32], xq: &mut [u8]) -> RowQuant {
    let n = x.len();
    let s = if SCALED { &s[..n] } else { x };
    let value = |xv: f32, sv: f32| if SCALED { xv * sv } else { xv };
    let mut lo = [0f32; QUANT_LANES];
    let mut hi = [0f32; QUANT_LANES];
    let mut xc = x.chunks_exact(QUANT_LANES);
    let mut sc = s.chunks_exact(QUANT_LANES);
    for (xs, ss) in (&mut xc).zip(&mut sc) {
        for k in 0..QUANT_LANES {
            let v = value(xs[k], ss[k]);
            lo[k] = if v < lo[k] { v } else { lo[k] };
            hi[k] = if v > hi[k] { v } else { hi[k] };
        }
    }
    for (k, (&xv, &sv)) in xc.remainder().iter().zip(sc.remainder()).enumerate() {
        let v = value(xv, sv);
        lo[k] = if v < lo[k] { v } else { lo[k] };
        hi[k] = if v > hi[k] { v } else { hi[k] };
    }
    let lo = lo.iter().fold(0f32, |m, &v| if v < m { v } else { m });
    let hi = hi.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    let ActivationGrid { scale, zero } = ActivationGrid::spanning(lo, hi);
    let inv = 1.0 / scale;
    let offset = zero as f32;
    let (head, pad) = xq.split_at_mut(n.min(xq.len()));
    for ((q, &xv), &sv) in head.iter_mut().zip(x).zip(s) {
        *q = round_to_u8((value(xv, sv) * inv + offset).clamp(0.0, 255.0));
    }
    pad.fill(0);
    RowQuant { scale, zero }
}

/// [`quantize_row`] onto a calibrated grid, in one pass over the row: the rounded values and
/// the lowest and highest grid positions are computed together (there is no
/// range to find first, which is what makes static quantization cheaper than dynamic). A
/// position more than half a step off the grid means clamping would cost more than
/// rounding: the row is then quantized over its own range ([`quantize_row_lanes`]).
#[inline(always)]
fn quantize_row_on_grid<const SCALED: bool>(
    x: &[f32],
    s: &[f32],
    grid: ActivationGrid,
    xq: &mut [u8],
) -> RowQuant {
    let n = x.len();
    let s = if SCALED { &s[..n] } else { x };
    let value = |xv: f32, sv: f32| if SCALED { xv * sv } else { xv };
    let inv = 1.0 / grid.scale;
    let offset = grid.zero as f32;
    let mut lo = [offset; QUANT_LANES];
    let mut hi = [offset; QUANT_LANES];
    let (head, pad) = xq.split_at_mut(n.min(xq.len()));
    let mut qc = head.chunks_exact_mut(QUANT_LANES);
    let mut xc = x.chunks_exact(QUANT_LANES);
    let mut sc = s.chunks_exact(QUANT_LANES);
    // One value in lane `k`: its grid position's extremes and its level.
    let mut step = |k: usize, v: f32| -> u8 {
        let u = v * inv + offset;
        lo[k] = if u < lo[k] { u } else { lo[k] };
        hi[k] = if u > hi[k] { u } else { hi[k] };
        round_to_u8(u.clamp(0.0, 255.0))
    };
    for ((qs, xs), ss) in (&mut qc).zip(&mut xc).zip(&mut sc) {
        for k in 0..QUANT_LANES {
            qs[k] = step(k, value(xs[k], ss[k]));
        }
    }
    for (k, ((q, &xv), &sv)) in qc
        .into_remainder()
        .iter_mut()
        .zip(xc.remainder())
        .zip(sc.remainder())
        .enumerate()
    {
        *q = step(k, value(xv, sv));
    }
    let lo = lo.iter().fold(offset, |m, &v| if v < m { v } else { m });
    let hi = hi.iter().fold(offset, |m, &v| if v > m { v } else { m });
    if !ActivationGrid::within(lo) || !ActivationGrid::within(hi) {
        return quantize_row_lanes::<SCALED>(x, s, xq);
    }
    pad.fill(0);
    RowQuant {
        scale: grid.scale,
        zero: grid.zero,
    }
}

/// For `rows` quantized rows of [`Int8Weight::row_stride`] bytes each: with one segment,
/// `acc[r][o] = Σᵢ xq[r][i] · q[i][o]` (exact `i32`); with several, `scaled[r][o] = Σₛ
/// scaleₛ[o] · Σᵢ∈ₛ xq[r][i] · q[i][o]`, each segment's exact sum scaled and added in
/// segment order. Both are `rows × n_out_pad`; the other is left empty. With `active`
/// (sorted), only those groups of four are summed (the others must be all zero in every
/// row). `wide` is scratch.
pub(crate) fn int8_dot(
    w: &Int8Weight,
    xq: &[u8],
    rows: usize,
    active: Option<&[u32]>,
    acc: &mut Vec<i32>,
    scaled: &mut Vec<f32>,
    wide: &mut Vec<u64>,
) {
    int8_dot_on(w, xq, rows, active, acc, scaled, wide, IntKernel::here());
}

/// [`int8_dot`] on the given kernel, which the CPU must have. `wide` is scratch.
#[allow(clippy::too_many_arguments)]
fn int8_dot_on(
    w: &Int8Weight,
    xq: &[u8],
    rows: usize,
    active: Option<&[u32]>,
    acc: &mut Vec<i32>,
    scaled: &mut Vec<f32>,
    wide: &mut Vec<u64>,
    kernel: IntKernel,
) {
    let stride = w.row_stride();
    assert_eq!(xq.len(), rows * stride, "int8_dot: xq length");
    if let Some(groups) = active {
        assert!(
            groups.iter().all(|&g| (g as usize) < w.n_groups),
            "int8_dot: group out of range"
        );
        debug_assert!(groups.is_sorted(), "int8_dot: groups not sorted");
    }
    let single = w.segments.len() == 1;
    if single {
        // Every kernel stores each of a row's sums once (one segment), so whatever the
        // buffer held is overwritten: zeroing it first cost about 5 % of an int8 batch.
        acc.resize(rows * w.n_out_pad, 0);
        scaled.clear();
    } else {
        // Several segments add their scaled sums into it.
        acc.clear();
        scaled.clear();
        scaled.resize(rows * w.n_out_pad, 0.0);
    }
    if kernel == IntKernel::Portable {
        int8_dot_portable(w, active, xq, rows, acc, scaled);
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = wide;
    #[cfg(target_arch = "x86_64")]
    {
        let pad = w.n_out_pad;
        // Packed 4-bit codes run on the AVX2 kernel for small codes wherever the CPU has a
        // vector kernel (a VNNI CPU has AVX2 too).
        let small = (kernel == IntKernel::Avx2 && w.small_run.is_some()) || w.packed_nibbles();
        let mut r = 0;
        while r < rows {
            let (acc, scaled) = (
                acc.get_mut(r * pad..).unwrap_or_default(),
                scaled.get_mut(r * pad..).unwrap_or_default(),
            );
            let at = &xq[r * stride..];
            let four = r + 4 <= rows;
            if kernel == IntKernel::Avx2 && !small {
                // SAFETY: the CPU has AVX2 (the caller's contract).
                unsafe { widen_avx2(&at[..if four { 4 } else { 1 } * stride], wide) };
            }
            // SAFETY: the CPU has the kernel's instructions, AVX2 at least (the caller's
            // contract); the asserts above and the slicing here give the kernel's bounds
            // (see `int8_dot_vnni`, `int8_dot_avx2` and `int8_dot_avx2_small`).
            unsafe {
                match (small, kernel, four) {
                    (true, _, true) => int8_dot_avx2_small::<4>(w, active, at, acc, scaled),
                    (true, _, false) => int8_dot_avx2_small::<1>(w, active, at, acc, scaled),
                    (_, IntKernel::Vnni, true) => int8_dot_vnni::<4>(w, active, at, acc, scaled),
                    (_, IntKernel::Vnni, false) => int8_dot_vnni::<1>(w, active, at, acc, scaled),
                    (_, _, true) => int8_dot_avx2::<4>(w, active, wide, acc, scaled),
                    (_, _, false) => int8_dot_avx2::<1>(w, active, wide, acc, scaled),
                }
            }
            r += if four { 4 } else { 1 };
        }
    }
}

/// Whether the AVX2 integer kernels can run here (used where VNNI is missing).
fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the VNNI kernel can run here.
fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The groups of four slots of the segment `start..end` to sum: `None` for every one, or
/// those in the sorted `active` list.
fn listed_groups(active: Option<&[u32]>, start: u32, end: u32) -> Option<&[u32]> {
    active.map(|list| {
        let lo = list.partition_point(|&g| g < start);
        let hi = list.partition_point(|&g| g < end);
        &list[lo..hi]
    })
}

/// The safe scalar kernel: the same integers as the VNNI one, scaled the same way.
fn int8_dot_portable(
    w: &Int8Weight,
    active: Option<&[u32]>,
    xq: &[u8],
    rows: usize,
    acc: &mut [i32],
    scaled: &mut [f32],
) {
    let (stride, pad) = (w.row_stride(), w.n_out_pad);
    let single = w.segments.len() == 1;
    let mut sums = vec![0i32; pad];
    let unpacked: Vec<i8>;
    let q4 = match &w.q4 {
        Codes::Bytes(q) => q.as_slice(),
        Codes::Nibbles(_) => {
            unpacked = (0..w.n_groups * pad * 4).map(|k| w.q4.get(k)).collect();
            unpacked.as_slice()
        }
    };
    for r in 0..rows {
        for (s, &(start, end, _)) in w.segments.iter().enumerate() {
            sums.fill(0);
            let mut add_group = |g: usize| {
                let block = &q4[g * pad * 4..(g + 1) * pad * 4];
                for k in 0..4 {
                    let xv = i32::from(xq[r * stride + 4 * g + k]);
                    if xv == 0 {
                        continue;
                    }
                    for (a, quad) in sums.iter_mut().zip(block.chunks_exact(4)) {
                        *a += xv * i32::from(quad[k]);
                    }
                }
            };
            match listed_groups(active, start, end) {
                None => (start as usize..end as usize).for_each(&mut add_group),
                Some(list) => list.iter().for_each(|&g| add_group(g as usize)),
            }
            if single {
                acc[r * pad..(r + 1) * pad].copy_from_slice(&sums);
            } else {
                let scale = &w.scale[s * pad..(s + 1) * pad];
                for ((f, &a), &sc) in scaled[r * pad..(r + 1) * pad]
                    .iter_mut()
                    .zip(&sums)
                    .zip(scale)
                {
                    *f += sc * a as f32;
                }
            }
        }
    }
}

/// `ROWS` rows at once: each weight vector loaded once, multiplied into `ROWS`
/// accumulators; for each segment in turn, outputs in chunks of up to four vectors (64
/// outputs; one row: up to 16). Sums every group, or the `active` ones. One segment's sums are stored as they
/// are (`acc`); several are scaled and added up in `scaled` (see [`int8_dot`]).
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and AVX-512 VNNI; `xq` must hold at least
/// `ROWS × row_stride` bytes, `acc` (one segment) or `scaled` (several) at least `ROWS ×
/// n_out_pad` values, and every group in `active` must be below `n_groups`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int8_dot_vnni<const ROWS: usize>(
    w: &Int8Weight,
    active: Option<&[u32]>,
    xq: &[u8],
    acc: &mut [i32],
    scaled: &mut [f32],
) {
    debug_assert!(xq.len() >= ROWS * w.row_stride());
    debug_assert!(acc.len().max(scaled.len()) >= ROWS * w.n_out_pad);
    let vectors = w.n_out_pad / INT8_LANES;
    for (s, &(start, end, _)) in w.segments.iter().enumerate() {
        // The segment's groups are found once, then summed for every chunk of outputs.
        let listed = listed_groups(active, start, end);
        let mut v0 = 0;
        while v0 < vectors {
            // A fixed number of vectors per pass keeps every accumulator in a register: up
            // to 16 for one row (of 32 registers; its weights are used once, straight from
            // memory), so a layer of up to 256 outputs walks its groups once; 4 for four rows.
            let left = vectors - v0;
            let chunk = match left {
                16.. if ROWS == 1 => 16,
                8.. if ROWS == 1 => 8,
                4.. => 4,
                _ => 1,
            };
            // One monomorphized loop per kind of group list: the hot loop of a single row
            // walks a slice, a batch's a range.
            macro_rules! run {
                ($groups:expr) => {
                    // SAFETY: v0 + chunk ≤ vectors and s < segments; every group is below
                    // n_groups (the caller's contract for `active`, `segments` by
                    // construction); the rest is the caller's contract, passed on.
                    unsafe {
                        match chunk {
                            16 => int8_dot_vnni_block::<ROWS, 16, _>(
                                w, $groups, xq, acc, scaled, v0, s,
                            ),
                            8 => int8_dot_vnni_block::<ROWS, 8, _>(
                                w, $groups, xq, acc, scaled, v0, s,
                            ),
                            4 => int8_dot_vnni_block::<ROWS, 4, _>(
                                w, $groups, xq, acc, scaled, v0, s,
                            ),
                            _ => int8_dot_vnni_block::<ROWS, 1, _>(
                                w, $groups, xq, acc, scaled, v0, s,
                            ),
                        }
                    }
                };
            }
            match listed {
                None => run!(start as usize..end as usize),
                Some(list) => run!(list.iter().map(|&g| g as usize)),
            }
            v0 += chunk;
        }
    }
}

/// Outputs `v0 · 16 .. (v0 + BLOCKS) · 16` of segment `s` of [`int8_dot_vnni`].
///
/// # Safety
/// As for [`int8_dot_vnni`], `(v0 + BLOCKS) · 16 ≤ n_out_pad`, `s` below the number of
/// segments, and every group `groups` yields below `n_groups`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn int8_dot_vnni_block<const ROWS: usize, const BLOCKS: usize, G>(
    w: &Int8Weight,
    groups: G,
    xq: &[u8],
    acc: &mut [i32],
    scaled: &mut [f32],
    v0: usize,
    s: usize,
) where
    G: Iterator<Item = usize>,
{
    use std::arch::x86_64::*;
    let (stride, pad) = (w.row_stride(), w.n_out_pad);
    let mut sums = [[_mm512_setzero_si512(); BLOCKS]; ROWS];
    let q4 = w.q4.one_a_byte();
    for g in groups {
        // SAFETY: g < n_groups, so the group's n_out_pad × 4 bytes are inside q4, and
        // (v0 + BLOCKS) · 16 ≤ n_out_pad keeps every 64-byte load inside the group.
        let base = unsafe { q4.as_ptr().add((g * pad + v0 * INT8_LANES) * 4) };
        let mut wv = [_mm512_setzero_si512(); BLOCKS];
        for (b, slot) in wv.iter_mut().enumerate() {
            // SAFETY: see above.
            *slot = unsafe { _mm512_loadu_si512(base.add(b * 64).cast()) };
        }
        for (r, row_sums) in sums.iter_mut().enumerate() {
            // SAFETY: r < ROWS and 4g + 4 ≤ stride, inside xq (caller's contract).
            let x = unsafe {
                xq.as_ptr()
                    .add(r * stride + 4 * g)
                    .cast::<i32>()
                    .read_unaligned()
            };
            let x = _mm512_set1_epi32(x);
            for (sum, wb) in row_sums.iter_mut().zip(&wv) {
                *sum = _mm512_dpbusd_epi32(*sum, x, *wb);
            }
        }
    }
    let single = w.segments.len() == 1;
    for (r, row_sums) in sums.iter().enumerate() {
        for (b, sum) in row_sums.iter().enumerate() {
            let at = r * pad + (v0 + b) * INT8_LANES;
            if single {
                // SAFETY: r < ROWS and (v0 + b + 1) · 16 ≤ n_out_pad, inside acc.
                unsafe { _mm512_storeu_si512(acc.as_mut_ptr().add(at).cast(), *sum) };
            } else {
                // The portable kernel's `f += scale · a`, unfused, so both round alike.
                // SAFETY: as above, inside scaled; s < segments keeps the scale load inside
                // w.scale (segments × n_out_pad).
                unsafe {
                    let f = scaled.as_mut_ptr().add(at);
                    let scale =
                        _mm512_loadu_ps(w.scale.as_ptr().add(s * pad + (v0 + b) * INT8_LANES));
                    let term = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(*sum));
                    _mm512_storeu_ps(f, _mm512_add_ps(_mm512_loadu_ps(f), term));
                }
            }
        }
    }
}

/// The AVX2 form of [`int8_dot_vnni`], for CPUs without VNNI: the same exact integers
/// from `vpmaddwd`, which multiplies pairs of `i16` and adds each pair into an `i32`.
/// Each group's codes for four outputs (16 bytes) are sign-extended to `i16`, the row's
/// four inputs zero-extended and repeated, so one instruction gives every output's two
/// half-sums (inputs 0–1 and 2–3); the halves are added once, after the last group.
/// (`vpmaddubsw` multiplies the bytes directly, but it saturates its `i16` sums: 255 · 127
/// twice does not fit.) `ROWS` rows at once share each widened code vector; the rows'
/// inputs come widened too (`wide`: each group of four as four `u16` in a word, `ROWS ×
/// n_groups` words), so that each is one broadcast load.
///
/// # Safety
/// The CPU must support AVX2; `wide` must hold `ROWS × n_groups` words; the rest as for
/// [`int8_dot_vnni`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn int8_dot_avx2<const ROWS: usize>(
    w: &Int8Weight,
    active: Option<&[u32]>,
    xq: &[u64],
    acc: &mut [i32],
    scaled: &mut [f32],
) {
    debug_assert!(xq.len() >= ROWS * w.n_groups);
    debug_assert!(acc.len().max(scaled.len()) >= ROWS * w.n_out_pad);
    // Outputs in fours (one register of half-sums each); n_out_pad is a multiple of 16.
    let quads = w.n_out_pad / 4;
    for (s, &(start, end, _)) in w.segments.iter().enumerate() {
        let listed = listed_groups(active, start, end);
        let mut q0 = 0;
        while q0 < quads {
            // Sixteen registers: a row takes 8 accumulators (32 outputs), four rows 2 each.
            let chunk = if ROWS > 1 || quads - q0 < 8 {
                if ROWS > 1 { 2 } else { 4 }
            } else {
                8
            };
            macro_rules! run {
                ($groups:expr) => {
                    // SAFETY: q0 + chunk ≤ quads and s < segments; every group is below
                    // n_groups (the caller's contract for `active`, `segments` by
                    // construction); the rest is the caller's contract, passed on.
                    unsafe {
                        match chunk {
                            8 => int8_dot_avx2_block::<ROWS, 8, _>(
                                w, $groups, xq, acc, scaled, q0, s,
                            ),
                            4 => int8_dot_avx2_block::<ROWS, 4, _>(
                                w, $groups, xq, acc, scaled, q0, s,
                            ),
                            _ => int8_dot_avx2_block::<ROWS, 2, _>(
                                w, $groups, xq, acc, scaled, q0, s,
                            ),
                        }
                    }
                };
            }
            match listed {
                None => run!(start as usize..end as usize),
                Some(list) => run!(list.iter().map(|&g| g as usize)),
            }
            q0 += chunk;
        }
    }
}

/// Outputs `q0 · 4 .. (q0 + QUADS) · 4` of segment `s` of [`int8_dot_avx2`].
///
/// # Safety
/// As for [`int8_dot_avx2`], `(q0 + QUADS) · 4 ≤ n_out_pad` with `QUADS` even, `s` below
/// the number of segments, and every group `groups` yields below `n_groups`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn int8_dot_avx2_block<const ROWS: usize, const QUADS: usize, G>(
    w: &Int8Weight,
    groups: G,
    xq: &[u64],
    acc: &mut [i32],
    scaled: &mut [f32],
    q0: usize,
    s: usize,
) where
    G: Iterator<Item = usize>,
{
    use std::arch::x86_64::*;
    let (n_groups, pad) = (w.n_groups, w.n_out_pad);
    let mut sums = [[_mm256_setzero_si256(); QUADS]; ROWS];
    let q4 = w.q4.one_a_byte();
    for g in groups {
        // SAFETY: g < n_groups, so the group's n_out_pad × 4 bytes are inside q4, and
        // (q0 + QUADS) · 4 ≤ n_out_pad keeps every 16-byte load inside the group.
        let base = unsafe { q4.as_ptr().add((g * pad + q0 * 4) * 4) };
        let mut wv = [_mm256_setzero_si256(); QUADS];
        for (b, slot) in wv.iter_mut().enumerate() {
            // SAFETY: see above.
            *slot = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(base.add(b * 16).cast()) });
        }
        for (r, row_sums) in sums.iter_mut().enumerate() {
            // SAFETY: r < ROWS and g < n_groups, inside xq (caller's contract).
            let x = _mm256_set1_epi64x(unsafe { *xq.get_unchecked(r * n_groups + g) } as i64);
            for (sum, wb) in row_sums.iter_mut().zip(&wv) {
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(*wb, x));
            }
        }
    }
    let single = w.segments.len() == 1;
    for (r, row_sums) in sums.iter().enumerate() {
        for pair in 0..QUADS / 2 {
            let total = add_halves(row_sums[2 * pair], row_sums[2 * pair + 1]);
            let at = r * pad + (q0 + 2 * pair) * 4;
            if single {
                // SAFETY: r < ROWS and (q0 + 2 · pair + 2) · 4 ≤ n_out_pad, inside acc.
                unsafe { _mm256_storeu_si256(acc.as_mut_ptr().add(at).cast(), total) };
            } else {
                // The portable kernel's `f += scale · a`, unfused, so both round alike.
                // SAFETY: as above, inside scaled; s < segments keeps the scale load inside
                // w.scale (segments × n_out_pad).
                unsafe {
                    let f = scaled.as_mut_ptr().add(at);
                    let scale =
                        _mm256_loadu_ps(w.scale.as_ptr().add(s * pad + (q0 + 2 * pair) * 4));
                    let term = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(total));
                    _mm256_storeu_ps(f, _mm256_add_ps(_mm256_loadu_ps(f), term));
                }
            }
        }
    }
}

/// [`int8_dot_avx2`] for small codes (see [`Int8Weight::small_run`]; 4-bit ones): with
/// codes of at most 64 in magnitude `vpmaddubsw` multiplies the row's `u8` inputs by the
/// codes as they are stored and adds each pair into an `i16` without saturating, 32
/// products an instruction against `vpmaddwd`'s 16 on widened codes. The `i16` sums are
/// widened to `i32` every `small_run` groups (eight for 4-bit codes), before they could
/// overflow, so the integers are exactly those of the other kernels.
///
/// # Safety
/// The CPU must support AVX2; `w.small_run` must be `Some`; the rest as for
/// [`int8_dot_vnni`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn int8_dot_avx2_small<const ROWS: usize>(
    w: &Int8Weight,
    active: Option<&[u32]>,
    xq: &[u8],
    acc: &mut [i32],
    scaled: &mut [f32],
) {
    debug_assert!(xq.len() >= ROWS * w.row_stride());
    debug_assert!(acc.len().max(scaled.len()) >= ROWS * w.n_out_pad);
    let run = w.small_run.expect("int8_dot_avx2_small: codes too large");
    // Outputs in eights (a register: eight outputs' four codes); n_out_pad is a multiple of 16.
    let eights = w.n_out_pad / 8;
    for (s, &(start, end, _)) in w.segments.iter().enumerate() {
        let listed = listed_groups(active, start, end);
        let mut e0 = 0;
        while e0 < eights {
            // Sixteen registers: a row takes 4 running sums (32 outputs), four rows 2 each;
            // the widened sums wait on the stack.
            let chunk = if ROWS == 1 && eights - e0 >= 4 { 4 } else { 2 };
            macro_rules! run {
                ($groups:expr) => {
                    // SAFETY: e0 + chunk ≤ eights and s < segments; every group is below
                    // n_groups (the caller's contract for `active`, `segments` by
                    // construction); the rest is the caller's contract, passed on.
                    unsafe {
                        match chunk {
                            4 => int8_dot_avx2_small_block::<ROWS, 4, _>(
                                w, $groups, xq, acc, scaled, e0, s, run,
                            ),
                            _ => int8_dot_avx2_small_block::<ROWS, 2, _>(
                                w, $groups, xq, acc, scaled, e0, s, run,
                            ),
                        }
                    }
                };
            }
            match listed {
                None => run!(start as usize..end as usize),
                Some(list) => run!(list.iter().map(|&g| g as usize)),
            }
            e0 += chunk;
        }
    }
}

/// Outputs `e0 · 8 .. (e0 + EIGHTS) · 8` of segment `s` of [`int8_dot_avx2_small`], the
/// `i16` sums widened every `run` groups.
///
/// # Safety
/// As for [`int8_dot_avx2_small`], `(e0 + EIGHTS) · 8 ≤ n_out_pad`, `s` below the number of
/// segments, every group `groups` yields below `n_groups`, and `run` at most
/// [`small_codes_run`] of the codes' largest magnitude.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn int8_dot_avx2_small_block<const ROWS: usize, const EIGHTS: usize, G>(
    w: &Int8Weight,
    groups: G,
    xq: &[u8],
    acc: &mut [i32],
    scaled: &mut [f32],
    e0: usize,
    s: usize,
    run: usize,
) where
    G: Iterator<Item = usize>,
{
    use std::arch::x86_64::*;
    let (stride, pad) = (w.row_stride(), w.n_out_pad);
    let ones = _mm256_set1_epi16(1);
    let mut sums = [[_mm256_setzero_si256(); EIGHTS]; ROWS];
    let mut short = [[_mm256_setzero_si256(); EIGHTS]; ROWS];
    let mut pending = 0;
    // The `i16` pair sums widened (each output's two added) into the `i32` sums.
    macro_rules! widen {
        () => {
            for (row_short, row_sums) in short.iter_mut().zip(sums.iter_mut()) {
                for (part, sum) in row_short.iter_mut().zip(row_sums.iter_mut()) {
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(*part, ones));
                    *part = _mm256_setzero_si256();
                }
            }
        };
    }
    for g in groups {
        let mut wv = [_mm256_setzero_si256(); EIGHTS];
        let at = (g * pad + e0 * 8) * 4;
        match &w.q4 {
            Codes::Bytes(q) => {
                for (b, slot) in wv.iter_mut().enumerate() {
                    // SAFETY: g < n_groups, so the group's n_out_pad × 4 codes are inside
                    // q4, and (e0 + EIGHTS) · 8 ≤ n_out_pad keeps every 32-byte load inside
                    // the group.
                    *slot = unsafe { _mm256_loadu_si256(q.as_ptr().add(at + b * 32).cast()) };
                }
            }
            Codes::Nibbles(n) => {
                // Sixteen outputs (two registers) per 32 bytes: the low halves, then the
                // high ones, each less the 8 they were stored with. e0 and EIGHTS are even,
                // so each load is one whole block of 64 codes.
                let low = _mm256_set1_epi8(0x0F);
                let eight = _mm256_set1_epi8(8);
                for (b, pair) in wv.chunks_exact_mut(2).enumerate() {
                    // SAFETY: as above, at half the offsets: the block's 32 bytes are
                    // inside the packed codes.
                    let v = unsafe { _mm256_loadu_si256(n.as_ptr().add(at / 2 + b * 32).cast()) };
                    let lo = _mm256_and_si256(v, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                    pair[0] = _mm256_sub_epi8(lo, eight);
                    pair[1] = _mm256_sub_epi8(hi, eight);
                }
            }
        }
        for (r, row_short) in short.iter_mut().enumerate() {
            // SAFETY: r < ROWS and 4g + 4 ≤ stride, inside xq (caller's contract).
            let x = unsafe {
                xq.as_ptr()
                    .add(r * stride + 4 * g)
                    .cast::<i32>()
                    .read_unaligned()
            };
            let x = _mm256_set1_epi32(x);
            for (part, wb) in row_short.iter_mut().zip(&wv) {
                *part = _mm256_add_epi16(*part, _mm256_maddubs_epi16(x, *wb));
            }
        }
        pending += 1;
        if pending == run {
            widen!();
            pending = 0;
        }
    }
    if pending > 0 {
        widen!();
    }
    let single = w.segments.len() == 1;
    for (r, row_sums) in sums.iter().enumerate() {
        for (b, sum) in row_sums.iter().enumerate() {
            let at = r * pad + (e0 + b) * 8;
            if single {
                // SAFETY: r < ROWS and (e0 + b + 1) · 8 ≤ n_out_pad, inside acc.
                unsafe { _mm256_storeu_si256(acc.as_mut_ptr().add(at).cast(), *sum) };
            } else {
                // The portable kernel's `f += scale · a`, unfused, so both round alike.
                // SAFETY: as above, inside scaled; s < segments keeps the scale load inside
                // w.scale (segments × n_out_pad).
                unsafe {
                    let f = scaled.as_mut_ptr().add(at);
                    let scale = _mm256_loadu_ps(w.scale.as_ptr().add(s * pad + (e0 + b) * 8));
                    let term = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(*sum));
                    _mm256_storeu_ps(f, _mm256_add_ps(_mm256_loadu_ps(f), term));
                }
            }
        }
    }
}

/// `xq` (a whole number of groups of four) widened to `u16`, a group to a word of `wide`.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_avx2(xq: &[u8], wide: &mut Vec<u64>) {
    use std::arch::x86_64::*;
    let n = xq.len() / 4;
    // Every word is written below.
    wide.resize(n, 0);
    let mut g = 0;
    while g + 4 <= n {
        // SAFETY: groups g..g + 4 are 16 bytes of xq and 4 words of wide.
        unsafe {
            let bytes = _mm_loadu_si128(xq.as_ptr().add(4 * g).cast());
            _mm256_storeu_si256(wide.as_mut_ptr().add(g).cast(), _mm256_cvtepu8_epi16(bytes));
        }
        g += 4;
    }
    for (w, b) in wide[g..].iter_mut().zip(xq[4 * g..].chunks_exact(4)) {
        *w = u64::from(b[0])
            | (u64::from(b[1]) << 16)
            | (u64::from(b[2]) << 32)
            | (u64::from(b[3]) << 48);
    }
}

/// Eight sums from two registers of half-sums, each holding four sums as adjacent pairs
/// (`a = [s0 s0' s1 s1' s2 s2' s3 s3']`, `b` likewise for s4–s7): `[s0 … s7]` in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn add_halves(
    a: std::arch::x86_64::__m256i,
    b: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // [s0 s1 s4 s5 | s2 s3 s6 s7], then the middle 64-bit halves swapped.
    _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(a, b))
}

/// Which instructions an integer kernel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IntKernel {
    Vnni,
    Avx2,
    Portable,
}

impl IntKernel {
    /// The best one this CPU has.
    pub(crate) fn here() -> IntKernel {
        if vnni_available() {
            IntKernel::Vnni
        } else if avx2_available() {
            IntKernel::Avx2
        } else {
            IntKernel::Portable
        }
    }

    /// Its name, as `engine::int8_kernel` reports it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            IntKernel::Vnni => "avx512-vnni",
            IntKernel::Avx2 => "avx2",
            IntKernel::Portable => "scalar",
        }
    }
}

/// One row's outputs from its integer sums (one segment): `y = bias + sx · scale ⊙ (acc −
/// zx · colsum − zero · sum)`, where `(zero, sum)` are the zero points and the sum of the
/// row's quantized inputs (`Σ xq − zx · n`), `None` without zero points; then ReLU when
/// `relu`. The integer part is exact. Written over zipped slices so that it vectorizes
/// (compiled for AVX-512 where the CPU has it): with indexing it was a scalar loop costing
/// about a tenth of an int8 batch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn int8_finish_row(
    colsum: &[i32],
    acc: &[i32],
    quant: RowQuant,
    zero_sum: Option<(&[f32], f32)>,
    scale: &[f32],
    bias: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { int8_finish_row_avx512(colsum, acc, quant, zero_sum, scale, bias, y, relu) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { int8_finish_row_avx2(colsum, acc, quant, zero_sum, scale, bias, y, relu) };
            return;
        }
    }
    int8_finish_row_portable(colsum, acc, quant, zero_sum, scale, bias, y, relu);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn int8_finish_row_avx512(
    colsum: &[i32],
    acc: &[i32],
    quant: RowQuant,
    zero_sum: Option<(&[f32], f32)>,
    scale: &[f32],
    bias: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    int8_finish_row_portable(colsum, acc, quant, zero_sum, scale, bias, y, relu);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn int8_finish_row_avx2(
    colsum: &[i32],
    acc: &[i32],
    quant: RowQuant,
    zero_sum: Option<(&[f32], f32)>,
    scale: &[f32],
    bias: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    int8_finish_row_portable(colsum, acc, quant, zero_sum, scale, bias, y, relu);
}

/// [`int8_finish_row`] in plain Rust, inlined into the wrappers above.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn int8_finish_row_portable(
    colsum: &[i32],
    acc: &[i32],
    quant: RowQuant,
    zero_sum: Option<(&[f32], f32)>,
    scale: &[f32],
    bias: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    let n = y.len();
    let (acc, colsum, scale, bias) = (&acc[..n], &colsum[..n], &scale[..n], &bias[..n]);
    let (sx, zx) = (quant.scale, quant.zero);
    let out = |b: f32, s: f32, t: f32| {
        let v = b + sx * (s * t);
        if relu { v.max(0.0) } else { v }
    };
    match zero_sum {
        None => {
            for (((v, &a), &c), (&s, &b)) in y
                .iter_mut()
                .zip(acc)
                .zip(colsum)
                .zip(scale.iter().zip(bias))
            {
                *v = out(b, s, (a - zx * c) as f32);
            }
        }
        Some((zero, sum)) => {
            for (((v, &a), &c), ((&s, &b), &z)) in y
                .iter_mut()
                .zip(acc)
                .zip(colsum)
                .zip(scale.iter().zip(bias).zip(&zero[..n]))
            {
                *v = out(b, s, (a - zx * c) as f32 - z * sum);
            }
        }
    }
}

/// One row's outputs from its scaled sums `f` (several segments, see [`int8_dot`]): `y =
/// bias + sx · (f − zx · Σₛ scaleₛ ⊙ colsumₛ − Σₛ scaleₛ ⊙ zeroₛ · sumₛ)`, where `(zero,
/// sums)` are the zero points (`[segment][n_out]`) and each segment's sum of quantized inputs
/// (`Σ xq − zx · n`), `None` without zero points; then ReLU when `relu`.
pub(crate) fn int8_finish_scaled(
    w: &Int8Weight,
    f: &[f32],
    quant: RowQuant,
    zero_sums: Option<(&[f32], &[f32])>,
    bias: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { int8_finish_scaled_avx512(w, f, quant, zero_sums, bias, y, relu) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { int8_finish_scaled_avx2(w, f, quant, zero_sums, bias, y, relu) };
            return;
        }
    }
    int8_finish_scaled_portable(w, f, quant, zero_sums, bias, y, relu);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn int8_finish_scaled_avx512(
    w: &Int8Weight,
    f: &[f32],
    quant: RowQuant,
    zero_sums: Option<(&[f32], &[f32])>,
    bias: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    int8_finish_scaled_portable(w, f, quant, zero_sums, bias, y, relu);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn int8_finish_scaled_avx2(
    w: &Int8Weight,
    f: &[f32],
    quant: RowQuant,
    zero_sums: Option<(&[f32], &[f32])>,
    bias: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    int8_finish_scaled_portable(w, f, quant, zero_sums, bias, y, relu);
}

/// [`int8_finish_scaled`] in plain Rust, inlined into the wrappers above: the zero points'
/// term first, a pass per segment (only with zero points), then the rest in one pass.
#[inline(always)]
fn int8_finish_scaled_portable(
    w: &Int8Weight,
    f: &[f32],
    quant: RowQuant,
    zero_sums: Option<(&[f32], &[f32])>,
    bias: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    let n = y.len();
    let (f, c, bias) = (&f[..n], &w.scaled_colsum[..n], &bias[..n]);
    let (sx, zx) = (quant.scale, quant.zero as f32);
    y.fill(0.0);
    if let Some((zero, sums)) = zero_sums {
        for (s, &sum) in sums.iter().enumerate() {
            let scale = &w.scale[s * w.n_out_pad..s * w.n_out_pad + n];
            for ((v, &sc), &z) in y.iter_mut().zip(scale).zip(&zero[s * n..(s + 1) * n]) {
                *v += sc * z * sum;
            }
        }
    }
    for (((v, &fv), &cv), &b) in y.iter_mut().zip(f).zip(c).zip(bias) {
        let out = b + sx * (fv - zx * cv - *v);
        *v = if relu { out.max(0.0) } else { out };
    }
}

/// Lists the groups of four inputs with any non-zero quantized value.
pub(crate) fn active_groups(xq: &[u8], list: &mut Vec<u32>) {
    list.clear();
    list.resize(xq.len() / 4, 0);
    let mut n = 0;
    for (g, quad) in xq.chunks_exact(4).enumerate() {
        list[n] = g as u32;
        n += usize::from(quad != [0, 0, 0, 0]);
    }
    list.truncate(n);
}

/// An int8 layer with sparse batches ([`Int8Weight::with_sparse_batches`]) on
/// [`SPARSE_LANES`] rows side by side, transposed like [`sparse_batch_t`]: `xt` is
/// `[n_in][SPARSE_LANES]`, `yt` `[n_out][SPARSE_LANES]`. It computes what [`int8_layer`]
/// computes for each row, to the bit, without its dense kernels' work on the zeros:
/// - each lane is quantized as [`quantize_row`] quantizes a row (onto `grid`, or over the
///   lane's own range when it falls off it or there is none), its levels kept as `f32`;
/// - each output's non-zero codes multiply one contiguous vector of levels each. Every
///   product and partial sum is an integer below 2²⁴ (checked when the codes were kept),
///   so the `f32` sums are exact: the integers the dense kernels give, in any order;
/// - the finishing step is [`int8_finish_row`]'s arithmetic, per lane: `a − zx · colsum`
///   is again an exact integer, then the same multiplies and add.
///
/// Symmetric weights only (no zero points): [`Int8Weight::with_sparse_batches`] is only
/// for those.
#[allow(clippy::too_many_arguments)]
pub(crate) fn int8_sparse_layer_t(
    w: &Int8Weight,
    input_scale: Option<&[f32]>,
    grid: Option<ActivationGrid>,
    bias: &[f32],
    xt: &[f32],
    yt: &mut [f32],
    relu: bool,
    scratch: &mut Int8Scratch,
) {
    let codes = w
        .sparse
        .as_ref()
        .expect("int8_sparse_layer_t: a weight with sparse batches");
    assert_eq!(
        xt.len(),
        w.n_in * SPARSE_LANES,
        "int8_sparse_layer_t: xt length"
    );
    assert_eq!(
        yt.len(),
        w.n_out * SPARSE_LANES,
        "int8_sparse_layer_t: yt length"
    );
    assert_eq!(bias.len(), w.n_out, "int8_sparse_layer_t: bias length");
    if let Some(s) = input_scale {
        assert_eq!(s.len(), w.n_in, "int8_sparse_layer_t: input_scale length");
    }
    let levels = &mut scratch.lanes;
    levels.resize(w.n_in * SPARSE_LANES, 0.0);
    let layer = LanesLayer {
        w,
        codes,
        input_scale,
        grid,
        bias,
        xt,
        relu,
    };
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { int8_sparse_layer_t_avx512(&layer, yt, levels) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { int8_sparse_layer_t_avx2(&layer, yt, levels) };
            return;
        }
    }
    int8_sparse_layer_t_portable::<false>(&layer, yt, levels);
}

/// What [`int8_sparse_layer_t`] reads, passed whole to its per-instruction-set forms.
struct LanesLayer<'a> {
    w: &'a Int8Weight,
    codes: &'a SparseCodes,
    input_scale: Option<&'a [f32]>,
    grid: Option<ActivationGrid>,
    bias: &'a [f32],
    xt: &'a [f32],
    relu: bool,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn int8_sparse_layer_t_avx512(layer: &LanesLayer, yt: &mut [f32], levels: &mut [f32]) {
    int8_sparse_layer_t_portable::<true>(layer, yt, levels);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn int8_sparse_layer_t_avx2(layer: &LanesLayer, yt: &mut [f32], levels: &mut [f32]) {
    int8_sparse_layer_t_portable::<true>(layer, yt, levels);
}

/// The level of grid position `u` (a value's `x · inv + zero`): clamped to `[0, 255]` and
/// rounded as [`round_to_u8`] rounds it (ties to even), kept as `f32`: the sum's rounding is
/// the same, and subtracting the constant again is exact. Every level the sparse batch path
/// sets goes through here, on the grid or over a lane's own range.
#[inline(always)]
fn level_at(u: f32) -> f32 {
    (u.clamp(0.0, 255.0) + ROUND_MAGIC) - ROUND_MAGIC
}

/// Up to this many lanes of a tile off its grid are quantized over their own range one by
/// one; more, side by side (see [`int8_sparse_layer_t`]).
const OWN_LANES_ONE_BY_ONE: usize = 8;

/// [`int8_sparse_layer_t`] in plain Rust, inlined into each `target_feature` wrapper so that
/// its loops over the lanes vectorize. With `FUSED` the exact sums use fused multiply-adds;
/// they are exact either way.
#[inline(always)]
fn int8_sparse_layer_t_portable<const FUSED: bool>(
    layer: &LanesLayer,
    yt: &mut [f32],
    levels: &mut [f32],
) {
    let &LanesLayer {
        w,
        codes,
        input_scale,
        grid,
        bias,
        xt,
        relu,
    } = layer;
    const L: usize = SPARSE_LANES;
    // Input `i`'s value in lane `r`, times its input scale when there is one (the row
    // quantizer's `x · s`).
    let value = |i: usize, r: usize| match input_scale {
        Some(s) => xt[i * L + r] * s[i],
        None => xt[i * L + r],
    };
    // Each lane's grid: `x ≈ sx · (level − zx)`.
    let mut sx = [0f32; L];
    let mut zx = [0f32; L];
    // Lanes to quantize over their own range (all of them without a grid).
    let mut own = [grid.is_none(); L];
    if let Some(g) = grid {
        let (inv, offset) = (1.0 / g.scale, g.zero as f32);
        let mut lo = [offset; L];
        let mut hi = [offset; L];
        let mut lane_values = [0f32; L];
        for (i, out) in levels.chunks_exact_mut(L).enumerate() {
            // Copied rather than read through `value`: read in place, this pass took about
            // twice as long when tried (presumably it no longer vectorized), on every tile.
            lane_values.copy_from_slice(&xt[i * L..(i + 1) * L]);
            if let Some(s) = input_scale {
                for v in lane_values.iter_mut() {
                    *v *= s[i];
                }
            }
            for r in 0..L {
                let u = lane_values[r] * inv + offset;
                lo[r] = if u < lo[r] { u } else { lo[r] };
                hi[r] = if u > hi[r] { u } else { hi[r] };
                out[r] = level_at(u);
            }
        }
        for r in 0..L {
            own[r] = !ActivationGrid::within(lo[r]) || !ActivationGrid::within(hi[r]);
        }
        sx = [g.scale; L];
        zx = [offset; L];
    }
    // The lanes to quantize over their own range: each lane's range, as `quantize_row` finds
    // a row's (from 0, over every value), and its levels over it. Without a grid that is
    // every lane, taken side by side. With one, the lanes off it are few (on the digits test
    // set a few rows in a hundred, but then in about half the tiles of 64): they are taken
    // one by one, so that such a tile redoes its few rows, not all 64 (side by side, that
    // took as long as the products of the 90 % pruned model's two last layers).
    let n_own = own.iter().filter(|&&o| o).count();
    if n_own > OWN_LANES_ONE_BY_ONE {
        let mut lo = [0f32; L];
        let mut hi = [0f32; L];
        for i in 0..w.n_in {
            for r in 0..L {
                let v = value(i, r);
                lo[r] = if v < lo[r] { v } else { lo[r] };
                hi[r] = if v > hi[r] { v } else { hi[r] };
            }
        }
        let mut inv = [0f32; L];
        for r in (0..L).filter(|&r| own[r]) {
            let g = ActivationGrid::spanning(lo[r], hi[r]);
            (sx[r], zx[r], inv[r]) = (g.scale, g.zero as f32, 1.0 / g.scale);
        }
        for (i, out) in levels.chunks_exact_mut(L).enumerate() {
            for r in 0..L {
                let level = level_at(value(i, r) * inv[r] + zx[r]);
                out[r] = if own[r] { level } else { out[r] };
            }
        }
    } else {
        for r in (0..L).filter(|&r| own[r]) {
            let (mut lo, mut hi) = (0f32, 0f32);
            for i in 0..w.n_in {
                let v = value(i, r);
                lo = if v < lo { v } else { lo };
                hi = if v > hi { v } else { hi };
            }
            let g = ActivationGrid::spanning(lo, hi);
            let inv = 1.0 / g.scale;
            (sx[r], zx[r]) = (g.scale, g.zero as f32);
            for i in 0..w.n_in {
                levels[i * L + r] = level_at(value(i, r) * inv + zx[r]);
            }
        }
    }
    for (o, out) in yt.chunks_exact_mut(L).enumerate() {
        let (start, end) = (codes.ptr[o] as usize, codes.ptr[o + 1] as usize);
        let code = &codes.code[start..end];
        let acc = match &codes.slot {
            Slots::Byte(slot) => lane_sums::<_, _, FUSED>(0.0, &slot[start..end], code, levels),
            Slots::Wide(slot) => lane_sums::<_, _, FUSED>(0.0, &slot[start..end], code, levels),
        };
        let (b, s, c) = (bias[o], w.scale[o], w.colsum[o] as f32);
        for r in 0..L {
            let t = acc[r] - zx[r] * c;
            let v = b + sx[r] * (s * t);
            out[r] = if relu { v.max(0.0) } else { v };
        }
    }
}

/// `init + Σ value · xt[index]` over one output's stored weights, for [`SPARSE_LANES`]
/// lanes (`xt` is `[inputs][SPARSE_LANES]`): the inner loop of both sparse batch kernels,
/// over `f32` weights ([`sparse_batch_t`]) and over int8 codes and levels, where it is
/// exact ([`int8_sparse_layer_t`]). Each weight multiplies one contiguous vector of inputs.
#[inline(always)]
fn lane_sums<I: Copy, V: Copy, const FUSED: bool>(
    init: f32,
    index: &[I],
    value: &[V],
    xt: &[f32],
) -> [f32; SPARSE_LANES]
where
    u32: From<I>,
    f32: From<V>,
{
    const L: usize = SPARSE_LANES;
    let mut acc = [init; L];
    for (&i, &v) in index.iter().zip(value) {
        let at = u32::from(i) as usize * L;
        let x: &[f32; L] = xt[at..at + L]
            .try_into()
            .expect("lane slice has SPARSE_LANES elements");
        let v = f32::from(v);
        for (a, &xv) in acc.iter_mut().zip(x) {
            *a = if FUSED {
                v.mul_add(xv, *a)
            } else {
                *a + v * xv
            };
        }
    }
    acc
}

/// Rows processed side by side by the sparse batch kernel: one output's accumulators for
/// this many rows fill four 512-bit registers, like the row kernel's `BLOCK`.
pub(crate) const SPARSE_LANES: usize = BLOCK;

/// `yt = bias + W xt` (then ReLU when `relu`) for [`SPARSE_LANES`] rows at once, with the
/// activations transposed: `xt` is `[n_in][SPARSE_LANES]`, `yt` is `[n_out][SPARSE_LANES]`.
/// Each stored weight then multiplies one contiguous vector of inputs, so the sparse product
/// vectorizes as well as a dense one while doing only the non-zeros' work.
pub(crate) fn sparse_batch_t(
    w: &SparseWeight,
    bias: &[f32],
    xt: &[f32],
    yt: &mut [f32],
    relu: bool,
) {
    assert_eq!(xt.len(), w.n_in * SPARSE_LANES, "sparse_batch_t: xt length");
    assert_eq!(
        yt.len(),
        w.n_out * SPARSE_LANES,
        "sparse_batch_t: yt length"
    );
    assert_eq!(bias.len(), w.n_out, "sparse_batch_t: bias length");
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { sparse_batch_t_avx512(w, bias, xt, yt, relu) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { sparse_batch_t_avx2(w, bias, xt, yt, relu) };
            return;
        }
    }
    sparse_batch_t_portable::<false>(w, bias, xt, yt, relu);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn sparse_batch_t_avx512(w: &SparseWeight, bias: &[f32], xt: &[f32], yt: &mut [f32], relu: bool) {
    sparse_batch_t_portable::<true>(w, bias, xt, yt, relu);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn sparse_batch_t_avx2(w: &SparseWeight, bias: &[f32], xt: &[f32], yt: &mut [f32], relu: bool) {
    sparse_batch_t_portable::<true>(w, bias, xt, yt, relu);
}

/// The sparse batch kernel in plain Rust, inlined into each `target_feature` wrapper.
#[inline(always)]
fn sparse_batch_t_portable<const FUSED: bool>(
    w: &SparseWeight,
    bias: &[f32],
    xt: &[f32],
    yt: &mut [f32],
    relu: bool,
) {
    for (o, out) in yt.chunks_exact_mut(SPARSE_LANES).enumerate() {
        let (start, end) = (w.by_output_ptr[o] as usize, w.by_output_ptr[o + 1] as usize);
        let acc = lane_sums::<_, _, FUSED>(
            bias[o],
            &w.by_output_in[start..end],
            &w.by_output_val[start..end],
            xt,
        );
        finish(&acc, out, relu);
    }
}

/// `y = bias + x · wt` (then ReLU when `relu`) for `rows` rows: `x` is `[rows][n_in]`,
/// `wt` is `[n_in][padded_width(n_out)]` (see [`pad_columns`]), `y` is `[rows][n_out]`,
/// all row-major.
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
    let stride = padded_width(n_out);
    // These are the bounds the raw-pointer call below relies on; they are real checks,
    // not debug-only, because a mistake here would read or write out of bounds.
    assert_eq!(x.len(), rows * n_in, "dense_batch: x has the wrong length");
    assert_eq!(
        wt.len(),
        n_in * stride,
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
        // (wt) n_in × stride elements (stride ≥ n_out), all row-major with the strides
        // passed (column stride 1, row stride = the row length; gemm reads the first n_out
        // of each rhs row), so gemm reads and writes only inside the three slices; y is
        // borrowed mutably, so it does not alias x or wt.
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
                stride as isize,
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

    /// Every integer kernel this CPU can run.
    fn kernels_here() -> Vec<IntKernel> {
        let mut kernels = vec![IntKernel::Portable];
        if avx2_available() {
            kernels.push(IntKernel::Avx2);
        }
        if vnni_available() {
            kernels.push(IntKernel::Vnni);
        }
        kernels
    }

    /// A quantized layer: `q` `[n_in][n_out]`, per-output scale and zero point.
    fn int8_case(n_in: usize, n_out: usize) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
        let q: Vec<i8> = values(n_in * n_out, 8)
            .iter()
            .map(|v| (v * 127.0) as i8)
            .collect();
        let scale: Vec<f32> = (0..n_out).map(|o| 0.01 + o as f32 * 1e-4).collect();
        let zero: Vec<f32> = (0..n_out).map(|o| (o % 5) as f32 - 2.0).collect();
        (q, scale, zero)
    }

    /// The weight, and where its codes are 4-bit ones, the same weight packed two a byte.
    fn with_packed(w: Int8Weight) -> Vec<Int8Weight> {
        let packed = w.clone().with_packed_nibbles();
        if packed.packed_nibbles() {
            assert_eq!(
                packed.resident_bytes() + w.q4.bytes() / 2,
                w.resident_bytes()
            );
            vec![w, packed]
        } else {
            vec![w]
        }
    }

    #[test]
    fn the_vector_and_scalar_int8_kernels_give_the_same_integers() {
        // Full-range codes, the largest the AVX2 `i16` path takes, and 4-bit ones (which are
        // also run packed two a byte).
        for ((n_in, n_out), (lo, hi)) in [(64, 256), (256, 128), (128, 10), (5, 130), (3, 1)]
            .into_iter()
            .flat_map(|shape| {
                [
                    (shape, (-127i8, 127i8)),
                    (shape, (-64, 64)),
                    (shape, (-8, 7)),
                ]
            })
        {
            let (full, scale, _) = int8_case(n_in, n_out);
            let q: Vec<i8> = full
                .iter()
                .map(|&v| (i32::from(v) * i32::from(hi) / 127).clamp(lo.into(), hi.into()) as i8)
                .collect();
            let w = Int8Weight::from_in_out(&q, n_in, n_out, &scale);
            let largest = q.iter().map(|&v| i32::from(v).abs()).max().unwrap_or(0);
            assert_eq!(
                w.small_run.is_some(),
                largest <= 64,
                "{n_in}x{n_out}, to {hi}"
            );
            assert_eq!(
                w.clone().with_packed_nibbles().packed_nibbles(),
                hi <= 7,
                "{n_in}x{n_out}, to {hi}"
            );
            for rows in [1, 3, 4, 9] {
                let x: Vec<f32> = values(rows * n_in, 11).iter().map(|v| v.max(0.0)).collect();
                let mut xq = vec![0u8; rows * w.row_stride()];
                for (row, out) in x
                    .chunks_exact(n_in)
                    .zip(xq.chunks_exact_mut(w.row_stride()))
                {
                    quantize_row(row, None, None, out);
                }
                let mut expected = vec![0i32; rows * w.n_out_pad];
                int8_dot_portable(&w, None, &xq, rows, &mut expected, &mut []);
                // A plain triple loop over the original layout.
                for r in 0..rows {
                    for o in 0..n_out {
                        let plain: i32 = (0..n_in)
                            .map(|i| {
                                i32::from(xq[r * w.row_stride() + i]) * i32::from(q[i * n_out + o])
                            })
                            .sum();
                        assert_eq!(expected[r * w.n_out_pad + o], plain);
                    }
                }
                let (mut acc, mut scaled, mut wide) = (Vec::new(), Vec::new(), Vec::new());
                let mut active = Vec::new();
                if rows == 1 {
                    active_groups(&xq, &mut active);
                }
                for (w, kernel) in with_packed(w.clone())
                    .into_iter()
                    .flat_map(|w| kernels_here().into_iter().map(move |k| (w.clone(), k)))
                {
                    let packed = w.packed_nibbles();
                    // Stale values from an earlier call must all be overwritten.
                    acc = vec![i32::MIN; rows * w.n_out_pad + 5];
                    int8_dot_on(
                        &w,
                        &xq,
                        rows,
                        None,
                        &mut acc,
                        &mut scaled,
                        &mut wide,
                        kernel,
                    );
                    assert_eq!(
                        acc, expected,
                        "{n_in}x{n_out}, codes to {hi}, {rows} rows, {kernel:?}, packed {packed}"
                    );
                    if rows == 1 {
                        acc.fill(i32::MAX);
                        int8_dot_on(
                            &w,
                            &xq,
                            1,
                            Some(&active),
                            &mut acc,
                            &mut scaled,
                            &mut wide,
                            kernel,
                        );
                        assert_eq!(
                            acc, expected,
                            "{n_in}x{n_out}, active groups, {kernel:?}, packed {packed}"
                        );
                    }
                }
                // Segments of 8 inputs (and the scaled sums they give): the same floats,
                // which both kernels add up segment by segment in the same order.
                let n_seg = n_in.div_ceil(8);
                let segment_of: Vec<u32> = (0..n_in).map(|i| (i / 8) as u32).collect();
                let scales: Vec<f32> = (0..n_seg * n_out).map(|k| 0.5 + (k % 7) as f32).collect();
                let ws = Int8Weight::with_segments(&q, n_in, n_out, &segment_of, n_seg, &scales);
                if n_seg > 1 {
                    let mut expected = vec![0f32; rows * ws.n_out_pad];
                    int8_dot_portable(&ws, None, &xq, rows, &mut [], &mut expected);
                    for (ws, kernel) in with_packed(ws)
                        .into_iter()
                        .flat_map(|w| kernels_here().into_iter().map(move |k| (w.clone(), k)))
                    {
                        let packed = ws.packed_nibbles();
                        int8_dot_on(
                            &ws,
                            &xq,
                            rows,
                            None,
                            &mut acc,
                            &mut scaled,
                            &mut wide,
                            kernel,
                        );
                        assert_eq!(
                            scaled, expected,
                            "{n_in}x{n_out} segments, {rows} rows, {kernel:?}, packed {packed}"
                        );
                        if rows == 1 {
                            int8_dot_on(
                                &ws,
                                &xq,
                                1,
                                Some(&active),
                                &mut acc,
                                &mut scaled,
                                &mut wide,
                                kernel,
                            );
                            assert_eq!(scaled, expected, "{n_in}x{n_out} segments, active");
                        }
                    }
                }
            }
        }
        eprintln!(
            "int8 kernels checked against the scalar one: {:?}",
            kernels_here()
        );
    }

    #[test]
    fn packed_4_bit_codes_read_back_as_they_were() {
        // Every 4-bit value at every position of a block, in layers whose outputs pad to
        // one and several blocks of 16.
        for (n_in, n_out) in [(4, 16), (7, 20), (64, 33)] {
            let q: Vec<i8> = (0..n_in * n_out)
                .map(|k| ((k * 7 + k / 16) % 16) as i8 - 8)
                .collect();
            let w = Int8Weight::from_in_out(&q, n_in, n_out, &vec![1.0; n_out]);
            let packed = w.clone().with_packed_nibbles();
            assert!(packed.packed_nibbles());
            assert_eq!(packed.q4.bytes() * 2, w.q4.bytes());
            for k in 0..w.q4.bytes() {
                assert_eq!(packed.q4.get(k), w.q4.get(k), "{n_in}x{n_out}, code {k}");
            }
            // 8 is outside −8..=7: such codes stay one a byte.
            let mut wide = q.clone();
            wide[0] = 8;
            let w = Int8Weight::from_in_out(&wide, n_in, n_out, &vec![1.0; n_out]);
            assert!(!w.with_packed_nibbles().packed_nibbles());
        }
    }

    #[test]
    fn small_codes_sum_exactly_at_their_extremes() {
        // The runs of groups the AVX2 kernel sums in `i16` before widening: as long as the
        // largest input (255) times the largest code, two a group, stays inside `i16`.
        assert_eq!(small_codes_run(8), Some(8));
        assert_eq!(small_codes_run(7), Some(9));
        assert_eq!(small_codes_run(64), Some(1));
        assert_eq!(small_codes_run(65), None);
        assert_eq!(small_codes_run(0), Some(64));
        // Every input at 255 against codes all at the extreme of one sign: each run ends a
        // hair inside `i16` (8 · 4080 = 32 640), so one more group per run would wrap.
        for code in [-8i8, 8, 7, -64, 64] {
            for (n_in, n_out) in [(256, 16), (100, 24), (4, 8)] {
                let q = vec![code; n_in * n_out];
                let scale = vec![1.0; n_out];
                let w = Int8Weight::from_in_out(&q, n_in, n_out, &scale);
                assert!(w.small_run.is_some());
                for (w, rows) in with_packed(w)
                    .into_iter()
                    .flat_map(|w| [(w.clone(), 1), (w, 4)])
                {
                    let xq = vec![255u8; rows * w.row_stride()];
                    let (mut acc, mut scaled, mut wide) = (Vec::new(), Vec::new(), Vec::new());
                    for kernel in kernels_here() {
                        int8_dot_on(
                            &w,
                            &xq,
                            rows,
                            None,
                            &mut acc,
                            &mut scaled,
                            &mut wide,
                            kernel,
                        );
                        for r in 0..rows {
                            for o in 0..n_out {
                                assert_eq!(
                                    acc[r * w.n_out_pad + o],
                                    255 * i32::from(code) * n_in as i32,
                                    "code {code}, {n_in}x{n_out}, {rows} rows, {kernel:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_vector_and_portable_lists_of_non_zero_inputs_agree() {
        for n in [0, 1, 15, 16, 17, 50, 165, 256] {
            let x: Vec<f32> = values(n, n as u32 + 40)
                .iter()
                .enumerate()
                .map(|(i, v)| if i % 3 == 1 { 0.0 } else { v.max(0.0) })
                .collect();
            let expected: Vec<(u32, f32)> = x
                .iter()
                .enumerate()
                .filter(|(_, v)| **v != 0.0)
                .map(|(i, v)| (i as u32, *v))
                .collect();
            let mut scratch = RowScratch::default();
            let active = list_active(&x, &mut scratch);
            let got: Vec<(u32, f32)> = scratch.index[..active]
                .iter()
                .copied()
                .zip(scratch.value[..active].iter().copied())
                .collect();
            assert_eq!(got, expected, "n {n}");
            let (mut index, mut value) = (vec![0u32; n], vec![0f32; n]);
            let active = list_active_portable(&x, &mut index, &mut value);
            assert_eq!(active, expected.len());
            assert_eq!(
                &index[..active],
                expected.iter().map(|e| e.0).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn row_quantization_matches_a_plain_sequential_reference() {
        for n in [1, 5, 15, 16, 17, 64, 100, 256] {
            for scaled in [false, true] {
                for signed in [false, true] {
                    let x: Vec<f32> = values(n, n as u32 + 20)
                        .iter()
                        .map(|v| if signed { *v } else { v.max(0.0) * 3.0 })
                        .collect();
                    let s: Vec<f32> = (0..n).map(|i| 0.25 + (i % 5) as f32).collect();
                    let input_scale = scaled.then_some(s.as_slice());
                    let v: Vec<f32> = (0..n)
                        .map(|i| if scaled { x[i] * s[i] } else { x[i] })
                        .collect();
                    // The reference: one sequential pass, then rounding of each value.
                    let lo = v.iter().fold(0f32, |m, &a| m.min(a));
                    let hi = v.iter().fold(0f32, |m, &a| m.max(a));
                    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
                    let zero = (-lo / scale).round().clamp(0.0, 255.0);
                    let stride = n.div_ceil(4) * 4;
                    for vectorized in [false, true] {
                        let mut xq = vec![7u8; stride];
                        let quant = if vectorized {
                            quantize_row(&x, input_scale, None, &mut xq)
                        } else {
                            quantize_row_portable(&x, input_scale, None, &mut xq)
                        };
                        assert_eq!(quant.scale, scale, "n {n}");
                        assert_eq!(quant.zero, zero as i32, "n {n}");
                        for (i, &a) in v.iter().enumerate() {
                            let exact = f64::from(a) / f64::from(scale) + f64::from(zero);
                            let got = f64::from(xq[i]);
                            // Nearest integer; a value within float rounding of a tie may
                            // go either way.
                            assert!(
                                (got - exact).abs() <= 0.5 + 1e-4,
                                "n {n} value {i}: {got} for {exact}"
                            );
                        }
                        assert!(xq[n..].iter().all(|&q| q == 0), "padding zeroed");
                    }
                }
            }
        }
    }

    #[test]
    fn a_calibrated_grid_rounds_rows_onto_itself_and_a_row_off_it_onto_its_own_range() {
        // A grid calibrated on [-1.5, 3]: 0 is a level.
        let grid = ActivationGrid::spanning(-1.5, 3.0);
        assert_eq!(grid.scale, 4.5 / 255.0);
        assert_eq!(grid.zero, 85);
        // A range on one side of zero is widened to include it.
        assert_eq!(ActivationGrid::spanning(0.5, 2.0).zero, 0);
        assert_eq!(ActivationGrid::spanning(-2.0, -0.5).zero, 255);
        for scaled in [false, true] {
            let s: Vec<f32> = (0..20).map(|i| 0.5 + (i % 2) as f32 * 0.5).collect();
            let input_scale = scaled.then_some(s.as_slice());
            let scale_of = |x: &[f32]| -> Vec<f32> {
                (0..x.len())
                    .map(|i| if scaled { x[i] * s[i] } else { x[i] })
                    .collect()
            };
            // Inside the grid (the last value half a step past its top): rounded onto it.
            let top = 3.0 + 0.49 * grid.scale;
            let mut x = vec![0.0, 1.0, -1.0, 2.999, -1.5, 0.01, 2.25, 0.0, -0.7, top];
            if scaled {
                x[9] = top; // s[9] = 1
            }
            let v = scale_of(&x);
            let mut xq = vec![9u8; 12];
            let quant = quantize_row(&x, input_scale, Some(grid), &mut xq);
            assert_eq!((quant.scale, quant.zero), (grid.scale, grid.zero));
            for (i, &a) in v.iter().enumerate() {
                let level = a / grid.scale + grid.zero as f32;
                let got = f32::from(xq[i]);
                assert!(
                    (got - level).abs() <= 0.5 + 1e-3,
                    "value {i}: {got} for {level}"
                );
                if a == 0.0 {
                    assert_eq!(xq[i] as i32, grid.zero, "a zero stays exactly zero");
                }
            }
            assert_eq!(&xq[10..], &[0, 0], "padding zeroed");
            // One value past the grid: the row is quantized over its own range, exactly as
            // without a grid, instead of clamping that value.
            for far in [7.0, -9.0] {
                let mut off = x.clone();
                off[3] = far;
                let mut with_grid = vec![9u8; 12];
                let mut own = vec![9u8; 12];
                let a = quantize_row(&off, input_scale, Some(grid), &mut with_grid);
                let b = quantize_row(&off, input_scale, None, &mut own);
                assert_eq!(a, b);
                assert_eq!(with_grid, own);
                assert_ne!((a.scale, a.zero), (grid.scale, grid.zero));
            }
        }
    }

    #[test]
    fn sparse_int8_batches_give_the_same_bits_as_the_dense_integer_kernels() {
        // A pruned layer: about one code in five non-zero, the extremes included.
        let sparse_codes = |n_in: usize, n_out: usize, seed: u32| -> Vec<i8> {
            values(n_in * n_out, seed)
                .iter()
                .enumerate()
                .map(|(k, &v)| match k % 10 {
                    0 => (v * 127.0) as i8,
                    1 => 127,
                    2 if k % 20 == 2 => -128,
                    _ => 0,
                })
                .collect()
        };
        // Up to 256 inputs the codes' slots are bytes, above two bytes each (300).
        for (n_in, n_out, rows) in [
            (51, 151, 64),
            (151, 121, 37),
            (7, 3, 64),
            (130, 20, 1),
            (300, 9, 50),
        ] {
            let q = sparse_codes(n_in, n_out, 3);
            let scale: Vec<f32> = (0..n_out).map(|o| 0.01 + o as f32 * 1e-4).collect();
            let bias = values(n_out, 4);
            let w = Int8Weight::from_in_out(&q, n_in, n_out, &scale).with_sparse_batches(0.35);
            assert!(w.sparse_batches(), "{n_in}×{n_out}");
            let wide = matches!(w.sparse.as_ref().map(|c| &c.slot), Some(Slots::Wide(_)));
            assert_eq!(wide, n_in > 256);
            let s: Vec<f32> = (0..n_in).map(|i| 0.5 + (i % 3) as f32 * 0.25).collect();
            // Rows of the first layer (signed) and of hidden ones (ReLU outputs), and rows
            // far off the calibrated range, which are quantized over their own.
            let mut x: Vec<f32> = values(rows * n_in, 5).iter().map(|v| v * 2.0).collect();
            for (k, v) in x.iter_mut().enumerate() {
                if (k / n_in) % 3 == 1 {
                    *v = v.abs();
                }
                if k % (5 * n_in + 1) == 2 {
                    *v *= 40.0;
                }
            }
            let mut xt = vec![f32::NAN; n_in * SPARSE_LANES];
            for (r, row) in x.chunks_exact(n_in).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    xt[i * SPARSE_LANES + r] = v;
                }
            }
            // Lanes past the last row hold leftovers, as in the engine: off the grid below
            // (every lane of a short tile is then requantized, side by side), or on it (its
            // few rows off the grid are, one by one).
            for (leftover, grid) in [
                (3.5, None),
                (3.5, Some(ActivationGrid::spanning(-2.0, 2.0))),
                (0.5, Some(ActivationGrid::spanning(-2.0, 2.0))),
            ] {
                for lane in xt.chunks_exact_mut(SPARSE_LANES) {
                    lane[rows..].fill(leftover);
                }
                for input_scale in [None, Some(s.as_slice())] {
                    for relu in [false, true] {
                        let mut scratch = Int8Scratch::default();
                        let mut yt = vec![f32::NAN; n_out * SPARSE_LANES];
                        int8_sparse_layer_t(
                            &w,
                            input_scale,
                            grid,
                            &bias,
                            &xt,
                            &mut yt,
                            relu,
                            &mut scratch,
                        );
                        let mut y = vec![0f32; rows * n_out];
                        int8_layer(
                            &w,
                            &[],
                            input_scale,
                            grid,
                            &bias,
                            &x,
                            rows,
                            &mut y,
                            relu,
                            &mut scratch,
                        );
                        for r in 0..rows {
                            for o in 0..n_out {
                                assert_eq!(
                                    yt[o * SPARSE_LANES + r].to_bits(),
                                    y[r * n_out + o].to_bits(),
                                    "{n_in}×{n_out} row {r} output {o} {grid:?} {relu}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    mod any_layer {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any layer shape (widths that are not multiples of four or sixteen included), any
            /// codes and any rows: the sparse batch path gives the dense integer kernels' bits.
            #[test]
            fn sparse_int8_batches_match_the_dense_kernels_for_any_layer(
                (n_in, n_out, codes) in (1usize..80, 1usize..40).prop_flat_map(|(n_in, n_out)| {
                    (
                        Just(n_in),
                        Just(n_out),
                        proptest::collection::vec(
                            prop_oneof![3 => Just(0i8), 1 => any::<i8>()],
                            n_in * n_out,
                        ),
                    )
                }),
                rows in 1usize..=SPARSE_LANES,
                seed in 0u32..1000,
                static_grid in any::<bool>(),
                relu in any::<bool>(),
                four_bits in any::<bool>(),
            ) {
                // 4-bit codes are held two a byte first, as the engine does on AVX2: the
                // sparse codes are read from the packed ones.
                let codes: Vec<i8> = if four_bits {
                    codes.iter().map(|&c| c >> 4).collect()
                } else {
                    codes
                };
                let scale: Vec<f32> = (0..n_out).map(|o| 0.02 + o as f32 * 1e-3).collect();
                let w = Int8Weight::from_in_out(&codes, n_in, n_out, &scale);
                let w = if four_bits { w.with_packed_nibbles() } else { w };
                prop_assert_eq!(w.packed_nibbles(), four_bits);
                let w = w.with_sparse_batches(1.0);
                prop_assert!(w.sparse_batches());
                let bias = values(n_out, seed + 1);
                let x: Vec<f32> = values(rows * n_in, seed).iter().map(|v| v * 3.0).collect();
                let mut xt = vec![0f32; n_in * SPARSE_LANES];
                for (r, row) in x.chunks_exact(n_in).enumerate() {
                    for (i, &v) in row.iter().enumerate() {
                        xt[i * SPARSE_LANES + r] = v;
                    }
                }
                let grid = static_grid.then(|| ActivationGrid::spanning(-2.0, 2.5));
                let mut scratch = Int8Scratch::default();
                let mut yt = vec![0f32; n_out * SPARSE_LANES];
                int8_sparse_layer_t(&w, None, grid, &bias, &xt, &mut yt, relu, &mut scratch);
                let mut y = vec![0f32; rows * n_out];
                int8_layer(&w, &[], None, grid, &bias, &x, rows, &mut y, relu, &mut scratch);
                for r in 0..rows {
                    for o in 0..n_out {
                        prop_assert_eq!(
                            yt[o * SPARSE_LANES + r].to_bits(),
                            y[r * n_out + o].to_bits(),
                            "row {} output {}", r, o
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn only_exact_one_segment_layers_sparse_enough_keep_sparse_batches() {
        let scale = vec![0.01f32; 8];
        let dense_codes = vec![3i8; 40 * 8];
        let w = Int8Weight::from_in_out(&dense_codes, 40, 8, &scale);
        assert!(!w.clone().with_sparse_batches(0.35).sparse_batches());
        assert!(w.with_sparse_batches(1.0).sparse_batches());
        // Grouped scales (two segments) stay on the dense kernels.
        let mut codes = vec![0i8; 40 * 8];
        codes[0] = 5;
        let grouped = Int8Weight::with_segments(
            &codes,
            40,
            8,
            &(0..40).map(|i| u32::from(i >= 20)).collect::<Vec<_>>(),
            2,
            &[0.01; 16],
        );
        assert!(!grouped.with_sparse_batches(0.35).sparse_batches());
        // An output whose sums could reach 2²⁴ (255 · 127 · 519 > 2²⁴) would not be exact
        // in `f32`; one code fewer fits.
        let mut wide = vec![0i8; 2000];
        for v in wide.iter_mut().take(519) {
            *v = 127;
        }
        let w = Int8Weight::from_in_out(&wide, 2000, 1, &[0.01]);
        assert!(!w.with_sparse_batches(0.35).sparse_batches());
        wide[518] = 0;
        let fits = Int8Weight::from_in_out(&wide, 2000, 1, &[0.01]);
        assert!(fits.with_sparse_batches(0.35).sparse_batches());
    }

    #[test]
    fn the_int8_path_matches_the_dequantized_float_layer_within_activation_rounding() {
        // (n_in, n_out, inputs per segment, pruned): one segment (a scale per output);
        // segments starting on groups of four; segments of six and of three, whose inputs go
        // to slots padded to groups of four (the last segment shorter). Pruned: three
        // weights in four are zero, coded as zero points far from 0, as for a group of a
        // pruned layer whose non-zeros share a sign.
        for (n_in, n_out, d, pruned) in [
            (64usize, 256usize, 64usize, false),
            (128, 10, 128, false),
            (128, 16, 32, false),
            (5, 130, 5, false),
            (64, 40, 32, false),
            (64, 40, 6, false),
            (10, 17, 3, false),
            (97, 20, 64, false),
            (106, 10, 32, true),
            (64, 40, 6, true),
            (64, 40, 64, true),
        ] {
            let n_seg = n_in.div_ceil(d);
            let segment_of: Vec<u32> = (0..n_in).map(|i| (i / d) as u32).collect();
            let (mut q, _, _) = int8_case(n_in, n_out);
            let scale: Vec<f32> = (0..n_seg * n_out)
                .map(|k| 0.01 + (k % 37) as f32 * 1e-4)
                .collect();
            let zero: Vec<f32> = (0..n_seg * n_out)
                .map(|k| {
                    if pruned {
                        -100.0 - (k % 20) as f32
                    } else if n_out == 16 {
                        0.0
                    } else {
                        (k % 5) as f32 - 2.0
                    }
                })
                .collect();
            let at = |k: usize| segment_of[k / n_out] as usize * n_out + k % n_out;
            if pruned {
                for (k, c) in q.iter_mut().enumerate() {
                    *c = if k % 4 == 0 {
                        (zero[at(k)] as i32 + 1 + (k % 200) as i32).min(127) as i8
                    } else {
                        zero[at(k)] as i8
                    };
                }
            }
            let wt: Vec<f32> = (0..n_in * n_out)
                .map(|k| scale[at(k)] * (f32::from(q[k]) - zero[at(k)]))
                .collect();
            let w = Int8Weight::with_segments(&q, n_in, n_out, &segment_of, n_seg, &scale);
            assert_eq!(w.n_segments(), n_seg);
            // Symmetric (no zero points) as the engine passes it: empty.
            let symmetric = zero.iter().all(|z| *z == 0.0);
            let zero_arg: &[f32] = if symmetric { &[] } else { &zero };
            assert_eq!(w.slots.is_some(), n_seg > 1 && d % 4 != 0, "{n_in}/{d}");
            let bias = values(n_out, 9);
            // Signed inputs (a zero point) and an input scale, as for a first layer.
            let rows = 3;
            let x = values(rows * n_in, 10);
            let input_scale: Vec<f32> = (0..n_in).map(|i| 0.5 + (i % 3) as f32).collect();
            let scaled: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(k, v)| v * input_scale[k % n_in])
                .collect();
            for relu in [false, true] {
                let expected = reference(&scaled, rows, &wt, &bias, relu);
                let mut scratch = Int8Scratch::default();
                let mut batch = vec![0f32; rows * n_out];
                let run = |x: &[f32], rows: usize, y: &mut [f32], scratch: &mut Int8Scratch| {
                    int8_layer(
                        &w,
                        zero_arg,
                        Some(&input_scale),
                        None,
                        &bias,
                        x,
                        rows,
                        y,
                        relu,
                        scratch,
                    )
                };
                run(&x, rows, &mut batch, &mut scratch);
                for r in 0..rows {
                    let row = &x[r * n_in..(r + 1) * n_in];
                    // A single row sums only its non-zero groups: the same integers.
                    let mut y = vec![0f32; n_out];
                    run(row, 1, &mut y, &mut scratch);
                    assert_eq!(y, batch[r * n_out..(r + 1) * n_out], "{n_in}/{d} row {r}");
                    // Each input is off by at most half a quantization step of the row's
                    // range; summed over the inputs that bounds each output's error.
                    let mut xq = vec![0u8; n_in];
                    let quant = quantize_row(row, Some(&input_scale), None, &mut xq);
                    for o in 0..n_out {
                        let e = expected[r * n_out + o];
                        let bound: f32 = (0..n_in)
                            .map(|i| (wt[i * n_out + o]).abs() * quant.scale * 0.5)
                            .sum::<f32>()
                            + 1e-4 * (1.0 + e.abs());
                        assert!(
                            (y[o] - e).abs() <= bound,
                            "{n_in}x{n_out}/{d} row {r} output {o}: {} vs {e}, bound {bound}",
                            y[o],
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sparse_kernels_match_the_dense_ones() {
        for (n_in, n_out) in [(64, 256), (256, 128), (128, 10), (3, 1), (5, 130)] {
            // About four weights in five zeroed, some whole inputs and outputs left empty.
            let mut wt = values(n_in * n_out, 5);
            for (k, v) in wt.iter_mut().enumerate() {
                if k % 5 != 0 || (k / n_out) % 9 == 4 {
                    *v = 0.0;
                }
            }
            let sparse = SparseWeight::from_in_out(&wt, n_in, n_out, true);
            assert_eq!(sparse.nnz(), wt.iter().filter(|v| **v != 0.0).count());
            for relu in [false, true] {
                let rows = SPARSE_LANES;
                let x = values(rows * n_in, 6);
                let bias = values(n_out, 7);
                let expected = reference(&x, rows, &wt, &bias, relu);
                let mut xt = vec![0.0; n_in * SPARSE_LANES];
                for r in 0..rows {
                    for i in 0..n_in {
                        xt[i * SPARSE_LANES + r] = x[r * n_in + i];
                    }
                }
                let mut yt = vec![0.0; n_out * SPARSE_LANES];
                sparse_batch_t(&sparse, &bias, &xt, &mut yt, relu);
                let mut y = vec![0.0; n_out];
                for r in 0..rows {
                    let mut scratch = RowScratch::default();
                    sparse_row(
                        &sparse,
                        &bias,
                        &x[r * n_in..(r + 1) * n_in],
                        &mut y,
                        relu,
                        &mut scratch,
                    );
                    for o in 0..n_out {
                        let e = expected[r * n_out + o];
                        assert!(
                            (y[o] - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "row {r} out {o}"
                        );
                        let b = yt[o * SPARSE_LANES + r];
                        assert!((b - e).abs() <= 1e-4 * (1.0 + e.abs()), "batch {r} out {o}");
                    }
                }
            }
        }
    }

    #[test]
    fn row_and_batch_kernels_match_a_plain_loop() {
        // Widths that are and are not multiples of the vector (compacted layers are not),
        // with one to three vectors left after the passes of four.
        for (n_in, n_out) in [
            (64, 256),
            (256, 128),
            (128, 10),
            (3, 1),
            (5, 130),
            (50, 165),
            (165, 122),
            (7, 48),
            (9, 100),
        ] {
            for relu in [false, true] {
                let rows = 7;
                let x = values(rows * n_in, 1);
                let wt = values(n_in * n_out, 2);
                let bias = values(n_out, 3);
                let expected = reference(&x, rows, &wt, &bias, relu);
                let padded = pad_columns(&wt, n_in, n_out);
                let mut batch = vec![0.0; rows * n_out];
                dense_batch(&x, rows, n_in, padded.as_slice(), &bias, &mut batch, relu);
                let mut scratch = RowScratch::default();
                for r in 0..rows {
                    let mut y = vec![0.0; n_out];
                    let row = &x[r * n_in..(r + 1) * n_in];
                    dense_row(padded.as_slice(), &bias, row, &mut y, relu, &mut scratch);
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
                dense_row_portable::<false>(
                    padded.as_slice(),
                    &bias,
                    &index,
                    &x[..n_in],
                    &mut portable,
                    relu,
                );
                for o in 0..n_out {
                    let e = expected[o];
                    assert!((portable[o] - e).abs() <= 1e-4 * (1.0 + e.abs()));
                }
            }
        }
    }
}
