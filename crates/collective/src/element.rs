//! The element types a collective moves, and the reductions over them.
//!
//! 16-bit floats (`bf16`, `f16`) accumulate in `f32` and round once at the end, as
//! NCCL does, so a sum over eight ranks loses no more precision than one rounding.

use half::{bf16, f16};
use std::fmt;

/// Runtime name of an element type, carried in fingerprints and error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 32-bit IEEE float.
    F32,
    /// 64-bit IEEE float.
    F64,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// Byte.
    U8,
}

impl Dtype {
    /// Every type, in the order the self-test runs them.
    pub const ALL: [Dtype; 7] = [Dtype::F32, Dtype::F64, Dtype::Bf16, Dtype::F16, Dtype::I32, Dtype::I64, Dtype::U8];

    /// Its short name (`f32`, `bf16`...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::I32 => "i32",
            Dtype::I64 => "i64",
            Dtype::U8 => "u8",
        }
    }

    /// Whether it is a floating-point type (AVG is defined only for those).
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F64 | Dtype::Bf16 | Dtype::F16)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::U8 => 1,
        }
    }

    pub(crate) fn code(self) -> u64 {
        Dtype::ALL.iter().position(|d| *d == self).unwrap_or(0) as u64
    }

    pub(crate) fn from_code(code: u64) -> Option<Dtype> {
        Dtype::ALL.get(code as usize).copied()
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Reduction operators of `all_reduce`, `reduce_scatter` and `reduce`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Sum divided by the group size; floats only.
    Avg,
    /// Elementwise maximum.
    Max,
    /// Elementwise minimum.
    Min,
    /// Elementwise product.
    Prod,
}

impl ReduceOp {
    /// Every operator.
    pub const ALL: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min, ReduceOp::Prod];

    /// Its name (`sum`, `avg`...).
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::Prod => "prod",
        }
    }

    pub(crate) fn code(self) -> u64 {
        ReduceOp::ALL.iter().position(|o| *o == self).unwrap_or(0) as u64
    }

    pub(crate) fn from_code(code: u64) -> Option<ReduceOp> {
        ReduceOp::ALL.get(code as usize).copied()
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The arithmetic a reduction needs, on the accumulator type.
pub trait Accumulator: Copy + Send + Sync + 'static {
    fn add(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    fn max(self, other: Self) -> Self;
    fn min(self, other: Self) -> Self;
    /// `self / n` for AVG; integers never get here (AVG on them is refused up front).
    fn div_count(self, n: usize) -> Self;
}

/// A type the collectives can move and reduce.
///
/// # Safety
/// Implementors must be plain data: any bit pattern valid, no padding, no pointers,
/// because peers read them straight out of shared memory.
pub unsafe trait Element: Copy + Send + Sync + Default + PartialEq + fmt::Debug + 'static {
    /// The wire type.
    const DTYPE: Dtype;
    /// The type sums are accumulated in (f32 for the 16-bit floats).
    type Acc: Accumulator;
    /// Widens to the accumulator.
    fn to_acc(self) -> Self::Acc;
    /// Rounds back from the accumulator.
    fn from_acc(acc: Self::Acc) -> Self;
}

macro_rules! float_acc {
    ($t:ty) => {
        impl Accumulator for $t {
            #[inline(always)]
            fn add(self, other: Self) -> Self {
                self + other
            }
            #[inline(always)]
            fn mul(self, other: Self) -> Self {
                self * other
            }
            /// NaN-propagating, like `torch.maximum` and NCCL.
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                if self.is_nan() || other.is_nan() {
                    <$t>::NAN
                } else if other > self {
                    other
                } else {
                    self
                }
            }
            #[inline(always)]
            fn min(self, other: Self) -> Self {
                if self.is_nan() || other.is_nan() {
                    <$t>::NAN
                } else if other < self {
                    other
                } else {
                    self
                }
            }
            #[inline(always)]
            fn div_count(self, n: usize) -> Self {
                self / n as $t
            }
        }
    };
}
float_acc!(f32);
float_acc!(f64);

/// Integers wrap on overflow, as C's MPI and NCCL do.
macro_rules! int_acc {
    ($t:ty) => {
        impl Accumulator for $t {
            #[inline(always)]
            fn add(self, other: Self) -> Self {
                self.wrapping_add(other)
            }
            #[inline(always)]
            fn mul(self, other: Self) -> Self {
                self.wrapping_mul(other)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                Ord::max(self, other)
            }
            #[inline(always)]
            fn min(self, other: Self) -> Self {
                Ord::min(self, other)
            }
            #[inline(always)]
            fn div_count(self, n: usize) -> Self {
                self / n as $t
            }
        }
    };
}
int_acc!(i32);
int_acc!(i64);
int_acc!(u8);

macro_rules! identity_element {
    ($t:ty, $d:expr) => {
        // SAFETY: a plain number type: no padding, every bit pattern valid, Copy.
        unsafe impl Element for $t {
            const DTYPE: Dtype = $d;
            type Acc = $t;
            #[inline(always)]
            fn to_acc(self) -> $t {
                self
            }
            #[inline(always)]
            fn from_acc(acc: $t) -> $t {
                acc
            }
        }
    };
}
identity_element!(f32, Dtype::F32);
identity_element!(f64, Dtype::F64);
identity_element!(i32, Dtype::I32);
identity_element!(i64, Dtype::I64);
identity_element!(u8, Dtype::U8);

macro_rules! half_element {
    ($t:ty, $d:expr) => {
        // SAFETY: half's 16-bit floats: no padding, every bit pattern valid, Copy.
        unsafe impl Element for $t {
            const DTYPE: Dtype = $d;
            type Acc = f32;
            #[inline(always)]
            fn to_acc(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn from_acc(acc: f32) -> $t {
                <$t>::from_f32(acc)
            }
        }
    };
}
half_element!(bf16, Dtype::Bf16);
half_element!(f16, Dtype::F16);

/// Combines two accumulators with `op`; AVG sums here and divides in [`finish`].
#[inline(always)]
pub fn combine<A: Accumulator>(a: A, b: A, op: ReduceOp) -> A {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => a.add(b),
        ReduceOp::Prod => a.mul(b),
        ReduceOp::Max => a.max(b),
        ReduceOp::Min => a.min(b),
    }
}

/// The last step of a reduction over `n` contributions.
#[inline(always)]
pub fn finish<A: Accumulator>(acc: A, op: ReduceOp, n: usize) -> A {
    if op == ReduceOp::Avg {
        acc.div_count(n)
    } else {
        acc
    }
}

/// The sequential reference: what a reduction of `inputs` (one slice per rank, in
/// rank order) must produce. Tests compare every backend with it.
pub fn reference_reduce<T: Element>(inputs: &[&[T]], op: ReduceOp) -> Vec<T> {
    let len = inputs.first().map_or(0, |s| s.len());
    (0..len)
        .map(|i| {
            let mut acc = inputs[0][i].to_acc();
            for s in &inputs[1..] {
                acc = combine(acc, s[i].to_acc(), op);
            }
            T::from_acc(finish(acc, op, inputs.len()))
        })
        .collect()
}
