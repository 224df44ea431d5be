//! The model: a ReLU MLP in candle, initialised like torch's `nn.Linear` from the run's
//! seed.

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use distoptim_optim::Layout;

use distoptim::sampler::SeededRng as Rng;

/// Layers `fc0, fc1, …` of sizes `dims[0] → dims[1] → … → dims[n]`, ReLU between.
pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(vb: &VarBuilder, dims: &[usize]) -> Result<Mlp> {
        let layers =
            dims.windows(2).enumerate().map(|(i, d)| candle_nn::linear(d[0], d[1], vb.pp(format!("fc{i}")))).collect::<Result<_, _>>()?;
        Ok(Mlp { layers })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// torch's `nn.Linear` initialisation, U(−1/√fan_in, 1/√fan_in) for a weight `[out, in]`
/// and for its bias, drawn from one seeded stream per parameter so the result depends
/// only on the seed and the layout.
pub fn init_params(layout: &Layout, seed: u64, params: &mut [f32]) {
    for (i, p) in layout.params().iter().enumerate() {
        let weight = p.name.strip_suffix(".bias").map_or(p.name.clone(), |stem| format!("{stem}.weight"));
        let fan_in = layout.index_of(&weight).and_then(|w| layout.param(w).shape.get(1).copied()).unwrap_or(1).max(1);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let mut rng = Rng::new(seed, 0x1417 + i as u64);
        params[p.range()].iter_mut().for_each(|v| *v = (rng.unit() * 2.0 - 1.0) * bound);
    }
}
