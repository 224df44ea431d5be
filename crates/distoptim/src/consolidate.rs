//! Consolidation: a checkpoint's per-rank files into one `model.safetensors` and one
//! `optimizer.safetensors`, for tools that know nothing of ranks (Python's
//! `safetensors`, `torch.load_state_dict`, HF).
//!
//! - `model.safetensors`: every parameter whole, with its name and shape, in layout order,
//!   in the run's working type (`BF16`/`F16` for a mixed-precision run: the master
//!   rounded, which is what the model held); a rule with an evaluation view is written as
//!   that view (Schedule-Free AdamW: the averaged iterate x, not the y its buffer steps);
//! - `optimizer.safetensors`: every state buffer per parameter (`exp_avg/fc.weight`,
//!   `momentum_buffer/fc.weight`…, the parameter's shape), for a mixed-precision run the
//!   f32 master weights as `master/fc.weight`, with the per-parameter step counts, the
//!   param groups and the run's step (and precision) in `__metadata__`.
//!
//! It streams: each file is checked against the manifest's checksum in blocks, the
//! headers are written first, and each tensor is assembled from the ranks' pieces and
//! written before the next is read, so peak memory is about the largest tensor. Each
//! output goes through a temporary name, fsync and rename: never half a file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::checkpoint::{resolve, verify_file, Manifest};
use crate::error::{DistError, Result};
use crate::precision::FloatDtype;
use crate::safetensors::{self, Reader};

/// What [`consolidate`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct Consolidated {
    /// The model file (`model.safetensors`).
    pub model: PathBuf,
    /// The optimizer file (`optimizer.safetensors`).
    pub optimizer: PathBuf,
    /// Tensors written into both files.
    pub tensors: usize,
    /// Elements of the largest tensor (the memory the consolidation needed, ×4 bytes).
    pub largest: usize,
}

fn err(path: &Path, e: impl std::fmt::Display) -> DistError {
    DistError::Checkpoint(format!("{}: {e}", path.display()))
}

/// Writes `out/model.safetensors` and `out/optimizer.safetensors` from the checkpoint in
/// `dir` (a checkpoint root or step directory; see the module docs). `out` is created if
/// needed.
pub fn consolidate(dir: &Path, out: &Path) -> Result<Consolidated> {
    let (dir, m, _) = resolve(dir)?;
    let dir = dir.as_path();
    // A per-rank checkpoint (post-local SGD, DiLoCo) holds a whole model per rank: rank
    // 0's is the one consolidated.
    let files = if m.per_rank { &m.files[..1] } else { &m.files[..] };
    let mut readers = Vec::with_capacity(files.len());
    for f in files {
        let path = verify_file(dir, f)?;
        readers.push((Reader::open(&path).map_err(|e| err(&path, e))?, path, f.range[0]..f.range[1]));
    }
    // State buffers: `BUFFER/param` tensors, whichever ranks hold them.
    let buffers: BTreeSet<String> = readers
        .iter()
        .flat_map(|(r, _, _)| r.header.tensors.keys())
        .filter_map(|k| k.split_once('/').filter(|(b, p)| !b.contains('/') && m.layout.index_of(p).is_some()).map(|(b, _)| b.to_string()))
        .collect();
    let steps = readers
        .iter()
        .filter_map(|(r, _, _)| r.header.metadata.get("steps"))
        .filter_map(|s| serde_json::from_str::<Vec<u64>>(s).ok())
        .fold(vec![0u64; m.layout.len()], |acc, s| acc.iter().zip(s.iter().chain(std::iter::repeat(&0))).map(|(a, b)| *a.max(b)).collect());
    fs::create_dir_all(out).map_err(|e| err(out, e))?;

    let param_dtype = match &m.precision {
        Some(p) => p.param_dtype.parse::<FloatDtype>()?,
        None => FloatDtype::F32,
    };
    let params: Vec<Tensor> = m.layout.params().iter().enumerate().map(|(i, p)| (p.name.clone(), p.name.clone(), i)).collect();
    let model_meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let eval = EvalView { groups: &m.groups, steps: &steps };
    let model = write_streamed(&out.join("model.safetensors"), &m, &params, param_dtype, &model_meta, Some(&eval), &mut readers)?;

    let mut state: Vec<Tensor> = m
        .layout
        .params()
        .iter()
        .enumerate()
        .flat_map(|(i, p)| buffers.iter().map(move |b| (format!("{b}/{}", p.name), format!("{b}/{}", p.name), i)))
        .collect();
    if param_dtype != FloatDtype::F32 {
        state.extend(m.layout.params().iter().enumerate().map(|(i, p)| (format!("master/{}", p.name), p.name.clone(), i)));
    }
    let groups = serde_json::to_string(&m.groups).map_err(|e| DistError::Checkpoint(e.to_string()))?;
    let mut optimizer_meta = BTreeMap::from([
        ("steps".to_string(), serde_json::to_string(&steps).unwrap_or_default()),
        ("step".to_string(), m.step.to_string()),
        ("strategy".to_string(), m.strategy.clone()),
        ("param_groups".to_string(), groups),
    ]);
    if let Some(p) = &m.precision {
        optimizer_meta.insert("precision".into(), serde_json::to_string(p).unwrap_or_default());
    }
    let optimizer = write_streamed(&out.join("optimizer.safetensors"), &m, &state, FloatDtype::F32, &optimizer_meta, None, &mut readers)?;
    let largest = m.layout.params().iter().map(|p| p.numel()).max().unwrap_or(0);
    Ok(Consolidated { model, optimizer, tensors: params.len() + state.len(), largest })
}

/// A tensor to write: its name in the output, its name in the rank files, the parameter.
type Tensor = (String, String, usize);

/// The rank files, each with its path and the element range it holds.
type Readers = [(Reader, PathBuf, std::ops::Range<usize>)];

/// What the model file needs to write the parameters a model is evaluated with: the
/// param groups and each parameter's step count (Schedule-Free's buffer holds y, its
/// model is the averaged x).
struct EvalView<'a> {
    groups: &'a [distoptim_optim::ParamGroup],
    steps: &'a [u64],
}

/// Tensor `name` of parameter `spec`, assembled from the pieces the rank files hold.
fn assemble(name: &str, spec: &distoptim_optim::ParamSpec, readers: &mut Readers, values: &mut Vec<f32>) -> Result<()> {
    values.clear();
    values.resize(spec.numel(), 0f32);
    for (reader, file_path, range) in readers.iter_mut() {
        let (lo, hi) = (range.start.max(spec.offset), range.end.min(spec.offset + spec.numel()));
        if lo < hi {
            reader.read(name, &mut values[lo - spec.offset..hi - spec.offset]).map_err(|e| err(file_path, e))?;
        }
    }
    Ok(())
}

/// Writes the tensors to `path` as `dtype`, each assembled from the pieces the rank files
/// hold of it; with `eval`, parameters of a rule with an evaluation view are written as
/// that view.
fn write_streamed(
    path: &Path,
    m: &Manifest,
    tensors: &[Tensor],
    dtype: FloatDtype,
    metadata: &BTreeMap<String, String>,
    eval: Option<&EvalView<'_>>,
    readers: &mut Readers,
) -> Result<PathBuf> {
    let shapes: Vec<(String, Vec<usize>)> = tensors.iter().map(|(name, _, i)| (name.clone(), m.layout.param(*i).shape.clone())).collect();
    let (header, _) = safetensors::header(&shapes, dtype, metadata);
    let tmp = path.with_extension("safetensors.tmp");
    let mut file = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(&tmp).map_err(|e| err(&tmp, e))?);
    file.write_all(&header).map_err(|e| err(&tmp, e))?;
    let (mut values, mut bytes) = (Vec::new(), Vec::new());
    for (_, name, i) in tensors {
        let spec = m.layout.param(*i);
        assemble(name, spec, readers, &mut values)?;
        let kernel = eval.and_then(|e| Some((e.groups.iter().find(|g| g.params.contains(i))?.config.kernel(), e.steps.get(*i)?)));
        if let Some((kernel, &step)) = kernel.filter(|(k, &step)| k.has_eval_view() && step > 0) {
            let mut state = Vec::new();
            for buffer in kernel.state_buffers() {
                let mut b = Vec::new();
                assemble(&format!("{buffer}/{}", spec.name), spec, readers, &mut b)?;
                state.push(b);
            }
            let refs: Vec<&[f32]> = state.iter().map(Vec::as_slice).collect();
            let mut view = vec![0f32; values.len()];
            kernel.eval_params(&values, &refs, step, &mut view);
            values = view;
        }
        bytes.clear();
        safetensors::push_as(&mut bytes, &values, dtype);
        file.write_all(&bytes).map_err(|e| err(&tmp, e))?;
    }
    let file = file.into_inner().map_err(|e| err(&tmp, e.error()))?;
    file.sync_all().map_err(|e| err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| err(path, e))?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint;
    use crate::{ShardedOptimizer, StepConfig, Strategy};
    use distoptim_collective::{CommConfig, Communicator};
    use distoptim_optim::{AdamConfig, Layout, OptimizerConfig, ParamGroup};

    fn layout() -> Layout {
        Layout::new([("fc.weight", vec![3, 5]), ("fc.bias", vec![3]), ("out.weight", vec![2, 3])]).unwrap()
    }

    /// Saves a ZeRO-2 AdamW run of 3 ranks after 2 steps; returns the full params and
    /// the consolidated state as one rank-1 optimizer sees it.
    fn saved(dir: &Path) -> (Vec<f32>, distoptim_optim::OptimizerStateDict) {
        let results = Communicator::run_threads(3, &CommConfig::default(), |comm| {
            let numel = layout().numel();
            let groups = vec![ParamGroup { params: vec![0, 1, 2], config: OptimizerConfig::Adam(AdamConfig::adamw()) }];
            let mut opt = ShardedOptimizer::new(comm.clone(), layout(), groups, None, StepConfig::new(Strategy::Zero2)).unwrap();
            let mut params: Vec<f32> = (0..numel).map(|i| i as f32 * 0.1).collect();
            for step in 0..2 {
                let mut grads: Vec<f32> = (0..numel).map(|i| ((i * 7 + comm.rank() + step) % 5) as f32 - 2.0).collect();
                opt.step(&mut params, &mut grads, 1).unwrap();
            }
            checkpoint::save(dir, &opt, &params, &BTreeMap::new(), &checkpoint::SaveOptions::new()).unwrap();
            (params, opt.consolidate_state_dict(0).unwrap())
        })
        .unwrap();
        let (params, state) = results.into_iter().next().unwrap();
        (params, state.unwrap())
    }

    #[test]
    fn writes_whole_tensors_with_shapes_and_matches_the_ranks() {
        let base = std::env::temp_dir().join(format!("distoptim-consolidate-{}", std::process::id()));
        let (dir, out) = (base.join("ckpt"), base.join("out"));
        let (params, state) = saved(&dir);
        let c = consolidate(&dir, &out).unwrap();
        assert_eq!((c.tensors, c.largest), (3 + 2 * 3, 15));

        let model = safetensors::decode(&fs::read(&c.model).unwrap()).unwrap();
        for p in layout().params() {
            assert_eq!(model.tensors[&p.name], params[p.range()], "{}", p.name);
        }
        let header = String::from_utf8_lossy(&fs::read(&c.model).unwrap()[8..200]).to_string();
        assert!(header.contains("\"shape\":[3,5]"), "{header}");

        let opt = safetensors::decode(&fs::read(&c.optimizer).unwrap()).unwrap();
        for (buffer, values) in &state.buffers {
            for p in layout().params() {
                assert_eq!(opt.tensors[&format!("{buffer}/{}", p.name)], values[p.range()], "{buffer}/{}", p.name);
            }
        }
        assert_eq!(opt.metadata["steps"], "[2,2,2]");
        assert_eq!(opt.metadata["step"], "2");

        // A corrupted rank file is named, and nothing is written over the good output.
        let victim = checkpoint::resolve(&dir).unwrap().0.join("rank-00001.safetensors");
        let mut bytes = fs::read(&victim).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&victim, bytes).unwrap();
        let e = consolidate(&dir, &base.join("out2")).unwrap_err().to_string();
        assert!(e.contains("rank-00001.safetensors") && e.contains("checksum"), "{e}");
        assert!(!base.join("out2").join("model.safetensors").exists());
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn a_bf16_run_consolidates_to_a_bf16_model_and_its_f32_master() {
        use crate::{FloatDtype, Precision};
        use distoptim_collective::bf16;
        let base = std::env::temp_dir().join(format!("distoptim-consolidate-bf16-{}", std::process::id()));
        let (dir, out) = (base.join("ckpt"), base.join("out"));
        let masters = Communicator::run_threads(3, &CommConfig::default(), |comm| {
            let numel = layout().numel();
            let groups = vec![ParamGroup { params: vec![0, 1, 2], config: OptimizerConfig::Adam(AdamConfig::adamw()) }];
            let config = StepConfig { precision: Precision::new(FloatDtype::Bf16), ..StepConfig::new(Strategy::Zero2) };
            let mut opt = ShardedOptimizer::new(comm.clone(), layout(), groups, None, config).unwrap();
            let init: Vec<f32> = (0..numel).map(|i| i as f32 * 0.1 + 0.003).collect();
            opt.set_master(&init).unwrap();
            let mut params: Vec<bf16> = init.iter().map(|&x| bf16::from_f32(x)).collect();
            for step in 0..2 {
                let mut grads: Vec<bf16> = (0..numel).map(|i| bf16::from_f32(((i * 7 + comm.rank() + step) % 5) as f32 - 2.0)).collect();
                opt.step(&mut params, &mut grads, 1).unwrap();
            }
            checkpoint::save(&dir, &opt, &params, &BTreeMap::new(), &checkpoint::SaveOptions::new()).unwrap();
            opt.gather_master().unwrap().unwrap()
        })
        .unwrap();
        let master = &masters[0];
        let c = consolidate(&dir, &out).unwrap();
        let model_bytes = fs::read(&c.model).unwrap();
        let header = String::from_utf8_lossy(&model_bytes[8..200]).to_string();
        assert!(header.contains("\"dtype\":\"BF16\""), "{header}");
        let model = safetensors::decode(&model_bytes).unwrap();
        let opt = safetensors::decode(&fs::read(&c.optimizer).unwrap()).unwrap();
        for p in layout().params() {
            let rounded: Vec<f32> = master[p.range()].iter().map(|&x| FloatDtype::Bf16.round(x)).collect();
            assert_eq!(model.tensors[&p.name], rounded, "{}: the model is the master rounded", p.name);
            assert_eq!(opt.tensors[&format!("master/{}", p.name)], master[p.range()], "{}: the f32 master", p.name);
        }
        assert!(master.iter().any(|&x| FloatDtype::Bf16.round(x) != x), "the master keeps bits bf16 cannot");
        assert!(opt.metadata["precision"].contains("\"param_dtype\":\"bf16\""), "{:?}", opt.metadata);
        let _ = fs::remove_dir_all(&base);
    }

    /// A Schedule-Free run's model file holds the averaged iterate x (what the run
    /// evaluates), not the y its buffer steps; its optimizer file keeps y's state.
    #[test]
    fn a_schedule_free_run_consolidates_to_its_averaged_iterate() {
        use crate::DataParallel;
        use distoptim_optim::ScheduleFreeConfig;
        let base = std::env::temp_dir().join(format!("distoptim-consolidate-sf-{}", std::process::id()));
        let (dir, out) = (base.join("ckpt"), base.join("out"));
        let results = Communicator::run_threads(2, &CommConfig::default(), |comm| {
            let numel = layout().numel();
            let sf = ScheduleFreeConfig { lr: 0.05, warmup_steps: 1, ..ScheduleFreeConfig::default() };
            let groups = vec![ParamGroup { params: vec![0, 1, 2], config: OptimizerConfig::ScheduleFreeAdamw(sf) }];
            let mut opt = ShardedOptimizer::new(comm.clone(), layout(), groups, None, StepConfig::new(Strategy::Zero2)).unwrap();
            let mut params: Vec<f32> = (0..numel).map(|i| i as f32 * 0.1).collect();
            for step in 0..3 {
                let mut grads: Vec<f32> = (0..numel).map(|i| ((i * 7 + comm.rank() + step) % 5) as f32 - 2.0).collect();
                opt.step(&mut params, &mut grads, 1).unwrap();
            }
            checkpoint::save(&dir, &opt, &params, &BTreeMap::new(), &checkpoint::SaveOptions::new()).unwrap();
            let mut x = vec![0f32; numel];
            DataParallel::eval_params(&opt, (&params).into(), (&mut x).into()).unwrap();
            (params, x)
        })
        .unwrap();
        let (y, x) = results.into_iter().next().unwrap();
        assert!(x != y, "x and y differ after three steps");
        let c = consolidate(&dir, &out).unwrap();
        let model = safetensors::decode(&fs::read(&c.model).unwrap()).unwrap();
        for p in layout().params() {
            assert_eq!(model.tensors[&p.name], x[p.range()], "{}", p.name);
        }
        let opt = safetensors::decode(&fs::read(&c.optimizer).unwrap()).unwrap();
        assert!(opt.tensors.contains_key("z/fc.weight") && opt.tensors.contains_key("exp_avg_sq/fc.weight"));
        let _ = fs::remove_dir_all(&base);
    }
    /// Under bf16 a Schedule-Free run evaluates x from its f32 master y, rounded once:
    /// the view each strategy's ranks assemble in memory equals the consolidated model
    /// file's (written from the rank files), and differs from the master rounded.
    #[test]
    fn a_bf16_schedule_free_run_evaluates_its_averaged_iterate_from_the_master() {
        use crate::{DataParallel, FloatDtype, Precision};
        use distoptim_collective::bf16;
        use distoptim_optim::ScheduleFreeConfig;
        for strategy in [Strategy::Ddp, Strategy::Zero2, Strategy::Zero3] {
            let base = std::env::temp_dir().join(format!("distoptim-consolidate-sf-bf16-{strategy}-{}", std::process::id()));
            let (dir, out) = (base.join("ckpt"), base.join("out"));
            let results = Communicator::run_threads(3, &CommConfig::default(), |comm| {
                let numel = layout().numel();
                let sf = ScheduleFreeConfig { lr: 0.05, warmup_steps: 1, ..ScheduleFreeConfig::default() };
                let groups = vec![ParamGroup { params: vec![0, 1, 2], config: OptimizerConfig::ScheduleFreeAdamw(sf) }];
                let config = StepConfig { precision: Precision::new(FloatDtype::Bf16), ..StepConfig::new(strategy) };
                let mut opt = ShardedOptimizer::new(comm.clone(), layout(), groups, None, config).unwrap();
                let init: Vec<f32> = (0..numel).map(|i| i as f32 * 0.1 + 0.003).collect();
                opt.set_master(&init).unwrap();
                let mut params: Vec<bf16> = init.iter().map(|&x| bf16::from_f32(x)).collect();
                for step in 0..3 {
                    opt.gather_params(&mut params).unwrap();
                    let mut grads: Vec<bf16> =
                        (0..numel).map(|i| bf16::from_f32(((i * 7 + comm.rank() + step) % 5) as f32 - 2.0)).collect();
                    opt.step(&mut params, &mut grads, 1).unwrap();
                }
                opt.gather_params(&mut params).unwrap();
                checkpoint::save(&dir, &opt, &params, &BTreeMap::new(), &checkpoint::SaveOptions::new()).unwrap();
                let mut x = vec![bf16::from_f32(0.0); numel];
                DataParallel::eval_params(&opt, (&params).into(), (&mut x).into()).unwrap();
                let mut wrong = vec![0f32; numel];
                let type_error = DataParallel::eval_params(&opt, (&params).into(), (&mut wrong).into()).unwrap_err().to_string();
                (x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>(), opt.gather_master().unwrap().unwrap(), type_error)
            })
            .unwrap();
            let (x, master, type_error) = &results[0];
            assert!(results.iter().all(|r| r.0 == *x), "{strategy}: every rank evaluates the same x");
            assert!(type_error.contains("bf16 parameters into a buffer of f32"), "{type_error}");
            let model = safetensors::decode(&fs::read(consolidate(&dir, &out).unwrap().model).unwrap()).unwrap();
            for p in layout().params() {
                assert_eq!(model.tensors[&p.name], x[p.range()], "{strategy} {}: the consolidated x", p.name);
            }
            let rounded: Vec<f32> = master.iter().map(|&y| FloatDtype::Bf16.round(y)).collect();
            assert!(*x != rounded, "{strategy}: x is not the master y rounded");
            let _ = fs::remove_dir_all(&base);
        }
    }
}
