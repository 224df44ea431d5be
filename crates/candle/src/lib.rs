//! # distoptim-candle
//!
//! Binds a [candle](https://github.com/huggingface/candle) model's variables to the one
//! flat buffer that distoptim's optimizers, collectives and checkpoints work on, in the
//! model's working type (f32, bf16 or f16: one type for all variables, as Megatron keeps
//! one buffer per dtype).
//!
//! ```text
//!   loss.backward() ──► GradStore ──read_grads──► flat grads ──► ShardedOptimizer::step
//!   Vars ◄──write_params── flat params ◄───────────────────────────┘
//! ```
//!
//! The [`Layout`] lists the variables in a fixed order (by name for a `VarMap`, so every
//! rank agrees). Both copies run at memcpy speed: gradients are read through
//! `storage_and_layout()`, with no `to_vec1` allocation, and parameters are written into
//! the variables' own storage by an in-place op. `Tensor::from_slice` + `Var::set`
//! allocates a new tensor per variable per step, which is several times slower.
//!
//! Only CPU variables are supported. Gradients may be read into a buffer of the
//! variables' type or into f32 (accumulation in f32).

// Every public item says what it is for (the docs are the API's contract).
#![deny(missing_docs)]

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, Storage, Tensor, Var};
use candle_nn::VarMap;
use distoptim::{FloatDtype, Working};
use distoptim_collective::{bf16, f16};
use distoptim_optim::{Layout, OptimError};
use thiserror::Error;

#[derive(Debug, Error)]
/// What binding candle variables to a flat buffer can fail with.
pub enum BindError {
    #[error("candle: {0}")]
    /// candle itself failed.
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    /// The variables do not make a valid layout.
    Layout(#[from] OptimError),
    #[error("{what} has {got} elements, the layout has {expected}")]
    /// A buffer of the wrong length.
    Length {
        /// The buffer.
        what: &'static str,
        /// Its elements.
        got: usize,
        /// The layout's elements.
        expected: usize,
    },
    #[error("variable '{name}': {problem} (contiguous CPU f32, bf16 or f16 variables of one type are supported)")]
    /// A variable this binding cannot read or write in place.
    Unsupported {
        /// The variable.
        name: String,
        /// What about it is unsupported.
        problem: String,
    },
}

/// The element types candle stores that distoptim works in: how to find a slice of one
/// in a `CpuStorage`.
pub trait CandleElement: Working {
    /// candle's name of the type.
    const CANDLE: candle_core::DType;
    /// The storage's elements, if it holds this type.
    fn slice(storage: &CpuStorage) -> Option<&[Self]>;
    /// The storage's elements, mutably, if it holds this type.
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! candle_element {
    ($t:ty, $variant:ident) => {
        impl CandleElement for $t {
            const CANDLE: candle_core::DType = candle_core::DType::$variant;
            fn slice(storage: &CpuStorage) -> Option<&[Self]> {
                match storage {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
                match storage {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
candle_element!(f32, F32);
candle_element!(bf16, BF16);
candle_element!(f16, F16);

/// The distoptim type of a candle dtype, if it is one.
pub fn float_dtype(dtype: candle_core::DType) -> Option<FloatDtype> {
    match dtype {
        candle_core::DType::F32 => Some(FloatDtype::F32),
        candle_core::DType::BF16 => Some(FloatDtype::Bf16),
        candle_core::DType::F16 => Some(FloatDtype::F16),
        _ => None,
    }
}

/// The candle dtype of a distoptim type.
pub fn candle_dtype(dtype: FloatDtype) -> candle_core::DType {
    match dtype {
        FloatDtype::F32 => candle_core::DType::F32,
        FloatDtype::Bf16 => candle_core::DType::BF16,
        FloatDtype::F16 => candle_core::DType::F16,
    }
}

/// The binding's result.
pub type Result<T, E = BindError> = std::result::Result<T, E>;

/// A model's variables laid end to end in one flat buffer.
pub struct FlatParams {
    vars: Vec<Var>,
    layout: Layout,
    dtype: FloatDtype,
}

impl FlatParams {
    /// Binds `(name, var)` pairs in the order given (the same order on every rank).
    pub fn new(named: impl IntoIterator<Item = (String, Var)>) -> Result<Self> {
        let mut layout = Layout::default();
        let mut vars = Vec::new();
        let mut dtype = None;
        for (name, var) in named {
            let d = float_dtype(var.dtype()).filter(|d| var.device().is_cpu() && dtype.is_none_or(|first| first == *d));
            let Some(d) = d else {
                return Err(BindError::Unsupported { name, problem: format!("{:?} on {:?}", var.dtype(), var.device().location()) });
            };
            dtype = Some(d);
            layout.push(name, var.dims().to_vec())?;
            vars.push(var);
        }
        Ok(FlatParams { vars, layout, dtype: dtype.unwrap_or_default() })
    }

    /// Binds every variable of a `VarMap`, sorted by name.
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let mut named: Vec<(String, Var)> =
            varmap.data().lock().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        FlatParams::new(named)
    }

    /// The flat layout of the bound variables (sorted by name).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The bound variables, in layout order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The variables' element type (f32 when there are none).
    pub fn dtype(&self) -> FloatDtype {
        self.dtype
    }

    /// Bytes the variables hold (their values; candle allocates as many again for the
    /// gradients during a backward pass).
    pub fn bytes(&self) -> u64 {
        self.layout.numel() as u64 * self.dtype.size() as u64
    }

    /// Copies the variables' values into `out` (`layout().numel()` elements, of the
    /// variables' type).
    pub fn read_params<T: CandleElement>(&self, out: &mut [T]) -> Result<()> {
        self.check("params", out.len())?;
        for (i, var) in self.vars.iter().enumerate() {
            let spec = self.layout.param(i);
            with_slice::<T>(var.as_tensor(), &spec.name, |v| out[spec.range()].copy_from_slice(v))?;
        }
        Ok(())
    }

    /// Copies each variable's gradient from `grads` into `out` (of the variables' type,
    /// or f32); a variable the loss did not reach gets zeros (as torch's
    /// `zero_grad(set_to_none=False)` would leave).
    pub fn read_grads<G: Working>(&self, grads: &GradStore, out: &mut [G]) -> Result<()> {
        self.visit_grads(grads, out, false)
    }

    /// Adds each variable's gradient into `out` (in `G`'s arithmetic: pass an f32 buffer
    /// to accumulate in f32): micro-batches accumulate locally and the optimizer
    /// synchronises once per step (DDP's `no_sync`).
    pub fn accumulate_grads<G: Working>(&self, grads: &GradStore, out: &mut [G]) -> Result<()> {
        self.visit_grads(grads, out, true)
    }

    /// Writes `values` (`layout().numel()` elements, of the variables' type) into the
    /// variables, in place.
    pub fn write_params<T: CandleElement>(&self, values: &[T]) -> Result<()> {
        self.check("params", values.len())?;
        for (i, var) in self.vars.iter().enumerate() {
            var.as_tensor().inplace_op1(&CopyIn(&values[self.layout.param(i).range()]))?;
        }
        Ok(())
    }

    fn check(&self, what: &'static str, got: usize) -> Result<()> {
        let expected = self.layout.numel();
        if got == expected {
            Ok(())
        } else {
            Err(BindError::Length { what, got, expected })
        }
    }

    /// Copies (or adds) each variable's gradient into its part of `out`, converting from
    /// the variables' type to `G`; a variable without a gradient gets zeros when copying.
    fn visit_grads<G: Working>(&self, grads: &GradStore, out: &mut [G], accumulate: bool) -> Result<()> {
        self.check("grads", out.len())?;
        match self.dtype {
            FloatDtype::F32 => self.visit::<f32, G>(grads, out, accumulate),
            FloatDtype::Bf16 => self.visit::<bf16, G>(grads, out, accumulate),
            FloatDtype::F16 => self.visit::<f16, G>(grads, out, accumulate),
        }
    }

    fn visit<S: CandleElement, G: Working>(&self, grads: &GradStore, out: &mut [G], accumulate: bool) -> Result<()> {
        for (i, var) in self.vars.iter().enumerate() {
            let spec = self.layout.param(i);
            let dst = &mut out[spec.range()];
            match grads.get(var.as_tensor()) {
                Some(g) if g.elem_count() != spec.numel() => {
                    return Err(BindError::Unsupported { name: spec.name.clone(), problem: format!("gradient of shape {:?}", g.dims()) })
                }
                Some(g) if accumulate => with_slice::<S>(g, &spec.name, |src| {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d = G::from_f32(d.to_f32() + s.to_f32()))
                })?,
                // Exact: G is S or wider.
                Some(g) => with_slice::<S>(g, &spec.name, |src| dst.iter_mut().zip(src).for_each(|(d, s)| *d = G::from_f32(s.to_f32())))?,
                None if accumulate => {}
                None => dst.fill(G::default()),
            }
        }
        Ok(())
    }
}

/// Runs `f` on the tensor's elements in row-major order, without copying them out
/// (a non-contiguous tensor is made contiguous first).
fn with_slice<T: CandleElement>(t: &Tensor, name: &str, f: impl FnOnce(&[T])) -> Result<()> {
    let wrong = |dtype: candle_core::DType| BindError::Unsupported {
        name: name.into(),
        problem: format!("{dtype:?} storage, {:?} expected", T::CANDLE),
    };
    {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else { return Err(wrong(t.dtype())) };
        let values = T::slice(cpu).ok_or_else(|| wrong(cpu.dtype()))?;
        if let Some((start, end)) = layout.contiguous_offsets() {
            f(&values[start..end]);
            return Ok(());
        }
    }
    let contiguous = t.contiguous()?;
    let (storage, layout) = contiguous.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => {
            let values = T::slice(cpu).ok_or_else(|| wrong(cpu.dtype()))?;
            f(&values[start..end]);
            Ok(())
        }
        _ => Err(BindError::Unsupported { name: name.into(), problem: "not contiguous after contiguous()".into() }),
    }
}

/// Overwrites a contiguous tensor's elements with a slice of its type, in its own storage.
struct CopyIn<'a, T>(&'a [T]);

impl<T: CandleElement> InplaceOp1 for CopyIn<'_, T> {
    fn name(&self) -> &'static str {
        "distoptim-copy-in"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
        let dtype = storage.dtype();
        match (T::slice_mut(storage), layout.contiguous_offsets()) {
            (Some(v), Some((start, end))) if end - start == self.0.len() => {
                v[start..end].copy_from_slice(self.0);
                Ok(())
            }
            (Some(_), _) => {
                Err(candle_core::Error::Msg(format!("in-place copy of {} values into a non-contiguous or resized variable", self.0.len())))
            }
            (None, _) => Err(candle_core::Error::Msg(format!("in-place copy of {:?} values into a {dtype:?} variable", T::CANDLE))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{Module, VarBuilder};

    fn model() -> (VarMap, candle_nn::Linear, candle_nn::Linear) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let a = candle_nn::linear(3, 4, vb.pp("a")).unwrap();
        let b = candle_nn::linear(4, 2, vb.pp("b")).unwrap();
        (varmap, a, b)
    }

    #[test]
    fn layout_is_sorted_by_name_and_round_trips() {
        let (varmap, _, _) = model();
        let flat = FlatParams::from_varmap(&varmap).unwrap();
        let names: Vec<&str> = flat.layout().params().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a.bias", "a.weight", "b.bias", "b.weight"]);
        assert_eq!(flat.layout().numel(), 4 + 12 + 2 + 8);
        let values: Vec<f32> = (0..26).map(|i| i as f32 * 0.5 - 3.0).collect();
        flat.write_params(&values).unwrap();
        let mut back = vec![0.0; 26];
        flat.read_params(&mut back).unwrap();
        assert_eq!(back, values);
        // The write landed in the Var itself, as candle sees it.
        assert_eq!(flat.vars()[1].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), values[4..16].to_vec());
    }

    #[test]
    fn grads_match_candles_and_accumulate() {
        let (varmap, a, b) = model();
        let flat = FlatParams::from_varmap(&varmap).unwrap();
        let x = Tensor::new(&[[1.0f32, -2.0, 0.5], [0.25, 1.0, -1.0]], &Device::Cpu).unwrap();
        let loss = b.forward(&a.forward(&x).unwrap().relu().unwrap()).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let mut flat_grads = vec![f32::NAN; flat.layout().numel()];
        flat.read_grads(&grads, &mut flat_grads).unwrap();
        for (i, var) in flat.vars().iter().enumerate() {
            let expected = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat_grads[flat.layout().param(i).range()], expected[..]);
        }
        let once = flat_grads.clone();
        flat.accumulate_grads(&grads, &mut flat_grads).unwrap();
        assert!(flat_grads.iter().zip(&once).all(|(t, o)| *t == 2.0 * o));
    }

    #[test]
    fn missing_gradients_are_zero_and_lengths_are_checked() {
        let (varmap, a, _) = model();
        let flat = FlatParams::from_varmap(&varmap).unwrap();
        let x = Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap();
        let grads = a.forward(&x).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![7.0; flat.layout().numel()];
        flat.read_grads(&grads, &mut out).unwrap();
        assert!(out[flat.layout().param(2).range()].iter().all(|&g| g == 0.0), "b.bias was not used");
        let err = flat.read_grads(&grads, &mut out[1..]).unwrap_err().to_string();
        assert!(err.contains("grads has 25 elements, the layout has 26"), "{err}");
        let err = flat.write_params(&[0.0; 3]).unwrap_err().to_string();
        assert!(err.contains("params has 3 elements"), "{err}");
    }

    #[test]
    fn non_f32_variables_are_refused_by_name() {
        let var = Var::zeros((2, 2), DType::F64, &Device::Cpu).unwrap();
        let err = FlatParams::new([("w".to_string(), var)]).err().unwrap().to_string();
        assert!(err.contains("variable 'w'") && err.contains("F64"), "{err}");
    }

    #[test]
    fn bf16_variables_bind_and_their_gradients_read_into_bf16_or_f32() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::BF16, &Device::Cpu);
        let a = candle_nn::linear(3, 4, vb.pp("a")).unwrap();
        let flat = FlatParams::from_varmap(&varmap).unwrap();
        assert_eq!((flat.dtype(), flat.bytes()), (FloatDtype::Bf16, 16 * 2));
        let values: Vec<bf16> = (0..16).map(|i| bf16::from_f32(i as f32 * 0.25 - 2.0)).collect();
        flat.write_params(&values).unwrap();
        let mut back = vec![bf16::ZERO; 16];
        flat.read_params(&mut back).unwrap();
        assert_eq!(back, values);
        let x = Tensor::new(&[[1.0f32, -2.0, 0.5]], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let grads = a.forward(&x).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (mut g16, mut g32) = (vec![bf16::ZERO; 16], vec![0f32; 16]);
        flat.read_grads(&grads, &mut g16).unwrap();
        flat.read_grads(&grads, &mut g32).unwrap();
        assert!(g16.iter().zip(&g32).all(|(a, b)| a.to_f32() == *b) && g32.iter().any(|&g| g != 0.0));
        flat.accumulate_grads(&grads, &mut g32).unwrap();
        assert!(g16.iter().zip(&g32).all(|(a, b)| 2.0 * a.to_f32() == *b));
        // An f32 buffer is not a bf16 model's parameter buffer.
        let err = flat.write_params(&[0f32; 16]).unwrap_err().to_string();
        assert!(err.contains("F32 values into a BF16 variable"), "{err}");
        let mixed = [
            ("a".to_string(), Var::zeros(2, DType::BF16, &Device::Cpu).unwrap()),
            ("b".to_string(), Var::zeros(2, DType::F32, &Device::Cpu).unwrap()),
        ];
        let err = FlatParams::new(mixed).err().unwrap().to_string();
        assert!(err.contains("variable 'b'") && err.contains("of one type"), "{err}");
    }
}
