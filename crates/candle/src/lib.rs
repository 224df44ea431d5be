//! # distoptim-candle
//!
//! Binds a [candle](https://github.com/huggingface/candle) model's variables to the one
//! flat `f32` buffer that distoptim's optimizers, collectives and checkpoints work on.
//!
//! ```text
//!   loss.backward() ──► GradStore ──read_grads──► flat grads ──► DistributedOptimizer::step
//!   Vars ◄──write_params── flat params ◄───────────────────────────┘
//! ```
//!
//! The [`Layout`] lists the variables in a fixed order (by name for a `VarMap`, so every
//! rank agrees). Both copies run at memcpy speed: gradients are read through
//! `storage_and_layout()`, with no `to_vec1` allocation, and parameters are written into
//! the variables' own storage by an in-place op. `Tensor::from_slice` + `Var::set`
//! allocates a new tensor per variable per step, which is several times slower.
//!
//! Only CPU `f32` variables are supported, which is what candle's CPU backend trains in.

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, Storage, Tensor, Var};
use candle_nn::VarMap;
use distoptim_optim::{Layout, OptimError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BindError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Layout(#[from] OptimError),
    #[error("{what} has {got} elements, the layout has {expected}")]
    Length { what: &'static str, got: usize, expected: usize },
    #[error("variable '{name}': {problem} (only contiguous CPU f32 variables are supported)")]
    Unsupported { name: String, problem: String },
}

pub type Result<T, E = BindError> = std::result::Result<T, E>;

/// A model's variables laid end to end in one flat buffer.
pub struct FlatParams {
    vars: Vec<Var>,
    layout: Layout,
}

impl FlatParams {
    /// Binds `(name, var)` pairs in the order given (the same order on every rank).
    pub fn new(named: impl IntoIterator<Item = (String, Var)>) -> Result<Self> {
        let mut layout = Layout::default();
        let mut vars = Vec::new();
        for (name, var) in named {
            if var.dtype() != candle_core::DType::F32 || !var.device().is_cpu() {
                return Err(BindError::Unsupported { name, problem: format!("{:?} on {:?}", var.dtype(), var.device().location()) });
            }
            layout.push(name, var.dims().to_vec())?;
            vars.push(var);
        }
        Ok(FlatParams { vars, layout })
    }

    /// Binds every variable of a `VarMap`, sorted by name.
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let mut named: Vec<(String, Var)> =
            varmap.data().lock().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        FlatParams::new(named)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Copies the variables' values into `out` (`layout().numel()` elements).
    pub fn read_params(&self, out: &mut [f32]) -> Result<()> {
        self.check("params", out.len())?;
        for (i, var) in self.vars.iter().enumerate() {
            let spec = self.layout.param(i);
            with_f32(var.as_tensor(), &spec.name, |v| out[spec.range()].copy_from_slice(v))?;
        }
        Ok(())
    }

    /// Copies each variable's gradient from `grads` into `out`; a variable the loss did
    /// not reach gets zeros (as torch's `zero_grad(set_to_none=False)` would leave).
    pub fn read_grads(&self, grads: &GradStore, out: &mut [f32]) -> Result<()> {
        self.visit_grads(grads, out, |dst, src| dst.copy_from_slice(src), |dst| dst.fill(0.0))
    }

    /// Adds each variable's gradient into `out`: micro-batches accumulate locally and the
    /// optimizer synchronises once per step (DDP's `no_sync`).
    pub fn accumulate_grads(&self, grads: &GradStore, out: &mut [f32]) -> Result<()> {
        self.visit_grads(grads, out, |dst, src| dst.iter_mut().zip(src).for_each(|(d, s)| *d += s), |_| {})
    }

    /// Writes `values` (`layout().numel()` elements) into the variables, in place.
    pub fn write_params(&self, values: &[f32]) -> Result<()> {
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

    fn visit_grads(
        &self,
        grads: &GradStore,
        out: &mut [f32],
        present: impl Fn(&mut [f32], &[f32]),
        absent: impl Fn(&mut [f32]),
    ) -> Result<()> {
        self.check("grads", out.len())?;
        for (i, var) in self.vars.iter().enumerate() {
            let spec = self.layout.param(i);
            let dst = &mut out[spec.range()];
            match grads.get(var.as_tensor()) {
                Some(g) if g.elem_count() != spec.numel() => {
                    return Err(BindError::Unsupported { name: spec.name.clone(), problem: format!("gradient of shape {:?}", g.dims()) })
                }
                Some(g) => with_f32(g, &spec.name, |src| present(dst, src))?,
                None => absent(dst),
            }
        }
        Ok(())
    }
}

/// Runs `f` on the tensor's elements in row-major order, without copying them out
/// (a non-contiguous tensor is made contiguous first).
fn with_f32(t: &Tensor, name: &str, f: impl FnOnce(&[f32])) -> Result<()> {
    {
        let (storage, layout) = t.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => {
                f(&v[start..end]);
                return Ok(());
            }
            (Storage::Cpu(CpuStorage::F32(_)), None) => {}
            (other, _) => return Err(BindError::Unsupported { name: name.into(), problem: format!("{:?} storage", other.dtype()) }),
        }
    }
    let contiguous = t.contiguous()?;
    let (storage, layout) = contiguous.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => {
            f(&v[start..end]);
            Ok(())
        }
        _ => Err(BindError::Unsupported { name: name.into(), problem: "not contiguous after contiguous()".into() }),
    }
}

/// Overwrites a contiguous f32 tensor's elements with a slice, in its own storage.
struct CopyIn<'a>(&'a [f32]);

impl InplaceOp1 for CopyIn<'_> {
    fn name(&self) -> &'static str {
        "distoptim-copy-in"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((start, end))) if end - start == self.0.len() => {
                v[start..end].copy_from_slice(self.0);
                Ok(())
            }
            (CpuStorage::F32(_), _) => {
                Err(candle_core::Error::Msg(format!("in-place copy of {} values into a non-contiguous or resized variable", self.0.len())))
            }
            (other, _) => Err(candle_core::Error::Msg(format!("in-place copy into a {:?} variable (f32 only)", other.dtype()))),
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
}
