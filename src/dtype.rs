//! Element types of the row losses' inputs and gradients: f32, bf16 and f16 (`docs/LOSSES.md`,
//! half precision).
//!
//! Every backend buffer carries its [`Dtype`]. The row losses (softmax, the divergences,
//! cross-entropy, Hinton, DKD) read their inputs in the input buffers' dtypes, compute in f32 (f64
//! on the reference backend) and write each gradient in the dtype of the buffer it goes to (the
//! student's own for an in-place gradient), rounding once, to nearest even. Losses and row losses
//! are f32. The other ops take f32 buffers only.

use half::{bf16, f16};

/// The element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Dtype {
    /// IEEE binary32.
    #[default]
    F32,
    /// bfloat16: f32's exponent range, 8 significant bits.
    Bf16,
    /// IEEE binary16: 11 significant bits, largest finite 65504.
    F16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// `f32`, `bf16`, `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }

    /// The code the kernels and the C ABI use: 0 f32, 1 bf16, 2 f16.
    pub fn code(self) -> u32 {
        match self {
            Dtype::F32 => 0,
            Dtype::Bf16 => 1,
            Dtype::F16 => 2,
        }
    }

    /// The dtype of a code of [`Dtype::code`].
    pub fn from_code(code: i64) -> Option<Dtype> {
        match code {
            0 => Some(Dtype::F32),
            1 => Some(Dtype::Bf16),
            2 => Some(Dtype::F16),
            _ => None,
        }
    }

    /// `v` rounded to this dtype (to nearest, ties to even), as an f32.
    pub fn round(self, v: f32) -> f32 {
        match self {
            Dtype::F32 => v,
            Dtype::Bf16 => bf16::from_f32(v).to_f32(),
            Dtype::F16 => f16::from_f32(v).to_f32(),
        }
    }

    /// `v` rounded once from f64 to this dtype, as an f64 (the reference's stores).
    pub fn round_f64(self, v: f64) -> f64 {
        match self {
            Dtype::F32 => v as f32 as f64,
            Dtype::Bf16 => bf16::from_f64(v).to_f64(),
            Dtype::F16 => f16::from_f64(v).to_f64(),
        }
    }

    /// The distance from `v` to the next representable value of this dtype away from zero (its
    /// unit in the last place at `v`): the error budget of `docs/LOSSES.md` is stated in it.
    pub fn ulp(self, v: f64) -> f64 {
        let r = self.round_f64(v).abs();
        let next = match self {
            Dtype::F32 => f32::from_bits((r as f32).to_bits() + 1) as f64,
            Dtype::Bf16 => bf16::from_bits(bf16::from_f64(r).to_bits() + 1).to_f64(),
            Dtype::F16 => f16::from_bits(f16::from_f64(r).to_bits() + 1).to_f64(),
        };
        next - r
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// A host element type a buffer can hold: `f32`, [`half::bf16`] or [`half::f16`].
pub trait Element:
    Copy + Default + Send + Sync + std::fmt::Debug + 'static + sealed::Sealed
{
    const DTYPE: Dtype;
    fn to_f32(self) -> f32;
    /// Rounded to nearest, ties to even.
    fn from_f32(v: f32) -> Self;
    /// A slice of this type as a [`HostSlice`].
    fn host(data: &[Self]) -> HostSlice<'_>;
    /// A [`HostVec`] as a vector of this type, converting (exactly, or rounding to nearest even
    /// where the vector's type is wider).
    fn from_host(v: HostVec) -> Vec<Self>;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn host(data: &[Self]) -> HostSlice<'_> {
        HostSlice::F32(data)
    }
    fn from_host(v: HostVec) -> Vec<Self> {
        v.to_f32()
    }
}

impl Element for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn host(data: &[Self]) -> HostSlice<'_> {
        HostSlice::Bf16(data)
    }
    fn from_host(v: HostVec) -> Vec<Self> {
        match v {
            HostVec::Bf16(v) => v,
            other => other.to_f32().into_iter().map(bf16::from_f32).collect(),
        }
    }
}

impl Element for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn host(data: &[Self]) -> HostSlice<'_> {
        HostSlice::F16(data)
    }
    fn from_host(v: HostVec) -> Vec<Self> {
        match v {
            HostVec::F16(v) => v,
            other => other.to_f32().into_iter().map(f16::from_f32).collect(),
        }
    }
}

/// Borrowed host data of one of the dtypes.
#[derive(Clone, Copy, Debug)]
pub enum HostSlice<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl HostSlice<'_> {
    pub fn dtype(&self) -> Dtype {
        match self {
            HostSlice::F32(_) => Dtype::F32,
            HostSlice::Bf16(_) => Dtype::Bf16,
            HostSlice::F16(_) => Dtype::F16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            HostSlice::F32(v) => v.len(),
            HostSlice::Bf16(v) => v.len(),
            HostSlice::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements' bytes, little-endian as in memory.
    pub fn bytes(&self) -> &[u8] {
        match self {
            HostSlice::F32(v) => bytemuck::cast_slice(v),
            HostSlice::Bf16(v) => bytemuck::cast_slice(v),
            HostSlice::F16(v) => bytemuck::cast_slice(v),
        }
    }

    /// An owned copy.
    pub fn to_vec(&self) -> HostVec {
        match self {
            HostSlice::F32(v) => HostVec::F32(v.to_vec()),
            HostSlice::Bf16(v) => HostVec::Bf16(v.to_vec()),
            HostSlice::F16(v) => HostVec::F16(v.to_vec()),
        }
    }

    /// The values as f32 (exact).
    pub fn to_f32(&self) -> Vec<f32> {
        self.to_vec().to_f32()
    }
}

/// Owned host data of one of the dtypes.
#[derive(Clone, Debug, PartialEq)]
pub enum HostVec {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Default for HostVec {
    fn default() -> Self {
        HostVec::F32(Vec::new())
    }
}

impl HostVec {
    /// `len` zeros of `dtype`.
    pub fn zeros(dtype: Dtype, len: usize) -> HostVec {
        match dtype {
            Dtype::F32 => HostVec::F32(vec![0.0; len]),
            Dtype::Bf16 => HostVec::Bf16(vec![bf16::ZERO; len]),
            Dtype::F16 => HostVec::F16(vec![f16::ZERO; len]),
        }
    }

    /// `bytes` (little-endian elements of `dtype`) as a vector.
    pub fn from_bytes(dtype: Dtype, bytes: &[u8]) -> HostVec {
        match dtype {
            Dtype::F32 => HostVec::F32(bytemuck::pod_collect_to_vec(bytes)),
            Dtype::Bf16 => HostVec::Bf16(bytemuck::pod_collect_to_vec(bytes)),
            Dtype::F16 => HostVec::F16(bytemuck::pod_collect_to_vec(bytes)),
        }
    }

    pub fn dtype(&self) -> Dtype {
        self.as_slice().dtype()
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> HostSlice<'_> {
        match self {
            HostVec::F32(v) => HostSlice::F32(v),
            HostVec::Bf16(v) => HostSlice::Bf16(v),
            HostVec::F16(v) => HostSlice::F16(v),
        }
    }

    /// The values as f32 (exact).
    pub fn to_f32(self) -> Vec<f32> {
        match self {
            HostVec::F32(v) => v,
            HostVec::Bf16(v) => v.into_iter().map(f32::from).collect(),
            HostVec::F16(v) => v.into_iter().map(f32::from).collect(),
        }
    }

    /// The values as f64 (exact).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            HostVec::F32(v) => v.iter().map(|&x| x as f64).collect(),
            HostVec::Bf16(v) => v.iter().map(|x| x.to_f64()).collect(),
            HostVec::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
        }
    }

    /// Stores `values`, each rounded once to this vector's dtype (to nearest, ties to even).
    pub fn store_f64(&mut self, values: &[f64]) {
        match self {
            HostVec::F32(d) => d.iter_mut().zip(values).for_each(|(d, &v)| *d = v as f32),
            HostVec::Bf16(d) => d
                .iter_mut()
                .zip(values)
                .for_each(|(d, &v)| *d = bf16::from_f64(v)),
            HostVec::F16(d) => d
                .iter_mut()
                .zip(values)
                .for_each(|(d, &v)| *d = f16::from_f64(v)),
        }
    }

    /// The f32 elements, when this is an f32 vector.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            HostVec::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The f32 elements, when this is an f32 vector.
    pub fn as_f32_mut(&mut self) -> Option<&mut Vec<f32>> {
        match self {
            HostVec::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The first element's address (for the kernels that read any dtype).
    pub(crate) fn as_ptr(&self) -> *const u8 {
        match self {
            HostVec::F32(v) => v.as_ptr().cast(),
            HostVec::Bf16(v) => v.as_ptr().cast(),
            HostVec::F16(v) => v.as_ptr().cast(),
        }
    }

    /// The first element's address, for writing.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            HostVec::F32(v) => v.as_mut_ptr().cast(),
            HostVec::Bf16(v) => v.as_mut_ptr().cast(),
            HostVec::F16(v) => v.as_mut_ptr().cast(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even_and_ulps_are_right() {
        // 1 + 2^-8 is halfway between bf16's 1 and 1 + 2^-7: ties to even (1).
        assert_eq!(Dtype::Bf16.round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(Dtype::Bf16.round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(Dtype::F16.round(65520.0), f32::INFINITY);
        assert_eq!(Dtype::Bf16.ulp(1.0), 1.0 / 128.0);
        assert_eq!(Dtype::F16.ulp(1.0), 1.0 / 1024.0);
        assert_eq!(Dtype::F32.ulp(1.0), f32::EPSILON as f64);
        for d in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            assert_eq!(Dtype::from_code(d.code() as i64), Some(d));
        }
        assert_eq!(Dtype::from_code(3), None);
    }

    #[test]
    fn host_vectors_convert_exactly() {
        let v = HostVec::Bf16(vec![bf16::from_f32(1.5), bf16::from_f32(-0.25)]);
        assert_eq!(v.to_f64(), vec![1.5, -0.25]);
        let mut w = HostVec::zeros(Dtype::F16, 2);
        w.store_f64(&[1.0 + 1e-4, 70000.0]);
        assert_eq!(w.to_f32(), vec![1.0, f32::INFINITY]);
        assert_eq!(HostVec::from_bytes(Dtype::Bf16, v.as_slice().bytes()), v);
    }
}
