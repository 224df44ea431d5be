//! A complete data-parallel candle program: an 8-64-1 regression trained with ZeRO-2,
//! AdamW, warm-up + cosine, clipping at 1.0 and two micro-batches of gradient
//! accumulation per step. The README's "Train your own candle model" snippet is taken
//! from this file, and CI runs it:
//!
//! ```sh
//! cargo build --release --examples
//! target/release/distoptim launch --nproc 2 -- target/release/examples/candle_zero2
//! ```
//!
//! Every rank prints the same loss and the same final parameter checksum: the replicas
//! agree, whatever the number of ranks.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use distoptim::{ClipConfig, ReduceMode, ShardedOptimizer, StepConfig, Strategy};
use distoptim_candle::FlatParams;
use distoptim_collective::{shard_range, Communicator, ReduceOp};
use distoptim_optim::{AdamConfig, OptimizerConfig, ParamGroup, Schedule};

struct Mlp {
    hidden: Linear,
    out: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> candle_core::Result<Mlp> {
        Ok(Mlp { hidden: linear(8, 64, vb.pp("hidden"))?, out: linear(64, 1, vb.pp("out"))? })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.out.forward(&self.hidden.forward(x)?.relu()?)
    }
}

/// Sample i of a fixed synthetic data set: 8 inputs and y = Σ_j sin(x_j)·(j+1)/8.
fn sample(i: usize) -> ([f32; 8], f32) {
    let x: [f32; 8] = std::array::from_fn(|j| (((i * 31 + j * 17) % 200) as f32 / 100.0) - 1.0);
    let y = x.iter().enumerate().map(|(j, v)| v.sin() * (j + 1) as f32 / 8.0).sum();
    (x, y)
}

fn batch(indices: &[usize], dev: &Device) -> Result<(Tensor, Tensor)> {
    let (xs, ys): (Vec<[f32; 8]>, Vec<f32>) = indices.iter().map(|&i| sample(i)).unzip();
    let xs: Vec<f32> = xs.concat();
    Ok((Tensor::from_vec(xs, (indices.len(), 8), dev)?, Tensor::from_vec(ys, (indices.len(), 1), dev)?))
}

fn main() -> Result<()> {
    // --8<-- [start:readme]
    let comm = Communicator::from_env()?; // joins the job `distoptim launch` (or mpirun) started
    let (steps, global_batch, micro_batches) = (200u64, 64usize, 2usize);
    let varmap = VarMap::new();
    let model = Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let flat = FlatParams::from_varmap(&varmap)?; // every Var, sorted by name: one flat layout
    let mut params = vec![0.0f32; flat.layout().numel()];
    flat.read_params(&mut params)?;
    comm.broadcast(&mut params, 0)?; // start from rank 0's weights
    let groups = vec![ParamGroup { params: (0..flat.layout().len()).collect(), config: OptimizerConfig::Adam(AdamConfig::adamw()) }];
    let schedule = Schedule::CosineWithWarmup { warmup: 20, total: steps, cycles: 0.5 };
    let clip = Some(ClipConfig::new(1.0).with_error_if_nonfinite(true));
    // BatchWeighted: each rank's gradient counts by its batch size, so the step equals
    // one process on the whole global batch however the batch is split.
    let config = StepConfig::new(Strategy::Zero2).with_reduce(ReduceMode::BatchWeighted).with_clip(clip);
    let mut opt = ShardedOptimizer::new(comm.clone(), flat.layout().clone(), groups, Some(schedule), config)?;
    let mut grads = opt.alloc_grads()?; // shared memory: reduced in place
    for step in 0..steps as usize {
        // This rank's part of the global batch, cut into micro-batches.
        let global: Vec<usize> = (0..global_batch).map(|i| (step * global_batch + i) % 4096).collect();
        let mine = &global[shard_range(global.len(), comm.size(), comm.rank())];
        grads.fill(0.0);
        flat.write_params(&params)?; // in place, into the Vars' storage
        for micro in mine.chunks(mine.len().div_ceil(micro_batches).max(1)) {
            let (x, y) = batch(micro, &Device::Cpu)?;
            // The gradient handed to the step must be the mean over this rank's samples:
            // weigh each micro-batch's mean loss by its share of them.
            let share = micro.len() as f64 / mine.len() as f64;
            let loss = (candle_nn::loss::mse(&model.forward(&x)?, &y)? * share)?;
            flat.accumulate_grads(&loss.backward()?, &mut grads)?; // adds into the flat buffer
        }
        let report = opt.step(&mut params, &mut grads, mine.len())?; // reduce, clip, AdamW, all-gather
        if step % 50 == 0 && comm.rank() == 0 {
            println!("step {step}: lr {:.2e} grad_norm {:.3}", report.lrs[0], report.grad_norm.unwrap_or(0.0));
        }
    }
    // --8<-- [end:readme]
    flat.write_params(&params)?;
    let (x, y) = batch(&(0..512).collect::<Vec<_>>(), &Device::Cpu)?;
    let loss = candle_nn::loss::mse(&model.forward(&x)?, &y)?.to_scalar::<f32>()?;
    let baseline = candle_nn::loss::mse(&y.zeros_like()?, &y)?.to_scalar::<f32>()?;
    let mut sum = [params.iter().map(|&p| f64::from(p)).sum::<f64>()];
    let mine = sum[0];
    comm.all_reduce(&mut sum, ReduceOp::Max)?;
    ensure!(sum[0] == mine, "rank {}'s parameters differ from another rank's", comm.rank());
    println!("rank {} of {}: final loss {loss:.5} (predicting 0: {baseline:.5}), parameter sum {mine:.6}", comm.rank(), comm.size());
    // Predicting 0 everywhere scores `baseline`; a trained model does far better.
    ensure!(loss < 0.25 * baseline, "the regression did not learn (loss {loss}, predicting 0: {baseline})");
    Ok(())
}
