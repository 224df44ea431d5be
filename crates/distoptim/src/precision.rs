//! Mixed precision: the working element type of parameters and gradients, the policy
//! that says which type each step uses where, and dynamic loss scaling for f16.
//!
//! The model holds its parameters and gradients in a 16-bit *working* type; the
//! optimizer keeps an f32 *master* copy and f32 state for exactly the range it owns
//! (Megatron-LM's distributed optimizer, FSDP2's `MixedPrecisionPolicy`). One step:
//!
//! ```text
//! grads (param_dtype) ─► reduce in reduce_dtype (ZeRO: reduce-scatter, chunk by chunk)
//!   ─► f32 over the owned range ─► unscale + overflow check (f16) ─► clip on f32 values
//!   ─► step the f32 master ─► round to param_dtype (nearest even) ─► all-gather
//! ```
//!
//! With `param_dtype` f32 the parameters are their own master (no copy is kept), so the
//! all-f32 policy is exactly the plain step.

use std::fmt;
use std::str::FromStr;

use distoptim_collective::{bf16, f16, Element};

use crate::error::{DistError, Result};

/// A floating-point element type a model may train in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FloatDtype {
    /// IEEE single precision.
    #[default]
    F32,
    /// bfloat16: f32's exponent range, 8 significant bits.
    Bf16,
    /// IEEE half precision: 11 significant bits, overflows past 65504 (needs loss scaling).
    F16,
}

#[cfg(feature = "clap")]
impl clap::ValueEnum for FloatDtype {
    fn value_variants<'a>() -> &'a [Self] {
        &FloatDtype::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

impl FloatDtype {
    /// Every working type, in the order the CLI lists them.
    pub const ALL: [FloatDtype; 3] = [FloatDtype::F32, FloatDtype::Bf16, FloatDtype::F16];

    /// The name the CLI, cases and checkpoints use.
    pub fn name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "f32",
            FloatDtype::Bf16 => "bf16",
            FloatDtype::F16 => "f16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::Bf16 | FloatDtype::F16 => 2,
        }
    }

    /// `x` rounded to this type (round to nearest even, as torch's `.to`), read back as f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            FloatDtype::F32 => x,
            FloatDtype::Bf16 => bf16::from_f32(x).to_f32(),
            FloatDtype::F16 => f16::from_f32(x).to_f32(),
        }
    }

    /// The safetensors dtype string.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "F32",
            FloatDtype::Bf16 => "BF16",
            FloatDtype::F16 => "F16",
        }
    }
}

impl fmt::Display for FloatDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FloatDtype {
    type Err = DistError;

    fn from_str(s: &str) -> Result<Self> {
        FloatDtype::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| DistError::Invalid(format!("unknown dtype {s:?} (one of f32, bf16, f16)")))
    }
}

/// An element type parameters and gradients can be held in: f32, bf16 or f16. Sealed:
/// the step's arithmetic is written for exactly these.
pub trait Working: Element + Copy + Default + Send + Sync + sealed::Sealed + 'static {
    /// The runtime name of this type.
    const DTYPE: FloatDtype;
    /// Rounds to nearest even.
    fn from_f32(x: f32) -> Self;
    /// Exact.
    fn to_f32(self) -> f32;
    /// The slice itself when this is f32 (whose parameters are their own master).
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
    /// The slice as a typed buffer view.
    fn flat_mut(s: &mut [Self]) -> FlatMut<'_>;
    /// The slice as a typed buffer view.
    fn flat(s: &[Self]) -> Flat<'_>;
    /// The slice itself when this is f32.
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for super::bf16 {}
    impl Sealed for super::f16 {}
}

impl Working for f32 {
    const DTYPE: FloatDtype = FloatDtype::F32;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn flat_mut(s: &mut [Self]) -> FlatMut<'_> {
        FlatMut::F32(s)
    }
    fn flat(s: &[Self]) -> Flat<'_> {
        Flat::F32(s)
    }
}

impl Working for bf16 {
    const DTYPE: FloatDtype = FloatDtype::Bf16;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn flat_mut(s: &mut [Self]) -> FlatMut<'_> {
        FlatMut::Bf16(s)
    }
    fn flat(s: &[Self]) -> Flat<'_> {
        Flat::Bf16(s)
    }
}

impl Working for f16 {
    const DTYPE: FloatDtype = FloatDtype::F16;
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn flat_mut(s: &mut [Self]) -> FlatMut<'_> {
        FlatMut::F16(s)
    }
    fn flat(s: &[Self]) -> Flat<'_> {
        Flat::F16(s)
    }
}

/// Which type each part of a step uses (FSDP2's `MixedPrecisionPolicy`). The master
/// weights and optimizer state are always f32.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Precision {
    /// The model's parameters and gradients.
    pub param_dtype: FloatDtype,
    /// What the gradient reduction sums in: f32, or bf16 to halve the bytes on the wire
    /// (torch's `bf16_compress_hook`).
    pub reduce_dtype: FloatDtype,
    /// Dynamic loss scaling (torch's `GradScaler`); needed with f16 gradients, which
    /// underflow otherwise. `None`: gradients are used as they come.
    pub loss_scale: Option<LossScaleConfig>,
}

impl Precision {
    /// All f32: the plain step.
    pub fn f32() -> Precision {
        Precision::default()
    }

    /// The policy for `param_dtype` with an f32 reduction; f16 gets dynamic loss scaling
    /// with torch's defaults.
    pub fn new(param_dtype: FloatDtype) -> Precision {
        let loss_scale = (param_dtype == FloatDtype::F16).then(LossScaleConfig::default);
        Precision { param_dtype, reduce_dtype: FloatDtype::F32, loss_scale }
    }

    /// With this reduction type.
    pub fn with_reduce_dtype(mut self, reduce_dtype: FloatDtype) -> Precision {
        self.reduce_dtype = reduce_dtype;
        self
    }

    /// With (or without) dynamic loss scaling.
    pub fn with_loss_scale(mut self, loss_scale: Option<LossScaleConfig>) -> Precision {
        self.loss_scale = loss_scale;
        self
    }

    /// Whether the optimizer keeps a separate f32 master copy.
    pub fn has_master(&self) -> bool {
        self.param_dtype != FloatDtype::F32
    }

    /// Refuses policies the step does not implement.
    pub fn validate(&self) -> Result<()> {
        if self.reduce_dtype == FloatDtype::F16 {
            return Err(DistError::Invalid("reduce_dtype f16 is not supported (f32 or bf16: f16 sums overflow)".into()));
        }
        if let Some(s) = &self.loss_scale {
            s.validate()?;
        }
        Ok(())
    }
}

/// torch's `GradScaler` settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaleConfig {
    /// The first scale (torch: 2^16).
    pub init_scale: f64,
    /// Multiplies the scale after `growth_interval` steps without overflow (torch: 2).
    pub growth_factor: f64,
    /// Multiplies the scale on overflow (torch: 0.5).
    pub backoff_factor: f64,
    /// Steps without overflow before the scale grows (torch: 2000).
    pub growth_interval: u64,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        LossScaleConfig { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
    }
}

impl LossScaleConfig {
    fn validate(&self) -> Result<()> {
        let ok = self.init_scale.is_finite()
            && self.init_scale > 0.0
            && self.growth_factor.is_finite()
            && self.growth_factor > 1.0
            && self.backoff_factor > 0.0
            && self.backoff_factor < 1.0
            && self.growth_interval >= 1;
        if ok {
            Ok(())
        } else {
            Err(DistError::Invalid(format!(
                "loss scaling needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and growth_interval >= 1, got {self:?}"
            )))
        }
    }
}

/// The loss scale and its growth tracker: what `GradScaler.update` changes and a
/// checkpoint keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaler {
    /// The settings.
    pub config: LossScaleConfig,
    /// The current scale (f32, as torch keeps it).
    pub scale: f32,
    /// Consecutive steps without overflow since the scale last changed.
    pub growth_tracker: u64,
}

impl LossScaler {
    /// At the initial scale.
    pub fn new(config: LossScaleConfig) -> LossScaler {
        LossScaler { config, scale: config.init_scale as f32, growth_tracker: 0 }
    }

    /// What the gradients are multiplied by to undo the scale: torch computes
    /// `scale.double().reciprocal().float()`.
    pub fn inv_scale(&self) -> f32 {
        (1.0 / f64::from(self.scale)) as f32
    }

    /// `torch._amp_update_scale_`: back off on overflow, grow after `growth_interval`
    /// clean steps (only to a finite value).
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale = (f64::from(self.scale) * self.config.backoff_factor) as f32;
            self.growth_tracker = 0;
            return;
        }
        let successful = self.growth_tracker + 1;
        if successful == self.config.growth_interval {
            let grown = (f64::from(self.scale) * self.config.growth_factor) as f32;
            if grown.is_finite() {
                self.scale = grown;
            }
            self.growth_tracker = 0;
        } else {
            self.growth_tracker = successful;
        }
    }
}

/// A flat buffer of one working type, borrowed mutably: how parameters and gradients of
/// any precision reach [`crate::DataParallel`]. Build it with `.into()` from a
/// `&mut Vec<T>`, `&mut [T]` or a [`distoptim_collective::SharedBuf`].
#[derive(Debug)]
pub enum FlatMut<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// bf16 elements.
    Bf16(&'a mut [bf16]),
    /// f16 elements.
    F16(&'a mut [f16]),
}

impl FlatMut<'_> {
    /// The element type.
    pub fn dtype(&self) -> FloatDtype {
        match self {
            FlatMut::F32(_) => FloatDtype::F32,
            FlatMut::Bf16(_) => FloatDtype::Bf16,
            FlatMut::F16(_) => FloatDtype::F16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            FlatMut::F32(v) => v.len(),
            FlatMut::Bf16(v) => v.len(),
            FlatMut::F16(v) => v.len(),
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `src`, which must have this buffer's type and length.
    pub fn copy_from(&mut self, src: Flat<'_>) -> Result<()> {
        if src.len() != self.len() {
            return Err(DistError::Invalid(format!("a copy of {} elements into a buffer of {}", src.len(), self.len())));
        }
        match (self, src) {
            (FlatMut::F32(d), Flat::F32(s)) => d.copy_from_slice(s),
            (FlatMut::Bf16(d), Flat::Bf16(s)) => d.copy_from_slice(s),
            (FlatMut::F16(d), Flat::F16(s)) => d.copy_from_slice(s),
            (d, s) => return Err(DistError::Invalid(format!("a copy of {} elements into a buffer of {}", s.dtype(), d.dtype()))),
        }
        Ok(())
    }

    /// Reborrows for a shorter lifetime, so one buffer can be passed to several calls.
    pub fn reborrow(&mut self) -> FlatMut<'_> {
        match self {
            FlatMut::F32(v) => FlatMut::F32(v),
            FlatMut::Bf16(v) => FlatMut::Bf16(v),
            FlatMut::F16(v) => FlatMut::F16(v),
        }
    }
}

impl<'a> FlatMut<'a> {
    /// The f32 slice, or an error naming `what` and the type it has.
    pub fn into_f32(self, what: &str) -> Result<&'a mut [f32]> {
        match self {
            FlatMut::F32(v) => Ok(v),
            other => Err(DistError::Invalid(format!("{what} needs f32 parameters and gradients, not {}", other.dtype()))),
        }
    }
}

/// A flat buffer of one working type, borrowed: what [`crate::DataParallel::save`] reads.
#[derive(Clone, Copy, Debug)]
pub enum Flat<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// bf16 elements.
    Bf16(&'a [bf16]),
    /// f16 elements.
    F16(&'a [f16]),
}

impl Flat<'_> {
    /// The element type.
    pub fn dtype(&self) -> FloatDtype {
        match self {
            Flat::F32(_) => FloatDtype::F32,
            Flat::Bf16(_) => FloatDtype::Bf16,
            Flat::F16(_) => FloatDtype::F16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Flat::F32(v) => v.len(),
            Flat::Bf16(v) => v.len(),
            Flat::F16(v) => v.len(),
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> Flat<'a> {
    /// The f32 slice, or an error naming `what` and the type it has.
    pub fn into_f32(self, what: &str) -> Result<&'a [f32]> {
        match self {
            Flat::F32(v) => Ok(v),
            other => Err(DistError::Invalid(format!("{what} needs f32 parameters, not {}", other.dtype()))),
        }
    }
}

impl<'a, T: Working> From<&'a mut [T]> for FlatMut<'a> {
    fn from(v: &'a mut [T]) -> Self {
        T::flat_mut(v)
    }
}

impl<'a, T: Working> From<&'a mut Vec<T>> for FlatMut<'a> {
    fn from(v: &'a mut Vec<T>) -> Self {
        T::flat_mut(v)
    }
}

impl<'a, T: Working> From<&'a mut distoptim_collective::SharedBuf<T>> for FlatMut<'a> {
    fn from(v: &'a mut distoptim_collective::SharedBuf<T>) -> Self {
        T::flat_mut(v)
    }
}

impl<'a, T: Working> From<&'a [T]> for Flat<'a> {
    fn from(v: &'a [T]) -> Self {
        T::flat(v)
    }
}

impl<'a, T: Working> From<&'a Vec<T>> for Flat<'a> {
    fn from(v: &'a Vec<T>) -> Self {
        T::flat(v)
    }
}

/// Rounds every element of `src` into `dst` (same length).
pub fn round_into<T: Working>(src: &[f32], dst: &mut [T]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = T::from_f32(*s));
}

/// Widens every element of `src` into `dst` (same length; exact).
pub fn widen_into<T: Working>(src: &[T], dst: &mut [f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_nearest_even_and_f16_overflows_to_infinity() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(FloatDtype::Bf16.round(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(FloatDtype::Bf16.round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(FloatDtype::F16.round(65519.0), 65504.0);
        assert_eq!(FloatDtype::F16.round(65520.0), f32::INFINITY);
        assert_eq!(FloatDtype::F16.round(-1e6), f32::NEG_INFINITY);
        assert_eq!(FloatDtype::F16.round(1e-7), 1.1920929e-7, "f16 keeps subnormals");
        assert_eq!("bf16".parse::<FloatDtype>().unwrap(), FloatDtype::Bf16);
        assert!("fp8".parse::<FloatDtype>().unwrap_err().to_string().contains("unknown dtype \"fp8\""));
    }

    #[test]
    fn loss_scale_backs_off_on_overflow_and_grows_after_the_interval() {
        let mut s = LossScaler::new(LossScaleConfig { growth_interval: 3, ..LossScaleConfig::default() });
        s.update(true);
        assert_eq!((s.scale, s.growth_tracker), (32768.0, 0));
        s.update(false);
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (32768.0, 2));
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 0));
        assert_eq!(s.inv_scale(), 1.0 / 65536.0);
        assert!(Precision::new(FloatDtype::F16).loss_scale.is_some());
        assert!(Precision::new(FloatDtype::Bf16).loss_scale.is_none());
        assert!(Precision::new(FloatDtype::Bf16).with_reduce_dtype(FloatDtype::F16).validate().is_err());
        let bad = LossScaleConfig { backoff_factor: 1.5, ..LossScaleConfig::default() };
        assert!(Precision::new(FloatDtype::F16).with_loss_scale(Some(bad)).validate().is_err());
    }
}
