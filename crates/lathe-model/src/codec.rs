//! The entropy coder behind the artifact's tensor storage (format version 2): an adaptive
//! binary range coder (LZMA's carry-less design) whose probabilities come from counts
//! (the Krichevsky–Trofimov estimator), so a stream costs within a few bytes per context of
//! its empirical entropy.
//!
//! Three stream kinds are built on it, each coded on its own so that its statistics are not
//! mixed with another's (zstd over the whole body shares one literal table between
//! mantissas, exponents, positions and int8 values):
//! - [`encode_bytes`]: a byte string with an order-0 model (a binary tree of 255 contexts
//!   over the bits of each byte, most significant first). Used for each byte plane of `f32`
//!   values and for int8 data. A stream that would not shrink (the low mantissa planes) is
//!   stored raw, marked by its first byte.
//! - [`encode_positions`]: the set of non-zero positions of a `[rows][cols]` tensor as a
//!   bitmap, one binary decision per element with one context per column (an input
//!   feature or neuron): pruning leaves whole columns empty or nearly so, and a per-column
//!   model codes those at almost no cost, below the order-0 entropy of the bitmap.
//! - [`encode_f32`]: `f32` values as four byte planes (lowest byte of every value first),
//!   each an [`encode_bytes`] stream.
//!
//! Decoding never panics: a stream that ends early, declares more values than it can hold
//! or has an unknown mode is a [`CodecError`].

/// Why a coded stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("the coded stream ends early")]
    Truncated,
    #[error("the coded stream has unknown mode {0}")]
    UnknownMode(u8),
    #[error("the coded stream declares {0} values, more than it can hold")]
    TooLong(u64),
    #[error("{0} unexpected bytes after the coded stream")]
    Trailing(usize),
}

/// Byte streams coded with the adaptive model.
const MODE_CODED: u8 = 1;
/// Byte streams stored as they are (when coding would not make them smaller).
const MODE_RAW: u8 = 0;
/// Probabilities are 16-bit fixed point.
const PROB_BITS: u32 = 16;
/// Counts are halved past this total: high enough to act as a plain frequency count on
/// any tensor lathe stores, low enough that a context cannot lock in a probability of 0.
const MAX_COUNT: u32 = 1 << 15;
/// The range coder's normalisation threshold.
const TOP: u32 = 1 << 24;

/// The adaptive estimate of one binary context: how often it saw 0 and 1.
#[derive(Debug, Clone, Copy, Default)]
struct BitModel {
    zeros: u32,
    ones: u32,
}

impl BitModel {
    /// P(bit = 0) in 16-bit fixed point, by the KT estimator (counts + ½), kept inside
    /// (0, 1) so that either bit stays codable.
    fn p0(&self) -> u32 {
        let num = (2 * u64::from(self.zeros) + 1) << PROB_BITS;
        let den = 2 * (u64::from(self.zeros) + u64::from(self.ones)) + 2;
        ((num / den) as u32).clamp(1, (1 << PROB_BITS) - 1)
    }

    fn update(&mut self, bit: bool) {
        if bit {
            self.ones += 1;
        } else {
            self.zeros += 1;
        }
        if self.zeros + self.ones > MAX_COUNT {
            self.zeros = self.zeros.div_ceil(2);
            self.ones = self.ones.div_ceil(2);
        }
    }
}

/// The range encoder (the carry propagation of LZMA's `rc_shift_low`).
struct Encoder {
    low: u64,
    range: u32,
    cache: u8,
    cache_size: u64,
    out: Vec<u8>,
}

impl Encoder {
    fn new() -> Encoder {
        Encoder {
            low: 0,
            range: u32::MAX,
            cache: 0,
            cache_size: 1,
            out: Vec::new(),
        }
    }

    fn bit(&mut self, model: &mut BitModel, bit: bool) {
        let bound = (self.range >> PROB_BITS) * model.p0();
        if bit {
            self.low += u64::from(bound);
            self.range -= bound;
        } else {
            self.range = bound;
        }
        model.update(bit);
        while self.range < TOP {
            self.range <<= 8;
            self.shift_low();
        }
    }

    fn shift_low(&mut self) {
        if self.low < 0xFF00_0000 || self.low > 0xFFFF_FFFF {
            let carry = (self.low >> 32) as u8;
            let mut temp = self.cache;
            loop {
                self.out.push(temp.wrapping_add(carry));
                temp = 0xFF;
                self.cache_size -= 1;
                if self.cache_size == 0 {
                    break;
                }
            }
            self.cache = ((self.low >> 24) & 0xFF) as u8;
        }
        self.cache_size += 1;
        self.low = (self.low & 0x00FF_FFFF) << 8;
    }

    /// The coded bytes. The first byte LZMA's scheme emits is always 0 and is dropped.
    fn finish(mut self) -> Vec<u8> {
        for _ in 0..5 {
            self.shift_low();
        }
        self.out.remove(0);
        self.out
    }
}

/// The range decoder over a byte slice.
struct Decoder<'a> {
    input: &'a [u8],
    at: usize,
    range: u32,
    code: u32,
}

impl<'a> Decoder<'a> {
    fn new(input: &'a [u8]) -> Result<Decoder<'a>, CodecError> {
        if input.len() < 4 {
            return Err(CodecError::Truncated);
        }
        let code = u32::from_be_bytes([input[0], input[1], input[2], input[3]]);
        Ok(Decoder {
            input,
            at: 4,
            range: u32::MAX,
            code,
        })
    }

    fn bit(&mut self, model: &mut BitModel) -> Result<bool, CodecError> {
        let bound = (self.range >> PROB_BITS) * model.p0();
        let bit = if self.code < bound {
            self.range = bound;
            false
        } else {
            self.code -= bound;
            self.range -= bound;
            true
        };
        model.update(bit);
        while self.range < TOP {
            // The encoder flushes four bytes past the last decision, so a valid stream is
            // never read past its end.
            let byte = *self.input.get(self.at).ok_or(CodecError::Truncated)?;
            self.at += 1;
            self.range <<= 8;
            self.code = (self.code << 8) | u32::from(byte);
        }
        Ok(bit)
    }

    /// Fails when bytes are left over after the last decision.
    fn finish(self) -> Result<(), CodecError> {
        match self.input.len() - self.at {
            0 => Ok(()),
            extra => Err(CodecError::Trailing(extra)),
        }
    }
}

/// Appends `value` as a LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let low = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

/// Reads a LEB128 varint from the front of `input`, advancing it.
pub(crate) fn take_varint(input: &mut &[u8]) -> Result<u64, CodecError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first().ok_or(CodecError::Truncated)?;
        *input = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(CodecError::Truncated)
}

/// Takes `n` bytes from the front of `input`.
fn take<'a>(input: &mut &'a [u8], n: u64) -> Result<&'a [u8], CodecError> {
    let n = usize::try_from(n).map_err(|_| CodecError::TooLong(n))?;
    if n > input.len() {
        return Err(CodecError::Truncated);
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Ok(head)
}

/// Codes `bytes` with an adaptive order-0 model: `[mode][varint count][payload]`, where the
/// payload is the bytes themselves when that is not larger than the coded form.
pub fn encode_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 8);
    let coded = if bytes.is_empty() {
        Vec::new()
    } else {
        let mut models = [BitModel::default(); 256];
        let mut enc = Encoder::new();
        for &b in bytes {
            let mut node = 1usize;
            for shift in (0..8).rev() {
                let bit = (b >> shift) & 1 == 1;
                enc.bit(&mut models[node], bit);
                node = (node << 1) | usize::from(bit);
            }
        }
        enc.finish()
    };
    if bytes.is_empty() || coded.len() >= bytes.len() {
        out.push(MODE_RAW);
        put_varint(&mut out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    } else {
        out.push(MODE_CODED);
        put_varint(&mut out, bytes.len() as u64);
        put_varint(&mut out, coded.len() as u64);
        out.extend_from_slice(&coded);
    }
    out
}

/// Decodes one [`encode_bytes`] stream from the front of `input`, advancing it.
pub fn decode_bytes(input: &mut &[u8]) -> Result<Vec<u8>, CodecError> {
    let (&mode, rest) = input.split_first().ok_or(CodecError::Truncated)?;
    *input = rest;
    let count = take_varint(input)?;
    match mode {
        MODE_RAW => Ok(take(input, count)?.to_vec()),
        MODE_CODED => {
            let len = take_varint(input)?;
            let payload = take(input, len)?;
            // A decision costs at least 2^-16 bits, so a byte (8 decisions) costs at least
            // 2^-13: a payload of `len` bytes cannot hold more than 2^16 · len values. This
            // bounds the work and memory a damaged count can ask for.
            if count > (len + 1).saturating_mul(1 << 16) {
                return Err(CodecError::TooLong(count));
            }
            let mut models = [BitModel::default(); 256];
            let mut dec = Decoder::new(payload)?;
            let mut bytes = Vec::with_capacity(count.min(1 << 20) as usize);
            for _ in 0..count {
                let mut node = 1usize;
                for _ in 0..8 {
                    let bit = dec.bit(&mut models[node])?;
                    node = (node << 1) | usize::from(bit);
                }
                bytes.push((node & 0xff) as u8);
            }
            dec.finish()?;
            Ok(bytes)
        }
        other => Err(CodecError::UnknownMode(other)),
    }
}

/// Codes `f32` values as their four little-endian byte planes, each an [`encode_bytes`]
/// stream: `[varint count][plane 0]…[plane 3]`. Lossless, bit for bit.
pub fn encode_f32(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(&mut out, values.len() as u64);
    for plane in 0..4 {
        let bytes: Vec<u8> = values.iter().map(|v| v.to_le_bytes()[plane]).collect();
        out.extend_from_slice(&encode_bytes(&bytes));
    }
    out
}

/// Decodes one [`encode_f32`] stream from the front of `input`, advancing it.
pub fn decode_f32(input: &mut &[u8]) -> Result<Vec<f32>, CodecError> {
    let count = take_varint(input)?;
    let mut planes = Vec::with_capacity(4);
    for _ in 0..4 {
        let plane = decode_bytes(input)?;
        if plane.len() as u64 != count {
            return Err(CodecError::TooLong(plane.len() as u64));
        }
        planes.push(plane);
    }
    Ok((0..planes[0].len())
        .map(|i| f32::from_le_bytes([planes[0][i], planes[1][i], planes[2][i], planes[3][i]]))
        .collect())
}

/// Codes the strictly increasing positions (row-major in a tensor of `elements` elements
/// with rows of `cols`) as a bitmap: `[mode][range-coded bits]`, with one adaptive context
/// per column (mode 1) or one for the whole tensor (mode 0), whichever is smaller — a
/// column's context costs about ½·log₂(rows) bits to learn, more than it saves on a
/// tensor with only a handful of non-zeros.
pub fn encode_positions(positions: &[u32], elements: usize, cols: usize) -> Vec<u8> {
    let cols = cols.max(1);
    let code = |contexts: usize| {
        let mut models = vec![BitModel::default(); contexts];
        let mut enc = Encoder::new();
        let mut next = positions.iter().peekable();
        for p in 0..elements {
            let set = next.peek().is_some_and(|&&q| q as usize == p);
            if set {
                next.next();
            }
            enc.bit(&mut models[p % contexts], set);
        }
        enc.finish()
    };
    let (global, by_column) = (code(1), code(cols));
    let (mode, body) = if by_column.len() < global.len() {
        (MODE_CODED, by_column)
    } else {
        (MODE_RAW, global)
    };
    let mut out = Vec::with_capacity(body.len() + 1);
    out.push(mode);
    out.extend_from_slice(&body);
    out
}

/// Decodes an [`encode_positions`] stream of a tensor of `elements` elements with rows of
/// `cols`.
pub fn decode_positions(
    bytes: &[u8],
    elements: usize,
    cols: usize,
) -> Result<Vec<u32>, CodecError> {
    let cols = cols.max(1);
    if u32::try_from(elements).is_err() {
        return Err(CodecError::TooLong(elements as u64));
    }
    // Each element's decision costs at least 2^-16 bits (see `decode_bytes`).
    if elements as u64 > (bytes.len() as u64 + 1).saturating_mul(1 << 19) {
        return Err(CodecError::TooLong(elements as u64));
    }
    let (&mode, bytes) = bytes.split_first().ok_or(CodecError::Truncated)?;
    let contexts = match mode {
        MODE_RAW => 1,
        MODE_CODED => cols,
        other => return Err(CodecError::UnknownMode(other)),
    };
    let mut models = vec![BitModel::default(); contexts];
    let mut dec = Decoder::new(bytes)?;
    let mut positions = Vec::new();
    for p in 0..elements {
        if dec.bit(&mut models[p % contexts])? {
            positions.push(p as u32);
        }
    }
    dec.finish()?;
    Ok(positions)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream of pseudo-random `u32`s.
    fn lcg(seed: u32) -> impl FnMut() -> u32 {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(7);
        move || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            state
        }
    }

    #[test]
    fn bytes_round_trip_and_skewed_bytes_shrink_to_their_entropy() {
        let mut next = lcg(1);
        // About 3 bits of entropy per byte: values 0..8, uniform.
        let skewed: Vec<u8> = (0..20_000).map(|_| (next() >> 29) as u8).collect();
        let coded = encode_bytes(&skewed);
        assert!(
            coded.len() < 20_000 * 3 / 8 + 200,
            "{} bytes for 3 bits a value",
            coded.len()
        );
        let mut input = coded.as_slice();
        assert_eq!(decode_bytes(&mut input).unwrap(), skewed);
        assert!(input.is_empty());
        // Random bytes do not shrink: stored raw, one mode byte and the count extra.
        let random: Vec<u8> = (0..1000).map(|_| (next() >> 24) as u8).collect();
        let coded = encode_bytes(&random);
        assert!(coded.len() <= 1000 + 3);
        assert_eq!(decode_bytes(&mut coded.as_slice()).unwrap(), random);
        for edge in [vec![], vec![0u8], vec![255u8; 3], vec![7u8; 100_000]] {
            let coded = encode_bytes(&edge);
            assert_eq!(decode_bytes(&mut coded.as_slice()).unwrap(), edge);
        }
    }

    #[test]
    fn f32_values_round_trip_bit_for_bit() {
        let mut next = lcg(2);
        let mut values: Vec<f32> = (0..5000)
            .map(|_| (next() as f32 / u32::MAX as f32 - 0.5) * 0.1)
            .collect();
        values.extend([0.0, -0.0, f32::MIN_POSITIVE, 1e-45, f32::MAX, -1.0]);
        let coded = encode_f32(&values);
        let mut input = coded.as_slice();
        let back = decode_f32(&mut input).unwrap();
        assert!(input.is_empty());
        assert_eq!(back.len(), values.len());
        assert!(
            back.iter()
                .zip(&values)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        // Narrow weights: the sign/exponent plane codes to well under a byte a value.
        assert!(
            coded.len() < values.len() * 4 - values.len() / 2,
            "{}",
            coded.len()
        );
    }

    #[test]
    fn positions_round_trip_and_cost_about_their_entropy() {
        let mut next = lcg(3);
        let (rows, cols) = (256, 200);
        // 10 % density in the first half of the columns, none in the rest (dead inputs).
        let positions: Vec<u32> = (0..rows * cols)
            .filter(|p| p % cols < cols / 2 && next().is_multiple_of(10))
            .map(|p| p as u32)
            .collect();
        let coded = encode_positions(&positions, rows * cols, cols);
        assert_eq!(
            decode_positions(&coded, rows * cols, cols).unwrap(),
            positions
        );
        // The entropy of a 10 % bitmap over the live half is 0.469 bits an element:
        // 1.5 KB; the empty half costs next to nothing with per-column contexts (an
        // order-0 bitmap model would pay for the whole 5 % density instead: 1.8 KB).
        let live = (rows * cols / 2) as f64 * 0.469 / 8.0;
        assert!(
            (coded.len() as f64) < live * 1.06 + 64.0,
            "{} vs {live}",
            coded.len()
        );
        // And it is proportional to the non-zeros: a hundredth of them is much smaller.
        let few: Vec<u32> = positions.iter().copied().step_by(100).collect();
        let small = encode_positions(&few, rows * cols, cols);
        assert!(
            small.len() * 5 < coded.len(),
            "{} vs {}",
            small.len(),
            coded.len()
        );
        assert_eq!(decode_positions(&small, rows * cols, cols).unwrap(), few);
        for edge in [vec![], vec![0u32], vec![(rows * cols - 1) as u32]] {
            let coded = encode_positions(&edge, rows * cols, cols);
            assert_eq!(decode_positions(&coded, rows * cols, cols).unwrap(), edge);
        }
    }

    #[test]
    fn damaged_streams_are_errors_not_panics() {
        let values: Vec<u8> = (0..3000u32).map(|k| (k % 7) as u8).collect();
        let coded = encode_bytes(&values);
        for cut in [0, 1, 2, 5, coded.len() / 2, coded.len() - 1] {
            assert!(decode_bytes(&mut &coded[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_mode = coded.clone();
        bad_mode[0] = 9;
        assert_eq!(
            decode_bytes(&mut bad_mode.as_slice()),
            Err(CodecError::UnknownMode(9))
        );
        // A count far beyond what the payload can hold is refused before decoding.
        let mut huge = vec![MODE_CODED];
        put_varint(&mut huge, 1 << 40);
        put_varint(&mut huge, 4);
        huge.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            decode_bytes(&mut huge.as_slice()),
            Err(CodecError::TooLong(1 << 40))
        );
        let positions = encode_positions(&[3, 70, 900], 1000, 10);
        assert!(decode_positions(&positions[..positions.len() - 1], 1000, 10).is_err());
        assert!(decode_positions(&[], 1000, 10).is_err());
        assert!(decode_positions(&positions, 1 << 40, 10).is_err());
        let mut extra = positions.clone();
        extra.push(0);
        assert_eq!(
            decode_positions(&extra, 1000, 10),
            Err(CodecError::Trailing(1))
        );
        // Flipped bytes decode to something or fail, but never panic.
        for i in 0..coded.len() {
            let mut flipped = coded.clone();
            flipped[i] ^= 0x5a;
            let _ = decode_bytes(&mut flipped.as_slice());
        }
    }
}
