//! `bench candle`: the per-step copies between a candle model and distoptim's flat
//! buffers (gradients out of the `GradStore`, parameters back into the `Var`s), done by
//! `distoptim-candle` and done the obvious way (`to_vec1`, `Tensor::from_slice` +
//! `Var::set`), next to a plain memcpy of the same bytes, all in the same run.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder, VarMap};
use clap::Args;
use distoptim_candle::FlatParams;

use super::median;

#[derive(Args)]
pub struct CandleArgs {
    /// Layer sizes of the MLP whose variables are copied (default: 25.2M parameters).
    #[arg(long, value_delimiter = ',', num_args = 1.., default_value = "2048,4096,4096,10")]
    dims: Vec<usize>,
    /// Timed repetitions (median reported), after one warm-up.
    #[arg(long, default_value_t = 7)]
    iters: usize,
}

fn timed(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

pub fn run(args: CandleArgs) -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let layers = args
        .dims
        .windows(2)
        .enumerate()
        .map(|(i, d)| candle_nn::linear(d[0], d[1], vb.pp(format!("fc{i}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut h = Tensor::ones((1, args.dims[0]), DType::F32, &Device::Cpu)?;
    for layer in &layers {
        h = layer.forward(&h)?;
    }
    let store = h.sum_all()?.backward()?;
    let flat = FlatParams::from_varmap(&varmap)?;
    let n = flat.layout().numel();
    let (mut params, mut grads) = (vec![0.5f32; n], vec![0.0f32; n]);
    let bytes = 2.0 * 2.0 * (n * 4) as f64; // gradients out + parameters in, each read + written

    let ours = timed(args.iters, || {
        flat.read_grads(&store, &mut grads)?;
        flat.write_params(&params)?;
        Ok(())
    })?;
    let naive = timed(args.iters, || {
        for (i, var) in flat.vars().iter().enumerate() {
            let range = flat.layout().param(i).range();
            if let Some(g) = store.get(var.as_tensor()) {
                grads[range.clone()].copy_from_slice(&g.flatten_all()?.to_vec1::<f32>()?);
            }
            var.set(&Tensor::from_slice(&params[range], var.shape(), &Device::Cpu)?)?;
        }
        Ok(())
    })?;
    let source = vec![0.25f32; n];
    let memcpy = timed(args.iters, || {
        grads.copy_from_slice(&source);
        params.copy_from_slice(&source);
        Ok(())
    })?;
    println!("# distoptim bench candle: copy {n} f32 gradients out of candle and {n} parameters back, median of {}", args.iters);
    println!("{:<40} {:>10} {:>10} {:>10}", "path", "ms/step", "GB/s", "vs memcpy");
    for (name, t) in [
        ("distoptim-candle (read_grads+write_params)", ours),
        ("to_vec1 + from_slice + Var::set", naive),
        ("memcpy of the same bytes", memcpy),
    ] {
        println!("{name:<40} {:>10.2} {:>10.1} {:>9.0}%", t * 1e3, bytes / t / 1e9, 100.0 * memcpy / t);
    }
    Ok(())
}
