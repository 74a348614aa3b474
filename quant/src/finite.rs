//! Finding NaN and infinities in tensors that are copied unchanged (norms, embeddings, routers):
//! a checkpoint that holds one is refused as bad input, as a quantized weight holding one is.

use fp8forge_formats::Dtype;

/// Elements tested per step: a step is a branch-free pass (which vectorizes), and only a step
/// that found something is searched element by element.
const STEP: usize = 4096;

/// The index (in elements) and value of the first NaN or infinity of `data`, little-endian
/// elements of `dtype`; `None` when all are finite or the dtype is not a floating-point one
/// fp8forge reads (BF16, F16, F32, F64).
pub fn first_non_finite(data: &[u8], dtype: Dtype) -> Option<(usize, f64)> {
    match dtype {
        // A value is not finite when its exponent field is all ones.
        Dtype::BF16 => scan::<2>(
            data,
            |b| u16::from_le_bytes(b) & 0x7F80 == 0x7F80,
            |b| f64::from(f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)),
        ),
        Dtype::F16 => scan::<2>(
            data,
            |b| u16::from_le_bytes(b) & 0x7C00 == 0x7C00,
            |b| f64::from(half::f16::from_le_bytes(b).to_f32()),
        ),
        Dtype::F32 => scan::<4>(
            data,
            |b| u32::from_le_bytes(b) & 0x7F80_0000 == 0x7F80_0000,
            |b| f64::from(f32::from_le_bytes(b)),
        ),
        Dtype::F64 => scan::<8>(
            data,
            |b| u64::from_le_bytes(b) & 0x7FF0_0000_0000_0000 == 0x7FF0_0000_0000_0000,
            f64::from_le_bytes,
        ),
        _ => None,
    }
}

fn scan<const N: usize>(
    data: &[u8],
    bad: impl Fn([u8; N]) -> bool,
    value: impl Fn([u8; N]) -> f64,
) -> Option<(usize, f64)> {
    let (elems, _) = data.as_chunks::<N>();
    for (s, step) in elems.chunks(STEP).enumerate() {
        if step.iter().fold(false, |any, &e| any | bad(e)) {
            let i = step.iter().position(|&e| bad(e))?;
            return Some((s * STEP + i, value(step[i])));
        }
    }
    None
}

/// The multi-dimensional index of element `flat` of a row-major tensor of `shape`.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            index[i] = flat % d;
            flat /= d;
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_non_finite_bf16_and_f16_pattern_is_found_and_no_finite_one() {
        for bits in 0..=u16::MAX {
            let b = bits.to_le_bytes();
            let bf = f32::from_bits(u32::from(bits) << 16);
            assert_eq!(first_non_finite(&b, Dtype::BF16).is_some(), !bf.is_finite(), "BF16 {bits:#06x}");
            let h = half::f16::from_bits(bits).to_f32();
            assert_eq!(first_non_finite(&b, Dtype::F16).is_some(), !h.is_finite(), "F16 {bits:#06x}");
        }
    }

    #[test]
    fn the_first_one_is_reported_with_its_position_across_steps() {
        let mut v = vec![1.5f32; 3 * STEP + 7];
        v[2 * STEP + 5] = f32::NEG_INFINITY;
        v[3 * STEP + 1] = f32::NAN;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_non_finite(&bytes, Dtype::F32), Some((2 * STEP + 5, f64::NEG_INFINITY)));
        let d: Vec<u8> = [0.0f64, f64::MAX, f64::INFINITY].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_non_finite(&d, Dtype::F64), Some((2, f64::INFINITY)));
        assert_eq!(first_non_finite(&[0xFF; 16], Dtype::I64), None, "integers are never non-finite");
        assert_eq!(unravel(2 * 12 + 4 + 3, &[5, 3, 4]), [2, 1, 3]);
    }
}
