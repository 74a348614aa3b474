//! The AVX2/FMA micro-kernel of [`crate::product`]: a 6 × 16 tile of the output held in twelve
//! 256-bit registers, one fused multiply-add per element and step of the inner dimension, in the
//! order of the portable kernel (`acc = a · b + acc`, `k` ascending), so both give the same bits.

use std::arch::x86_64::{_mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_storeu_ps};

use crate::product::{MR, NR};

/// True when this CPU runs [`kernel_6x16`].
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `c[i, j] (+)= Σ_p a[p · MR + i] · b[p · NR + j]` for the `MR × NR` tile at `c` (rows `ldc`
/// apart), `p` in `0..kc`; with `accumulate` the sums start from `c`'s values, else from zero.
///
/// # Safety
/// The CPU has AVX2 and FMA ([`available`]); `a` holds `kc · MR` values, `b` `kc · NR`, and `c`
/// points at `MR` rows of `NR` writable values `ldc` apart that nothing else accesses meanwhile.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn kernel_6x16(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
    const { assert!(MR == 6 && NR == 16) };
    // SAFETY: the caller guarantees the extents of `a`, `b` and `c` documented above.
    unsafe {
        let z = _mm256_setzero_ps();
        let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (z, z, z, z, z, z);
        let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (z, z, z, z, z, z);
        if accumulate {
            // Macros, not closures: a closure would not inherit this function's target features.
            macro_rules! ld {
                ($i:expr, $h:expr) => {
                    _mm256_loadu_ps(c.add($i * ldc + 8 * $h))
                };
            }
            (c00, c01, c10, c11, c20, c21) = (ld!(0, 0), ld!(0, 1), ld!(1, 0), ld!(1, 1), ld!(2, 0), ld!(2, 1));
            (c30, c31, c40, c41, c50, c51) = (ld!(3, 0), ld!(3, 1), ld!(4, 0), ld!(4, 1), ld!(5, 0), ld!(5, 1));
        }
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            let x = _mm256_broadcast_ss(&*a);
            c00 = _mm256_fmadd_ps(x, b0, c00);
            c01 = _mm256_fmadd_ps(x, b1, c01);
            let x = _mm256_broadcast_ss(&*a.add(1));
            c10 = _mm256_fmadd_ps(x, b0, c10);
            c11 = _mm256_fmadd_ps(x, b1, c11);
            let x = _mm256_broadcast_ss(&*a.add(2));
            c20 = _mm256_fmadd_ps(x, b0, c20);
            c21 = _mm256_fmadd_ps(x, b1, c21);
            let x = _mm256_broadcast_ss(&*a.add(3));
            c30 = _mm256_fmadd_ps(x, b0, c30);
            c31 = _mm256_fmadd_ps(x, b1, c31);
            let x = _mm256_broadcast_ss(&*a.add(4));
            c40 = _mm256_fmadd_ps(x, b0, c40);
            c41 = _mm256_fmadd_ps(x, b1, c41);
            let x = _mm256_broadcast_ss(&*a.add(5));
            c50 = _mm256_fmadd_ps(x, b0, c50);
            c51 = _mm256_fmadd_ps(x, b1, c51);
            a = a.add(MR);
            b = b.add(NR);
        }
        macro_rules! st {
            ($i:expr, $h:expr, $v:expr) => {
                _mm256_storeu_ps(c.add($i * ldc + 8 * $h), $v)
            };
        }
        st!(0, 0, c00);
        st!(0, 1, c01);
        st!(1, 0, c10);
        st!(1, 1, c11);
        st!(2, 0, c20);
        st!(2, 1, c21);
        st!(3, 0, c30);
        st!(3, 1, c31);
        st!(4, 0, c40);
        st!(4, 1, c41);
        st!(5, 0, c50);
        st!(5, 1, c51);
    }
}
